"""MoE router controls: find routers, freeze them, a load-balancing loss and per-expert token load.

transformers 5.x DeepSeek V2/V3 routers (`mlp.gate`, a *TopkRouter) return (router_logits, topk_weights,
topk_indices) and the models return no auxiliary loss, so forward hooks on the routers capture what is needed.
A plain `nn.Linear` gate (Mixtral/Qwen-MoE style) returns only logits; its top-k is recomputed from them.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """The decoder layer number in a parameter/module name (`model.layers.3.mlp...` -> 3), or None."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def full_shape(param: torch.Tensor) -> torch.Size:
    """A parameter's real shape, also when ZeRO-3 has partitioned it away (`ds_shape`)."""
    return getattr(param, "ds_shape", param.shape)


def full_numel(param: torch.Tensor) -> int:
    """A parameter's real element count, also under ZeRO-3 partitioning (`ds_numel`)."""
    return int(getattr(param, "ds_numel", param.numel()))


@dataclass
class Router:
    """One MoE router: its module, decoder layer, expert count, top-k and scoring function."""

    name: str
    module: nn.Module
    layer: int
    num_experts: int
    top_k: int
    sigmoid: bool  # DeepSeek-V3 scores experts with a sigmoid, V2 / Mixtral with a softmax


def find_routers(model: nn.Module) -> list[Router]:
    """Every MoE router: a module named `gate` (not `gate_proj`) with a 2-D [experts, hidden] weight."""
    config = getattr(model, "config", None)
    default_k = getattr(config, "num_experts_per_tok", None) or 1
    routers = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if name.rsplit(".", 1)[-1] != "gate" or not isinstance(weight, torch.Tensor):
            continue
        shape = full_shape(weight)
        if len(shape) != 2:
            continue
        routers.append(
            Router(
                name=name,
                module=module,
                layer=layer_index(name) if layer_index(name) is not None else len(routers),
                num_experts=int(shape[0]),
                top_k=int(getattr(module, "top_k", None) or default_k),
                sigmoid=hasattr(module, "e_score_correction_bias"),
            )
        )
    return routers


def moe_block_classes(model: nn.Module) -> list[type[nn.Module]]:
    """The classes of the modules that own a router (the MoE blocks), for ZeRO-3 leaf marking."""
    modules = dict(model.named_modules())
    classes = []
    for router in find_routers(model):
        parent = modules[router.name.rsplit(".", 1)[0]] if "." in router.name else model
        if type(parent) not in classes:
            classes.append(type(parent))
    return classes


def set_zero3_leaf_modules(model: nn.Module) -> list[str]:
    """Mark MoE blocks as ZeRO-3 leaf modules: all experts are fetched together, so ranks whose tokens
    reach different experts (or none) never wait on each other's parameter gathers (the known hang)."""
    classes = moe_block_classes(model)
    if classes:
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, classes)
        log.info("ZeRO-3 leaf modules: %s", ", ".join(c.__name__ for c in classes))
    return [c.__name__ for c in classes]


def router_parameter_names(model: nn.Module) -> set[str]:
    """Names of the router parameters (gate weight, and e_score_correction_bias if it is a parameter)."""
    prefixes = tuple(f"{r.name}." for r in find_routers(model))
    return {name for name, _ in model.named_parameters() if name.startswith(prefixes)}


def freeze_routers(model: nn.Module) -> int:
    """Freeze router weights only (`mlp.gate.*`, never dense `gate_proj`); return how many tensors."""
    names = router_parameter_names(model)
    for name, param in model.named_parameters():
        if name in names:
            param.requires_grad_(False)
    # e_score_correction_bias is a buffer in transformers' V3: no optimizer ever updates it, so it stays frozen.
    return len(names)


@dataclass
class _Capture:
    router: Router
    logits: torch.Tensor
    indices: torch.Tensor


