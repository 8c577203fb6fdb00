"""Unstructured magnitude pruning (torch.nn.utils.prune) of the linear layers and fused expert tensors.

The saved variant is really smaller: each pruned tensor is stored as its kept values plus a 1-bit mask
(storage.py), ~(1 - sparsity) + 1/32 of the dense float32 bytes; it is rebuilt dense on load, so pruning
saves disk and download, not compute (unstructured sparsity has no fast CPU kernel in torch). Beside it,
`save_dense_copy` writes the same weights as an ordinary checkpoint (`<dir>_dense`) that any tool reads.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import prune

from .quantize import is_fused_experts

Target = tuple[nn.Module, str, str]  # (module, parameter name, full parameter name)


def prune_targets(model: nn.Module, include_lm_head: bool, include_embeddings: bool) -> list[Target]:
    """The weights magnitude pruning applies to: linear weights, fused expert tensors, optionally head/embedding.

    The router (a plain parameter, not nn.Linear) and the norms are never pruned: routing and scale are
    sensitive and they are tiny.
    """
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    targets: list[Target] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            if module is head and (tied or not include_lm_head):
                continue
            targets.append((module, "weight", f"{name}.weight"))
        elif is_fused_experts(module):
            targets += [(module, p, f"{name}.{p}") for p in ("gate_up_proj", "down_proj")]
        elif module is embedding and include_embeddings:
            targets.append((module, "weight", f"{name}.weight"))
    return targets


def apply_magnitude_pruning(model: nn.Module, targets: list[Target], sparsity: float, scope: str) -> None:
    """Zero the smallest-|w| weights: `sparsity` of each tensor (layer) or of all targets together (global).

    The pruning re-parametrisation (weight = weight_orig * weight_mask) stays in place, so a recovery
    fine-tune keeps the pruned weights at zero; `make_permanent` removes it.
    """
    if scope == "global":
        prune.global_unstructured(
            [(m, p) for m, p, _ in targets], pruning_method=prune.L1Unstructured, amount=sparsity
        )
    elif scope == "layer":
        for module, param, _ in targets:
            prune.l1_unstructured(module, param, amount=sparsity)
    else:
        raise ValueError(f"scope={scope!r}; expected layer or global")


def make_permanent(targets: list[Target]) -> None:
    """Fold the masks into the weights (zeros stay) and drop the re-parametrisation."""
    for module, param, _ in targets:
        if prune.is_pruned(module) and hasattr(module, f"{param}_mask"):
            prune.remove(module, param)


def sparsity_stats(model: nn.Module, names: list[str]) -> dict[str, float]:
    """Zero share of the pruned tensors and of every weight, and the non-zero parameter count."""
    params = dict(model.named_parameters())
    pruned_total = sum(params[n].numel() for n in names)
    pruned_zero = sum(int((params[n] == 0).sum()) for n in names)
    total = sum(p.numel() for p in model.parameters())
    zeros = sum(int((p == 0).sum()) for p in model.parameters())
    return {
        "sparsity_pruned_tensors": pruned_zero / pruned_total if pruned_total else 0.0,
        "sparsity_all_weights": zeros / total if total else 0.0,
        "params_nonzero": total - zeros,
        "pruned_tensors": len(names),
    }


def prune_model(
    model: nn.Module,
    sparsity: float,
    scope: str = "layer",
    include_lm_head: bool = True,
    include_embeddings: bool = False,
) -> list[Target]:
    """Magnitude-prune `model` in place (re-parametrisation kept); return the targets."""
    targets = prune_targets(model, include_lm_head, include_embeddings)
    apply_magnitude_pruning(model, targets, sparsity, scope)
    return targets


def dense_copy_dir(out_dir: str | os.PathLike) -> Path:
    """Where the dense copy of the packed variant in `out_dir` goes: the sibling `<name>_dense`."""
    out_dir = Path(out_dir)
    return out_dir.with_name(out_dir.name + "_dense")


def save_pruned(
    model, tokenizer, out_dir: str | os.PathLike, names: list[str], sparsity: float, scope: str
) -> None:
    """Save a pruned model with the pruned tensors packed as values + bitmask, and its dense copy."""
    from .storage import save_compressed, save_plain, sparse_state

    params = dict(model.named_parameters())
    tensors = {n: list(params[n].shape) for n in names}
    marker = {
        "method": "prune",
        "format": "values+bitmask",
        "sparsity": sparsity,
        "scope": scope,
        "tensors": tensors,
    }
    dense = dense_copy_dir(out_dir)
    with torch.no_grad():
        save_compressed(model, tokenizer, out_dir, sparse_state(model, names), marker, dense_copy=str(dense))
        save_plain(model, tokenizer, dense, {"dsft_pruning": {"packed": str(out_dir), "sparsity": sparsity}})
