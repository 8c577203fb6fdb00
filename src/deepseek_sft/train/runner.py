"""Stage train: SFT of models/base with HF Trainer (+ DeepSpeed), resumable, writing models/sft and reports."""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from torch import nn
from transformers import set_seed

from ..base_model import load_model_and_tokenizer
from ..config import StageParams
from ..io import read_jsonl, write_json
from ..sft_data import build_examples, make_collator
from . import checkpoints as ckpt
from .callbacks import BaseEvalCallback, ThroughputCallback, WholeRunCallback, dvclive_callback
from .fingerprint import part_hashes, run_parts
from .lora import apply_lora, merge_adapter
from .moe import RouterMonitor, freeze_routers, set_zero3_leaf_modules
from .plan import TrainPlan, batches_per_epoch, make_plan
from .preflight import Intent, format_table, preflight
from .reports import write_expert_load, write_param_table, write_train_metrics
from .resume import ResumableSFTTrainer
from .setup import (
    check_launch,
    configure_threads,
    init_deepspeed_comm,
    load_deepspeed_config,
    resolve_precision,
    restore_config,
    set_dropout,
    training_arguments,
    zero_stage,
)
from .trainer import SFTTrainer
from .unfreeze import ProgressiveUnfreeze, frozen_units, never_unfrozen, unit_of
from .varlen import use_varlen_attention

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainPaths:
    """Where the stage reads and writes (all from the dvc.yaml cmd line)."""

    base: Path
    train: Path
    val: Path
    out: Path
    checkpoints: Path
    reports: Path


@dataclass
class Prepared:
    """The model ready for the Trainer, with its router monitor, intent and unfreezing callback."""

    model: nn.Module
    monitor: RouterMonitor
    intent: Intent
    unfreeze: ProgressiveUnfreeze | None
    attention: str | None = None  # the implementation varlen attention replaced, restored before saving


def make_intent(model: nn.Module, stage: StageParams) -> Intent:
    """What params.train means to train, decided from the params alone (the preflight checks the model)."""
    p = stage.section
    num_layers = int(model.config.num_hidden_layers)
    start_frozen = frozen_units(p.unfreeze, num_layers, 0) if p.unfreeze.enabled else set()
    never = frozen_units(p.unfreeze, num_layers, 10**9) if p.unfreeze.enabled else set()

    def decide(name: str, group: str) -> str:
        if p.lora.enabled:
            return "train" if group == "lora" else "frozen"
        if (group == "router" and p.freeze_router) or unit_of(name) in never:
            return "frozen"
        return "scheduled" if unit_of(name) in start_frozen else "train"

    return Intent(decide)


def prepare_model(model: nn.Module, stage: StageParams, ds_config: dict | None) -> Prepared:
    """Apply varlen attention (packed batches), freeze_router, LoRA, ZeRO-3 leaf marking, router hooks and the
    unfreezing schedule."""
    p = stage.section
    attention = use_varlen_attention(model) if p.packing else None
    if p.freeze_router and not freeze_routers(model):
        log.warning("freeze_router: this model has no MoE router; nothing frozen")
    if p.lora.enabled:
        model = apply_lora(model, p.lora)
    if zero_stage(ds_config) == 3:
        set_zero3_leaf_modules(model)
    monitor = RouterMonitor.attach(model)
    intent = make_intent(model, stage)
    callback = None
    if p.unfreeze.enabled:
        never = never_unfrozen(model, p.unfreeze)
        for name, param in model.named_parameters():
            if name in never:
                param.requires_grad_(False)
        trainable = {n for n, prm in model.named_parameters() if prm.requires_grad}
        callback = ProgressiveUnfreeze(model, p.unfreeze, int(model.config.num_hidden_layers), trainable)
    return Prepared(model, monitor, intent, callback, attention)


