"""Builders of the compressed variants: each loads the SFT model afresh, compresses it and saves it to `out_dir`.

Each returns the numbers worth reporting about the build itself (shares, sparsity, kept experts, losses, time).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..config.compress import CompressParams, RecoveryParams
from ..config.data import TaskSpec
from ..sft_data import build_examples
from . import distill as D
from . import expert_prune as X
from . import head_prune as H
from . import prune as P
from . import quantize as Q
from .storage import save_plain
from .trainer import fine_tune

log = logging.getLogger(__name__)

Loader = Callable[[str | Path], tuple]


def build_quantize(
    load: Loader, sft_dir, out_dir, params: CompressParams, records, tasks, seed, train_params
) -> dict:
    """int8 weights for every linear layer, fused expert tensor and (optionally) the embedding table."""
    model, tokenizer = load(sft_dir)
    q = params.quantize
    plan = Q.quantize_model(model, q.kernel, q.embeddings)
    Q.save_quantized(model, tokenizer, out_dir, plan, q.kernel)
    stats = Q.quantized_share(model)
    stats |= {f"modules_{kind}": len(names) for kind, names in plan.items()}
    return stats


def _recover(model, tokenizer, records, tasks, recovery: RecoveryParams, seed: int, train_params) -> dict:
    if recovery.max_steps == 0 or not records:
        return {"recovery_steps": 0}
    examples, _ = build_examples(records, tasks, tokenizer, recovery.max_length, "truncate")
    _, stats = fine_tune(
        model,
        tokenizer,
        examples,
        train=train_params,
        max_steps=recovery.max_steps,
        learning_rate=recovery.learning_rate,
        batch_size=recovery.batch_size,
        seed=seed,
    )
    return {f"recovery_{k}": v for k, v in stats.items()}


def build_prune(
    load: Loader, sft_dir, out_dir, params: CompressParams, records, tasks, seed, train_params
) -> dict:
    """Magnitude pruning to `prune.sparsity` (+ optional recovery with the masks held), saved values + bitmask."""
    model, tokenizer = load(sft_dir)
    p = params.prune
    targets = P.prune_model(model, p.sparsity, p.scope, p.include_lm_head, p.include_embeddings)
    stats = _recover(model, tokenizer, records, tasks, p.recovery, seed, train_params)
    P.make_permanent(targets)
    names = [full for _, _, full in targets]
    P.save_pruned(model, tokenizer, out_dir, names, p.sparsity, p.scope)
    return stats | P.sparsity_stats(model, names)


def build_expert_prune(
    load: Loader, sft_dir, out_dir, params: CompressParams, records, tasks, seed, train_params
) -> dict:
    """Drop the least-routed experts (router load on the train split), renormalised router; plain checkpoint."""
    model, tokenizer = load(sft_dir)
    e = params.expert_prune
    if not X.routers(model):
        raise ValueError(f"{sft_dir}: expert_prune needs an MoE model with DeepSeek-V3 routers (mlp.gate)")
    sample = records[: e.router_records]
    started = time.perf_counter()
    load_counts = X.measure_router_load(model, tokenizer, sample, tasks, e.recovery.max_length, e.batch_size)
    load_s = time.perf_counter() - started
    pruned, report = X.prune_experts(model, load_counts, e.keep_fraction)
    del model
    stats = _recover(pruned, tokenizer, records, tasks, e.recovery, seed, train_params)
    save_plain(pruned, tokenizer, out_dir, {"dsft_expert_pruning": report})
    return stats | {
        "experts_before": report["experts_before"],
        "experts_after": report["experts_after"],
        "kept_load_share": X.mean_kept_load_share(report),
        "group_routing_kept": int(report["group_routing_kept"]),
        "router_records": len(sample),
        "router_load_s": load_s,
        "details": report,
    }


def build_head_prune(
    load: Loader, sft_dir, out_dir, params: CompressParams, records, tasks, seed, train_params
) -> dict:
    """Remove the least important attention heads (scored on the train split), recover; plain checkpoint."""
    model, tokenizer = load(sft_dir)
    h = params.head_prune
    started = time.perf_counter()
    batches = H.importance_batches(
        records[: h.importance_records], tasks, tokenizer, h.recovery.max_length, h.batch_size
    )
    importance = H.head_importance(model, batches)
    score_s = time.perf_counter() - started
    pruned, report = H.prune_heads(model, importance, h.keep_fraction)
    del model
    stats = _recover(pruned, tokenizer, records, tasks, h.recovery, seed, train_params)
    save_plain(pruned, tokenizer, out_dir, {"dsft_head_pruning": report})
    shares = report["kept_importance_share"]
    return stats | {
        "heads_before": report["heads_before"],
        "heads_after": report["heads_after"],
        "kv_heads_before": report["kv_heads_before"],
        "kv_heads_after": report["kv_heads_after"],
        "kept_importance_share": sum(shares) / len(shares),
        "importance_records": min(len(records), h.importance_records),
        "importance_s": score_s,
        "details": report,
    }


def build_distill(
    load: Loader, sft_dir, out_dir, params: CompressParams, records, tasks, seed, train_params
) -> dict:
    """Train a smaller student on the SFT teacher's logits (KL * T^2 + CE) and save it as a plain checkpoint."""
    teacher, tokenizer = load(sft_dir)
    d = params.distill
    student = D.build_student(teacher, d.student, seed)
    kept_energy = D.init_from_teacher(student, teacher) if d.init_from_teacher else 0.0
    examples, _ = build_examples(records, tasks, tokenizer, d.max_length, "truncate")
    trainer, stats = fine_tune(
        student,
        tokenizer,
        examples,
        max_steps=d.max_steps,
        learning_rate=d.learning_rate,
        batch_size=d.batch_size,
        seed=seed,
        train=train_params,
        warmup_steps=d.warmup_steps,
        weight_decay=d.weight_decay,
        trainer_class=D.distill_trainer_class(),
        teacher=teacher,
        temperature=d.temperature,
        alpha=d.alpha,
        teacher_cache_max_gb=d.teacher_cache_max_gb,
    )
    info = {"teacher": str(sft_dir), "temperature": d.temperature, "alpha": d.alpha, "steps": stats["steps"]}
    save_plain(student, tokenizer, out_dir, {"dsft_distillation": info})
    parts = trainer.loss_parts
    tail = max(1, len(parts["kl"]) // 10)  # the last 10% of steps: where the run ended up
    return {f"train_{k}": v for k, v in stats.items()} | {
        "params_teacher": D.parameter_count(teacher),
        "params_student": D.parameter_count(student),
        "params_ratio_student": D.parameter_count(teacher) / D.parameter_count(student),
        "init_embedding_energy_kept": kept_energy,
        "final_kl": sum(parts["kl"][-tail:]) / tail if parts["kl"] else float("nan"),
        "final_ce": sum(parts["ce"][-tail:]) / tail if parts["ce"] else float("nan"),
        **trainer.cache_stats,
    }


BUILDERS = {
    "quantize": build_quantize,
    "prune": build_prune,
    "expert_prune": build_expert_prune,
    "head_prune": build_head_prune,
    "distill": build_distill,
}


def build_variant(
    method: str,
    load: Loader,
    sft_dir,
    out_dir,
    params,
    records,
    tasks: dict[str, TaskSpec],
    seed,
    train_params=None,
) -> dict:
    """Build one variant (seeded), timing it; returns its build stats with `build_s`.

    `records`: the train split (router load, recovery, distillation); `train_params`: params `train`, which
    drive the recovery and distillation runs (None = a plain single-process Trainer).
    """
    torch.manual_seed(seed)
    started = time.perf_counter()
    stats = BUILDERS[method](load, sft_dir, out_dir, params, records, tasks, seed, train_params)
    stats["build_s"] = time.perf_counter() - started
    log.info("%s: built in %.1fs -> %s", method, stats["build_s"], out_dir)
    return stats
