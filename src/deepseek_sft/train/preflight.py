"""Preflight: parameter counts by group, trainable vs frozen, checked against what the params mean to train."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .moe import full_numel, router_parameter_names

log = logging.getLogger(__name__)

GROUPS = (
    "embeddings",
    "attention",
    "router",
    "routed_experts",
    "shared_experts",
    "dense_mlp",
    "norms",
    "head",
    "lora",
    "other",
)


class PreflightError(RuntimeError):
    """The trainable set does not match the params (e.g. a group meant to train is frozen)."""


@dataclass(frozen=True)
class Intent:
    """What the params mean to train: per parameter 'train', 'frozen', or 'scheduled' (progressive unfreezing
    freezes it at train begin and unfreezes it later, so it must still be trainable when the optimizer is built)."""

    decide: Callable[[str, str], str]  # (parameter name, group) -> intent


def group_of(name: str, router_names: set[str]) -> str:
    """The group of a parameter name (works for DeepSeek V2/V3, Llama-style and peft-wrapped models)."""
    if "lora_" in name:
        return "lora"
    if name in router_names or name.endswith(("mlp.gate.weight", "e_score_correction_bias")):
        return "router"
    if "embed_tokens" in name or "wte" in name or "word_embeddings" in name:
        return "embeddings"
    if "lm_head" in name or name.endswith("output.weight"):
        return "head"
    if "norm" in _module_name(name):
        return "norms"
    if "shared_expert" in name:
        return "shared_experts"
    if ".experts." in name or name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
        return "routed_experts"
    if "self_attn" in name or "attention" in name:
        return "attention"
    if ".mlp." in name:
        return "dense_mlp"
    return "other"


def _module_name(name: str) -> str:
    # "model.layers.0.self_attn.kv_a_layernorm.weight" -> "kv_a_layernorm"
    parts = name.split(".")
    return parts[-2] if len(parts) > 1 else parts[0]


def parameter_table(model: nn.Module, intent: Intent) -> list[dict]:
    """One row per group: total/trainable/frozen parameter counts, the intent and whether they agree."""
    router_names = router_parameter_names(model)
    rows: dict[str, dict] = {}
    for name, param in model.named_parameters():
        group = group_of(name, router_names)
        want = intent.decide(name, group)
        row = rows.setdefault(group, _empty_row(group))
        n = full_numel(param)
        row["params"] += n
        row["trainable" if param.requires_grad else "frozen"] += n
        row["intents"].add(want)
        if want == "train" and not param.requires_grad:
            row["problems"].append(f"{name} is frozen but meant to train")
        elif want == "scheduled" and not param.requires_grad:
            # the optimizer is built from trainable parameters only, so this one could never be unfrozen
            row["problems"].append(
                f"{name} is frozen before the optimizer exists, so unfreezing cannot reach it"
            )
        elif want == "frozen" and param.requires_grad:
            row["problems"].append(f"{name} is trainable but meant to stay frozen")
    return [_finish(rows[g]) for g in GROUPS if g in rows]


def _empty_row(group: str) -> dict:
    return {"group": group, "params": 0, "trainable": 0, "frozen": 0, "intents": set(), "problems": []}


def _finish(row: dict) -> dict:
    intents = row.pop("intents")
    problems = row.pop("problems")
    row["intent"] = "/".join(sorted(intents))
    row["ok"] = not problems
    row["problem"] = (
        problems[0] + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else "") if problems else ""
    )
    return row


def format_table(rows: list[dict]) -> str:
    """The table as aligned text for the log."""
    header = f"{'group':<15}{'params':>13}{'trainable':>13}{'frozen':>13}  {'intent':<18}status"
    lines = [header, "-" * len(header)]
    for r in rows:
        status = "ok" if r["ok"] else f"MISMATCH: {r['problem']}"
        lines.append(
            f"{r['group']:<15}{r['params']:>13,}{r['trainable']:>13,}{r['frozen']:>13,}  {r['intent']:<18}{status}"
        )
    total = sum(r["params"] for r in rows)
    trainable = sum(r["trainable"] for r in rows)
    lines.append(f"{'total':<15}{total:>13,}{trainable:>13,}{total - trainable:>13,}")
    return "\n".join(lines)


def check_table(rows: list[dict]) -> None:
    """Raise PreflightError naming every group whose trainable state contradicts the params."""
    bad = [r for r in rows if not r["ok"]]
    if bad:
        details = "; ".join(f"{r['group']}: {r['problem']}" for r in bad)
        raise PreflightError(
            f"preflight: the trainable parameters do not match params.train ({details}). "
            "Check freeze_router / unfreeze / lora, and whether the checkpoint was saved with frozen weights."
        )


def preflight(model: nn.Module, intent: Intent) -> list[dict]:
    """Build, log and check the parameter table; return its rows (raises PreflightError on a mismatch)."""
    rows = parameter_table(model, intent)
    log.info("parameters by group:\n%s", format_table(rows))
    check_table(rows)
    return rows