def build_split(path: Path, stage: StageParams, tokenizer) -> tuple[list[dict], dict[str, int]]:
    """SFT examples of one processed split (one per record and task)."""
    p = stage.section
    return build_examples(read_jsonl(path), stage.tasks, tokenizer, p.max_length, p.truncation)


def run_fingerprint(
    stage: StageParams, paths: TrainPaths, load_kwargs: dict, ds_config: dict | None, world: int
) -> tuple[str, dict[str, str]]:
    """(fingerprint, {part: hash}) of everything a checkpoint depends on (see fingerprint.py); the base
    weights count by content, from models/base/weights_digest.json when base_model recorded it."""
    parts = part_hashes(run_parts(stage, paths.base, [paths.train, paths.val], load_kwargs, ds_config, world))
    return ckpt.fingerprint(parts), parts


def plan_run(trainer: SFTTrainer, stage: StageParams, examples: list[dict]) -> TrainPlan:
    """Decide the run length (train.max_steps / target_tokens / num_train_epochs / min_steps) and set it."""
    plan = make_plan(stage.section, examples, batches_per_epoch(trainer), trainer.args.world_size)
    if plan.source in ("target_tokens", "min_steps"):
        trainer.args.max_steps = plan.max_steps  # Trainer reads it when train() starts
    log.info("%s", plan.describe())
    return plan


