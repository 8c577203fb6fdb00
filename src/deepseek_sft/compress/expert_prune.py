"""MoE expert pruning: drop the least-routed routed experts of each MoE layer.

Router load is measured on train-split examples with the train stage's RouterMonitor (forward hooks on the
routers, DeepSeek-V3's `mlp.gate`), counting each expert's top-k selections over real (non-padding) tokens. The kept experts' rows of the router weight and of `e_score_correction_bias`
and their slices of the fused expert tensors go into a model built from an updated config
(`n_routed_experts`, `num_experts_per_tok`, `n_group` / `topk_group`), so the result is an ordinary
checkpoint that loads anywhere and can only route to kept experts. With `norm_topk_prob` the top-k weights are
renormalised over the chosen (kept) experts, as before.

Group-limited routing (V3 picks the `topk_group` best of `n_group` expert groups, a group scored by its two
best experts) survives when every group can keep the same number (>= 2) of its own experts; otherwise the pruned
model routes over all kept experts (n_group = topk_group = 1) and the report says so.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.initialization import no_init_weights

from ..config.data import TaskSpec
from ..sft_data import build_examples
from ..train.moe import RouterMonitor, find_routers

log = logging.getLogger(__name__)


def routers(model: nn.Module) -> dict[int, nn.Module]:
    """{layer index: router module} of every MoE layer (train.moe.find_routers: the `mlp.gate` modules)."""
    return {r.layer: r.module for r in find_routers(model)}


def _batches(examples: list[dict], batch_size: int, pad_id: int):
    ordered = sorted(examples, key=lambda e: len(e["input_ids"]))
    for start in range(0, len(ordered), batch_size):
        chunk = [e["input_ids"] for e in ordered[start : start + batch_size]]
        width = max(map(len, chunk))
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, seq in enumerate(chunk):
            ids[row, : len(seq)], mask[row, : len(seq)] = torch.tensor(seq), 1
        yield ids, mask


@torch.no_grad()
def router_load(model: nn.Module, token_batches) -> dict[int, torch.Tensor]:
    """Top-k selections per expert and MoE layer over the real tokens of (input_ids, attention_mask) batches.

    Counted by the train stage's RouterMonitor (forward hooks on the routers; padding left out).
    """
    monitor = RouterMonitor.attach(model)
    try:
        model.eval()
        for ids, mask in token_batches:
            monitor.begin(mask)
            try:
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            finally:
                monitor.end()
            monitor.count_load()
    finally:
        monitor.detach()
    zeros = {r.layer: torch.zeros(r.num_experts, dtype=torch.long) for r in monitor.routers}
    return {layer: monitor.counts.get(layer, empty) for layer, empty in zeros.items()}


def measure_router_load(
    model, tokenizer, records: list[dict], tasks: dict[str, TaskSpec], max_length: int, batch_size: int
) -> dict[int, torch.Tensor]:
    """Router load on the training-format examples (prompt + answer) of `records`."""
    examples, _ = build_examples(records, tasks, tokenizer, max_length, "truncate")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return router_load(model, _batches(examples, batch_size, pad))


def kept_count(n_experts: int, top_k: int, keep_fraction: float) -> int:
    """Experts kept per layer: round(n * keep_fraction), at least top-k (a token needs k experts), at most n."""
    return min(n_experts, max(top_k, round(n_experts * keep_fraction)))


def grouping_after(
    n_experts: int, n_group: int, topk_group: int, keep: int, top_k: int
) -> tuple[int, int] | None:
    """(n_group, topk_group) that keep group-limited routing after pruning to `keep`, or None when impossible."""
    if n_group <= 1 or keep % n_group:
        return None
    per_group = keep // n_group
    if per_group < 2 or topk_group * per_group < top_k:
        return None
    return n_group, topk_group


def choose_experts(load: torch.Tensor, keep: int, n_group: int = 1) -> list[int]:
    """Indices (ascending) of the `keep` most-loaded experts, `keep / n_group` from each group when n_group > 1."""
    groups = n_group if n_group > 1 else 1
    size, per_group = load.numel() // groups, keep // groups
    kept = []
    for g in range(groups):
        block = load[g * size : (g + 1) * size]
        # stable: among equal loads the lower index wins, so the choice is deterministic
        order = sorted(range(block.numel()), key=lambda i: (-int(block[i]), i))
        kept += [g * size + i for i in order[:per_group]]
    return sorted(kept)


def pruned_config(config, keep: int, grouping: tuple[int, int] | None):
    """A copy of `config` with `keep` routed experts and a routing layout that fits them."""
    new = config.__class__.from_dict(config.to_dict())
    n_group, topk_group = grouping or (1, 1)
    new.n_routed_experts = keep
    new.num_experts_per_tok = min(config.num_experts_per_tok, keep)
    new.n_group, new.topk_group = n_group, topk_group
    return new


def sliced_state(model: nn.Module, kept: dict[int, list[int]]) -> dict[str, torch.Tensor]:
    """The state dict with each MoE layer's router rows and expert slices reduced to its kept experts."""
    state = model.state_dict()
    blocks = {r.layer: r.name.rsplit(".", 1)[0] for r in find_routers(model)}  # e.g. model.layers.3.mlp
    for idx, ids in kept.items():
        index = torch.tensor(ids, dtype=torch.long)
        prefix = f"{blocks[idx]}."
        for key in (
            "experts.gate_up_proj",
            "experts.down_proj",
            "gate.weight",
            "gate.e_score_correction_bias",
        ):
            state[prefix + key] = state[prefix + key].index_select(0, index).clone()
    return state


def prune_experts(model, load: dict[int, torch.Tensor], keep_fraction: float) -> tuple[nn.Module, dict]:
    """A new model holding only each layer's most-routed experts, and a report of what was kept."""
    config = model.config
    n, top_k = config.n_routed_experts, config.num_experts_per_tok
    keep = kept_count(n, top_k, keep_fraction)
    grouping = grouping_after(n, config.n_group or 1, config.topk_group or 1, keep, top_k)
    kept = {idx: choose_experts(counts, keep, grouping[0] if grouping else 1) for idx, counts in load.items()}
    new_config = pruned_config(config, keep, grouping)
    with no_init_weights():
        pruned = AutoModelForCausalLM.from_config(
            new_config, dtype=model.dtype, attn_implementation=config._attn_implementation
        )
    pruned.tie_weights()  # no_init_weights skips tying
    pruned.load_state_dict(sliced_state(model, kept), strict=True)
    pruned.generation_config = model.generation_config
    kept_share = {
        idx: float(load[idx][ids].sum()) / max(1, int(load[idx].sum())) for idx, ids in kept.items()
    }
    report = {
        "experts_before": n,
        "experts_after": keep,
        "kept_experts": {str(i): ids for i, ids in kept.items()},
        "router_load": {str(i): load[i].tolist() for i in load},
        "kept_load_share": {str(i): round(s, 6) for i, s in kept_share.items()},
        "group_routing_kept": grouping is not None,
        "n_group": new_config.n_group,
        "topk_group": new_config.topk_group,
        "num_experts_per_tok": new_config.num_experts_per_tok,
    }
    if grouping is None and (config.n_group or 1) > 1:
        log.info(
            "expert pruning: %d of %d experts cannot keep %d groups of >= 2; routing over all kept experts",
            keep,
            n,
            config.n_group,
        )
    return pruned.eval(), report


def mean_kept_load_share(report: dict) -> float:
    """Share of the measured routing decisions that went to experts that were kept (averaged over layers)."""
    shares = list(report["kept_load_share"].values())
    return sum(shares) / len(shares) if shares else math.nan