@dataclass
class RouterMonitor:
    """Forward hooks on the routers: balance loss for the current forward, and token counts per expert."""

    routers: list[Router]
    captures: list[_Capture] = field(default_factory=list)
    active: bool = False
    token_mask: torch.Tensor | None = None
    counts: dict[int, torch.Tensor] = field(default_factory=dict)
    history: list[tuple[int, int, int, int]] = field(default_factory=list)  # (step, layer, expert, tokens)
    totals: dict[int, torch.Tensor] = field(default_factory=dict)
    _handles: list = field(default_factory=list)

    @classmethod
    def attach(cls, model: nn.Module) -> RouterMonitor:
        """Hook every router of `model` (a dense model gets a monitor with no routers)."""
        monitor = cls(routers=find_routers(model))
        for router in monitor.routers:
            monitor._handles.append(router.module.register_forward_hook(monitor._hook(router)))
        return monitor

    def detach(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, router: Router):
        def hook(module, inputs, output):
            # Inactive outside compute_loss, e.g. when gradient checkpointing re-runs the forward in backward.
            if not self.active:
                return
            logits = output[0] if isinstance(output, tuple) else output
            indices = output[2] if isinstance(output, tuple) and len(output) >= 3 else None
            if indices is None:
                indices = torch.topk(_scores(logits, router.sigmoid), router.top_k, dim=-1).indices
            self.captures.append(
                _Capture(router, logits.reshape(-1, logits.shape[-1]), indices.reshape(-1, indices.shape[-1]))
            )

        return hook

    def begin(self, attention_mask: torch.Tensor | None) -> None:
        """Start capturing one forward; padding positions (attention_mask 0) are left out of loss and load."""
        self.captures.clear()
        self.token_mask = attention_mask.reshape(-1).bool() if attention_mask is not None else None
        self.active = True

    def end(self) -> None:
        """Stop capturing (captures stay until the next `begin`)."""
        self.active = False

    def _mask(self, rows: int, device) -> torch.Tensor:
        if self.token_mask is not None and self.token_mask.numel() == rows:
            return self.token_mask.to(device)
        return torch.ones(rows, dtype=torch.bool, device=device)

    def balance_loss(self) -> torch.Tensor | None:
        """Mean over MoE layers of E * sum_i f_i * P_i (1.0 = perfectly balanced); None for dense models.

        f_i: share of routed token slots sent to expert i (no gradient); P_i: mean routing probability of
        expert i (carries the gradient to the router), as in Switch Transformer / DeepSeek-V2's expert-level loss.
        """
        if not self.captures:
            return None
        losses = []
        for cap in self.captures:
            mask = self._mask(cap.logits.shape[0], cap.logits.device)
            probs = _scores(cap.logits.float(), cap.router.sigmoid)[mask]
            chosen = cap.indices[mask]
            tokens = max(int(mask.sum()), 1)
            num = cap.router.num_experts
            with torch.no_grad():
                f = (
                    torch.bincount(chosen.reshape(-1), minlength=num)[:num].float()
                    * num
                    / (tokens * cap.router.top_k)
                )
            p = probs.sum(0) / tokens
            losses.append((f * p).sum())
        return torch.stack(losses).mean()

    def count_load(self) -> None:
        """Add this forward's routed token slots to the per-layer, per-expert counters."""
        with torch.no_grad():
            for cap in self.captures:
                mask = self._mask(cap.indices.shape[0], cap.indices.device)
                num = cap.router.num_experts
                counts = torch.bincount(cap.indices[mask].reshape(-1).cpu(), minlength=num)[:num]
                layer = cap.router.layer
                self.counts[layer] = self.counts.get(layer, torch.zeros(num, dtype=torch.long)) + counts

    def flush(self, step: int) -> dict[str, float]:
        """Sum the counters over processes, record them for the plots and return per-layer balance metrics.

        Collective under torch.distributed: every rank must call it at the same step (Trainer.log does).
        """
        if not self.routers:
            return {}
        metrics = {}
        for router in sorted(self.routers, key=lambda r: r.layer):
            counts = self.counts.get(router.layer, torch.zeros(router.num_experts, dtype=torch.long))
            counts = _all_reduce(counts)
            self.totals[router.layer] = self.totals.get(router.layer, torch.zeros_like(counts)) + counts
            for expert, n in enumerate(counts.tolist()):
                self.history.append((step, router.layer, expert, int(n)))
            metrics.update(balance_metrics(counts, f"moe/layer_{router.layer}"))
        self.counts.clear()
        return metrics


def balance_metrics(counts: torch.Tensor, prefix: str) -> dict[str, float]:
    """max_load: busiest expert's share x E (1 = balanced, E = collapsed); dead: experts with no tokens."""
    total = int(counts.sum())
    if total == 0:
        return {}
    share = counts.double() / total
    return {
        f"{prefix}/max_load": round(float(share.max() * len(counts)), 4),
        f"{prefix}/dead_experts": int((counts == 0).sum()),
    }


def _scores(logits: torch.Tensor, sigmoid: bool) -> torch.Tensor:
    if sigmoid:
        scores = logits.sigmoid()
        return scores / (scores.sum(-1, keepdim=True) + 1e-20)
    return F.softmax(logits, dim=-1)


def _all_reduce(counts: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        counts = counts.clone()
        torch.distributed.all_reduce(counts)
    return counts
