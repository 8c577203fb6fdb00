"""Where a training step's time goes: torch.profiler over real Trainer steps, attributed to model parts.

Forward ops are attributed through profiler labels that forward hooks open around the parts (attention,
routed experts, shared experts, router, dense MLP, LM head, embedding, norms). Backward ops carry the
autograd sequence number of the forward op that created them, so each backward function is attributed to the
part its forward op ran in. Loss ops outside any part (cross-entropy) count as the head + loss, the optimizer
step and zero_grad are labelled by torch, collation by the bench's counting collator. What is left of the
step (Trainer and DeepSpeed bookkeeping, gradient reduction, hooks, Python) is "framework_other".
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn
from transformers import TrainerCallback

PREFIX = "bench::"
LOSS_OPS = ("cross_entropy", "log_softmax", "nll_loss", "_log_softmax")
BACKWARD = "autograd::engine::evaluate_function: "


def part_of(name: str, module: nn.Module) -> str | None:
    """The profile category of a named submodule, or None if it is not a leaf part of interest."""
    leaf = name.rsplit(".", 1)[-1]
    kind = type(module).__name__
    if leaf == "self_attn":
        return "attention"
    if leaf == "experts":
        return "experts_routed"
    if leaf == "shared_experts":
        return "experts_shared"
    if leaf == "gate" and getattr(module, "weight", None) is not None and module.weight.ndim == 2:
        return "router"
    if leaf == "mlp" and "MoE" not in kind and "Moe" not in kind:
        return "mlp_dense"
    if leaf == "lm_head":
        return "head_loss"
    if leaf == "embed_tokens":
        return "embedding"
    if "Norm" in kind and ".layers." in f".{name}" and "self_attn" not in name and "mlp" not in name:
        return "norms"
    return None


class PartLabels:
    """Forward hooks that open a profiler label (record_function) around each part's forward."""

    def __init__(self, model: nn.Module):
        self._handles = []
        self._open: list = []
        for name, module in model.named_modules():
            part = "model" if module is model else part_of(name, module)
            if part is not None:
                self._handles.append(module.register_forward_pre_hook(self._enter(part)))
                self._handles.append(module.register_forward_hook(self._exit))

    def _enter(self, part: str):
        def hook(module, args):
            label = torch.profiler.record_function(PREFIX + part)
            label.__enter__()
            self._open.append(label)

        return hook

    def _exit(self, module, args, output):
        if self._open:
            self._open.pop().__exit__(None, None, None)

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()


class ProfilerSteps(TrainerCallback):
    """Advance a torch.profiler schedule at the end of every optimizer step."""

    def __init__(self, profiler):
        self.profiler = profiler

    def on_step_end(self, args, state, control, **kwargs):
        self.profiler.step()


def _category(event, seq_part: dict[int, str]) -> str:
    """The category of one profiler event, from its nearest meaningful ancestor (itself included)."""
    label, loss = None, False
    node = event
    while node is not None:
        name = node.name
        if name.startswith(BACKWARD):
            default = "grad_accumulate" if "AccumulateGrad" in name else "model_other"
            return f"backward/{seq_part.get(node.sequence_nr, default)}"
        if name.startswith(("Optimizer.step#", "Optimizer.zero_grad#")):
            return "optimizer"
        if label is None and name.startswith(PREFIX):
            label = name[len(PREFIX) :]
        loss = loss or any(op in name for op in LOSS_OPS)
        node = node.cpu_parent
    if label == "collate":
        return "collate"
    if label is not None and label != "model":
        return f"forward/{label}"
    if loss:
        return "forward/head_loss"
    return "forward/model_other" if label == "model" else "framework_other"


def summarize(events) -> dict[str, float]:
    """Milliseconds per category over the profiled steps (self times, so they add up to `step_total`).

    forward/<part> and backward/<part> per model part (model_other: unlabelled model ops such as residual
    adds, RoPE and masks), optimizer (step + zero_grad), collate, and framework_other: the rest of the step
    (Trainer and DeepSpeed bookkeeping, gradient clipping and reduction, hooks, Python between ops).
    `events` is `profiler.events()` of a profiler whose forward ran under PartLabels.
    """
    events = list(events)
    seq_part: dict[int, str] = {}
    for e in events:
        if e.sequence_nr >= 0 and not e.name.startswith(BACKWARD):
            category = _category(e, {})
            if category.startswith("forward/"):
                seq_part.setdefault(e.sequence_nr, category.split("/", 1)[1])
    ms: dict[str, float] = defaultdict(float)
    for e in events:
        if e.name.startswith("ProfilerStep"):
            ms["step_total"] += e.cpu_time_total / 1e3
        elif _in_step(e):
            ms[_category(e, seq_part)] += e.self_cpu_time_total / 1e3
    counted = sum(v for k, v in ms.items() if k not in ("step_total", "framework_other"))
    ms["framework_other"] = max(ms["step_total"] - counted, 0.0)
    return {k: round(v, 3) for k, v in sorted(ms.items())}


def _in_step(event) -> bool:
    node = event.cpu_parent
    while node is not None:
        if node.name.startswith("ProfilerStep"):
            return True
        node = node.cpu_parent
    return False


def shares(summary: dict[str, float]) -> dict[str, float]:
    """Each category's share of the profiled step time, grouped: forward + backward per part."""
    total = summary.get("step_total", 0.0)
    if total <= 0:
        return {}
    grouped: dict[str, float] = defaultdict(float)
    for key, value in summary.items():
        if key == "step_total":
            continue
        grouped[key.split("/", 1)[-1]] += value
    return {k: round(v / total, 4) for k, v in sorted(grouped.items(), key=lambda kv: -kv[1])}
