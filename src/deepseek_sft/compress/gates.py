"""Quality gates: each variant against the SFT model (F1 loss, size ratio), failing the stage with the numbers.

The gated F1 is the mean over tasks of each task's headline F1: macro F1 for classification, entity micro F1
for extraction, chrF / 100 for generation.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from ..config.compress import GateParams
from ..config.data import TaskSpec

log = logging.getLogger(__name__)

HEADLINE = {"classification": "macro_f1", "extraction": "f1", "generation": "chrf"}


class GateError(RuntimeError):
    """One or more compressed variants are past their gate; the message gives the measured numbers."""


@dataclass(frozen=True)
class GateOutcome:
    """The verdict on one variant."""

    method: str
    passed: bool
    message: str
    on_fail: str | None = None  # the gate's own on_fail (None = the stage's)


def task_f1(task: TaskSpec, metrics: dict[str, float]) -> float:
    """The headline F1 of one task's metrics (chrF rescaled to 0..1)."""
    value = float(metrics[HEADLINE[task.type]])
    return value / 100.0 if task.type == "generation" else value


def headline_f1(metrics: dict[str, dict], tasks: dict[str, TaskSpec]) -> float:
    """Mean headline F1 over the tasks (the number the gates compare)."""
    values = [task_f1(task, metrics[name]) for name, task in tasks.items()]
    return sum(values) / len(values) if values else 0.0


def relative_loss(reference: float, value: float) -> float:
    """(reference - value) / reference; 0 when the reference is 0 and the variant is no worse."""
    if reference <= 0:
        return 0.0 if value >= reference else math.inf
    return (reference - value) / reference


def compare_to_reference(reference: dict, variant: dict, tasks: dict[str, TaskSpec]) -> dict[str, float]:
    """Size ratio, speed-ups and F1 deltas of a variant (`ModelResults.flat()`-shaped dicts) against SFT."""
    ref_eff, var_eff = reference["efficiency"], variant["efficiency"]
    f1_ref, f1_var = headline_f1(reference, tasks), headline_f1(variant, tasks)
    out = {
        "f1": f1_var,
        "f1_sft": f1_ref,
        "f1_delta": f1_var - f1_ref,
        "relative_f1_loss": relative_loss(f1_ref, f1_var),
        "size_weights_mb": var_eff["size_weights_bytes"] / 2**20,
        "size_ratio": _ratio(ref_eff["size_weights_bytes"], var_eff["size_weights_bytes"]),
        "params_ratio": _ratio(ref_eff.get("params_held"), var_eff.get("params_held")),
        "decode_ms_per_token": var_eff.get("decode_ms_per_token_mean", math.nan),
        "decode_speedup": _ratio(
            ref_eff.get("decode_ms_per_token_mean"), var_eff.get("decode_ms_per_token_mean")
        ),
        "prefill_speedup": _ratio(
            ref_eff.get("prefill_ms_per_token_mean"), var_eff.get("prefill_ms_per_token_mean")
        ),
        "batched_speedup": _ratio(var_eff.get("batched_tokens_per_s"), ref_eff.get("batched_tokens_per_s")),
        "peak_rss_mb": var_eff.get("peak_rss_mb", math.nan),
    }
    for name, task in tasks.items():
        out[f"{name}_f1_delta"] = task_f1(task, variant[name]) - task_f1(task, reference[name])
    return out


def _ratio(numerator, denominator) -> float:
    if not numerator or not denominator:
        return math.nan
    return float(numerator) / float(denominator)


def check_gate(method: str, comparison: dict[str, float], gate: GateParams) -> GateOutcome:
    """Pass/fail of one variant, with a message naming the measured and the allowed numbers."""
    loss, ratio = comparison["relative_f1_loss"], comparison["size_ratio"]
    problems = []
    if loss > gate.max_relative_f1_loss:
        problems.append(
            f"relative F1 loss {loss:.2%} (F1 {comparison['f1']:.4f} vs SFT {comparison['f1_sft']:.4f}) "
            f"> allowed {gate.max_relative_f1_loss:.2%}"
        )
    if not ratio >= gate.min_size_ratio:  # NaN fails too
        problems.append(f"size ratio {ratio:.2f}x < required {gate.min_size_ratio:.2f}x")
    summary = (
        f"{method}: F1 {comparison['f1']:.4f} vs SFT {comparison['f1_sft']:.4f} "
        f"(loss {loss:.2%}, max {gate.max_relative_f1_loss:.2%}), size ratio {ratio:.2f}x "
        f"(min {gate.min_size_ratio:.2f}x)"
    )
    if problems:
        return GateOutcome(method, False, f"gate failed for {method}: " + "; ".join(problems), gate.on_fail)
    return GateOutcome(method, True, f"gate passed for {summary}", gate.on_fail)


def enforce(outcomes: list[GateOutcome], on_fail: str) -> None:
    """Log every verdict; raise GateError listing the failures whose gate (or else `on_fail`) says error."""
    for outcome in outcomes:
        (log.info if outcome.passed else log.warning)(outcome.message)
    failed = [o for o in outcomes if not o.passed and (o.on_fail or on_fail) == "error"]
    if failed:
        raise GateError(
            "compression gate(s) failed (set compress.on_fail, or the gate's on_fail, to warn to go on):\n  "
            + "\n  ".join(o.message for o in failed)
        )