def run_training(stage: StageParams, load_kwargs: dict, paths: TrainPaths) -> dict:
    """Run the stage; return the flat metrics (also written to reports/train/metrics.json)."""
    started = time.perf_counter()
    p = stage.section
    threads = configure_threads(p)
    check_launch(p)
    ds_config = load_deepspeed_config(p.deepspeed)
    bf16, fp16, notes = resolve_precision(p)
    args = training_arguments(p, stage.seed, paths.checkpoints, (bf16, fp16))
    is_main = args.process_index == 0
    shm_allreduce = init_deepspeed_comm() if ds_config is not None else False

    set_seed(stage.seed)
    model, tokenizer = load_model_and_tokenizer(paths.base, **load_kwargs)
    saved_config = set_dropout(model, p.dropout) | {"use_cache": model.config.use_cache}
    prepared = prepare_model(model, stage, ds_config)
    table = preflight(prepared.model, prepared.intent)
    if is_main:
        write_param_table(paths.reports, table, format_table(table))

    train_examples, train_stats = build_split(paths.train, stage, tokenizer)
    val_examples, val_stats = build_split(paths.val, stage, tokenizer)
    log.info("examples: train %s, val %s", train_stats, val_stats)

    fp, fp_parts = run_fingerprint(stage, paths, load_kwargs, ds_config, args.world_size)
    with args.main_process_first(desc="checkpoint check", local=False):
        if is_main:
            resume_from = ckpt.prepare_output_dir(paths.checkpoints, fp, p.resume, fp_parts)
        else:
            resume_from = ckpt.latest_checkpoint(paths.checkpoints) if p.resume else None
    resumed_from_step = ckpt.resumed_step(resume_from)  # now: checkpoint rotation may delete it later
    if resume_from is not None:
        log.info("resuming from %s (step %d)", resume_from, resumed_from_step)

    base_eval = BaseEvalCallback(paths.checkpoints / "base_eval.json", is_main, p.eval_base)
    throughput = ThroughputCallback()
    whole_run = WholeRunCallback(prepared.monitor)
    # whole_run before dvclive: it puts the whole run's train_loss into the final log line dvclive records
    callbacks = [c for c in (prepared.unfreeze, base_eval, throughput, whole_run) if c is not None]
    if is_main:
        callbacks.append(dvclive_callback(paths.reports / "live", resumed_from_step))
    trainer = ResumableSFTTrainer(
        model=prepared.model,
        args=args,
        train_dataset=train_examples,
        eval_dataset=val_examples,
        data_collator=make_collator(tokenizer, packing=p.packing),
        processing_class=tokenizer,
        callbacks=callbacks,
        monitor=prepared.monitor,
        # a frozen router cannot be balanced; its loss would only push on the layers below
        aux_loss_coef=0.0 if p.freeze_router else p.router_aux_loss_coef,
    )
    base_eval.trainer = whole_run.trainer = trainer
    plan = plan_run(trainer, stage, train_examples)
    if is_main:
        write_train_metrics(paths.reports, plan.metrics())  # readable while the run goes on
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    final_eval = trainer.evaluate()
    if prepared.monitor.counts:  # a last, partial logging window (none when the last step was logged)
        prepared.monitor.flush(trainer.state.global_step)
    prepared.monitor.detach()

    restore_config(trainer.model, saved_config)
    if prepared.attention is not None:
        model.set_attn_implementation(prepared.attention)
    doc = {
        "seed": stage.seed,
        "train": p.model_dump(),
        "precision": {"bf16": bf16, "fp16": fp16, "notes": notes},
        "world_size": args.world_size,
        "threads_per_process": threads,
        "resumed_from": str(resume_from or ""),
    }
    save_final_model(trainer, tokenizer, stage, paths, load_kwargs, doc, is_main)

    metrics = {
        **{k: v for k, v in result.metrics.items() if k.startswith("train_")},
        **throughput.metrics(),
        "eval_loss": final_eval.get("eval_loss"),
        "eval_ppl": math.exp(min(final_eval.get("eval_loss", 0.0), 50.0)),
        "eval_tokens": final_eval.get("eval_tokens"),
        **{k: v for k, v in base_eval.metrics.items() if k in ("base_eval_loss", "base_eval_tokens")},
        "global_step": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0.0, 4),
        "resumed_from_step": resumed_from_step,
        **plan.metrics(),
        "num_processes": args.world_size,
        "threads_per_process": threads,
        "zero_stage": zero_stage(ds_config),
        "allreduce_shm": int(shm_allreduce),
        "bf16": bf16,
        "fp16": fp16,
        "params_total": sum(r["params"] for r in table),
        "params_trainable": sum(r["trainable"] for r in table),
        **{f"train_data_{k}": v for k, v in train_stats.items()},
        **{f"val_data_{k}": v for k, v in val_stats.items()},
    }
    if "base_eval_loss" in metrics and metrics["eval_loss"] is not None:
        metrics["eval_loss_ratio_to_base"] = round(metrics["eval_loss"] / metrics["base_eval_loss"], 5)
    if is_main:
        metrics |= write_expert_load(paths.reports, prepared.monitor.history, prepared.monitor.totals)
        metrics["stage_seconds"] = round(time.perf_counter() - started, 2)
        write_train_metrics(paths.reports, metrics)
        log.info("metrics: %s", metrics)
    return metrics


def save_final_model(trainer, tokenizer, stage, paths: TrainPaths, load_kwargs, doc, is_main) -> None:
    """models/sft: safetensors + tokenizer + train_params.json, swapped in atomically by the main process.

    Every process takes part in trainer.save_model (ZeRO-3 gathers the partitions); only the main one writes.
    With LoRA the adapter is saved, then merged into a fresh copy of the base model (merge_and_unload).
    """
    tmp = paths.out.with_name(f".{paths.out.name}.tmp")
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    lora = stage.section.lora
    if lora.enabled and lora.merge:
        trainer.save_model(str(tmp / "adapter"))
        if is_main:
            merge_adapter(paths.base, tmp / "adapter", load_kwargs).save_pretrained(tmp)
    else:
        trainer.save_model(str(tmp))
    if is_main:
        tokenizer.save_pretrained(tmp)
        (tmp / "training_args.bin").unlink(missing_ok=True)
        write_json(tmp / "train_params.json", doc)
        if paths.out.exists():
            shutil.rmtree(paths.out)
        os.replace(tmp, paths.out)
        log.info("wrote %s", paths.out)
    trainer.accelerator.wait_for_everyone()
