"""Short training runs of the compress stage (pruning recovery, distillation) on the train stage's machinery.

The run takes params `train` (DeepSpeed config, precision, scheduler, clipping, packing, max_length...) with the
compress step's own steps / learning rate / batch size over it, and goes through train.setup's
TrainingArguments and the train stage's SFTTrainer (or a subclass, e.g. DistillTrainer). With a DeepSpeed config
and no launcher, train.setup.check_launch makes a one-process group, as `python scripts/train.py` would.
"""

from __future__ import annotations

import logging
import tempfile
import time

from transformers import Trainer
from transformers.trainer_utils import SaveStrategy

from ..config.train import TrainParams
from ..sft_data import make_collator
from ..train.varlen import varlen_attention

log = logging.getLogger(__name__)


def base_trainer_class() -> type[Trainer]:
    """The Trainer class of the train stage (completion-only loss on target positions)."""
    from ..train.trainer import SFTTrainer

    return SFTTrainer


def short_run_params(
    train: TrainParams,
    *,
    max_steps: int,
    learning_rate: float,
    batch_size: int,
    warmup_steps: int = 0,
    weight_decay: float | None = None,
) -> TrainParams:
    """params.train with a short run's schedule: one process, no checkpoints, no eval, no unfreezing/LoRA."""
    update = {
        "max_steps": max_steps,
        "learning_rate": learning_rate,
        "per_device_train_batch_size": batch_size,
        "gradient_accumulation_steps": 1,
        "warmup_steps": min(warmup_steps, max_steps),
        "num_processes": 1,
        "logging_steps": max(1, max_steps // 10),
        "eval_steps": None,
        "unfreeze": train.unfreeze.model_copy(update={"enabled": False}),
        "lora": train.lora.model_copy(update={"enabled": False}),
    }
    if weight_decay is not None:
        update["weight_decay"] = weight_decay
    return train.model_copy(update=update)


def fine_tune(
    model,
    tokenizer,
    examples: list[dict],
    *,
    train: TrainParams | None = None,
    max_steps: int,
    learning_rate: float,
    batch_size: int,
    seed: int,
    warmup_steps: int = 0,
    weight_decay: float | None = None,
    trainer_class: type[Trainer] | None = None,
    **trainer_kwargs,
) -> tuple[Trainer, dict[str, float]]:
    """Train `model` on SFT `examples` for `max_steps`; return the trainer and run stats.

    `train` defaults to TrainParams() with `deepspeed: null` (a plain single-process Trainer, as tests use).
    """
    from ..train.setup import check_launch, resolve_precision, training_arguments, training_threads

    train = train or TrainParams(deepspeed=None, num_processes=1)
    params = short_run_params(
        train,
        max_steps=max_steps,
        learning_rate=learning_rate,
        batch_size=batch_size,
        warmup_steps=warmup_steps,
        weight_decay=weight_decay,
    )
    check_launch(params)
    bf16, fp16, _ = resolve_precision(params)
    started = time.perf_counter()
    # every core for the run (params.threads_per_process), the caller's count (evaluation's) back afterwards
    with training_threads(params), tempfile.TemporaryDirectory(prefix="dsft-compress-") as out:
        args = training_arguments(params, seed, out, (bf16, fp16))
        # the train stage checkpoints (and so saves at the last step); a short run's result is saved by its caller
        args.save_strategy = SaveStrategy.NO
        cls = trainer_class or base_trainer_class()
        model.train()
        trainer = cls(
            model=model,
            args=args,
            train_dataset=examples,
            data_collator=make_collator(tokenizer, packing=params.packing),
            **trainer_kwargs,
        )
        with varlen_attention(model, trainer_kwargs.get("teacher"), enabled=params.packing):
            result = trainer.train()
    model.eval()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    stats = {
        "steps": int(result.global_step),
        "train_loss": float(result.training_loss),
        "final_loss": float(losses[-1]) if losses else float("nan"),
        "seconds": time.perf_counter() - started,
        "zero_stage": _zero_stage(params),
    }
    log.info(
        "short run: %d steps in %.1fs, final loss %.4f", stats["steps"], stats["seconds"], stats["final_loss"]
    )
    return trainer, stats


def _zero_stage(params: TrainParams) -> int:
    from ..train.setup import load_deepspeed_config, zero_stage

    return zero_stage(load_deepspeed_config(params.deepspeed))
