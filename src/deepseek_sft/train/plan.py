"""How long the run will train, decided before it starts: optimizer steps, epochs and input tokens.

`num_train_epochs` alone makes the length follow the data (2 epochs are 1,014 steps on the embedded corpus and
232 on 3,374 records), so the train params also offer budgets that do not: `max_steps` (exact), `target_tokens`
(about that many input tokens, whatever the data size) and `min_steps` (a floor under either epochs or tokens).
The plan is logged and written to reports/train/metrics.json before the first step.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from transformers.trainer_pt_utils import BatchRebalanceSampler

from ..config.train import TrainParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainPlan:
    """The run's length: `max_steps` optimizer steps of `steps_per_epoch` per pass over the train examples."""

    examples: int
    epoch_tokens: int  # input tokens of one pass over the train examples (prompt + answer, all tasks)
    global_batch: int  # examples per optimizer step (all processes, accumulation included)
    steps_per_epoch: int
    max_steps: int
    source: str  # which param set the length: max_steps | target_tokens | num_train_epochs | min_steps

    @property
    def epochs(self) -> float:
        """Passes over the train examples the steps amount to."""
        return self.max_steps / self.steps_per_epoch

    @property
    def tokens(self) -> int:
        """About how many input tokens the run trains on (exact for whole epochs)."""
        return round(self.epochs * self.epoch_tokens)

    def metrics(self) -> dict[str, float]:
        """plan_* keys for metrics.json."""
        return {
            "plan_steps": self.max_steps,
            "plan_epochs": round(self.epochs, 4),
            "plan_tokens": self.tokens,
            "plan_steps_per_epoch": self.steps_per_epoch,
            "plan_epoch_tokens": self.epoch_tokens,
            "plan_global_batch": self.global_batch,
        }

    def describe(self) -> str:
        """One log line a user can check before waiting for the run."""
        return (
            f"train plan ({self.source}): {self.max_steps:,} optimizer steps = {self.epochs:.2f} epochs of "
            f"{self.steps_per_epoch:,} steps over {self.examples:,} examples ({self.global_batch} per step), "
            f"about {self.tokens:,} input tokens ({self.epoch_tokens:,} per epoch)"
        )


def batches_per_epoch(trainer) -> int:
    """Micro-batches one process takes per epoch, as Trainer's dataloader will yield them.

    Counted from the sampler, not by building the dataloader: accelerate draws a seed from the global RNG when
    it prepares one, which would change the run.
    """
    sampler = trainer._get_train_sampler()
    if isinstance(sampler, BatchRebalanceSampler):
        return len(sampler)  # already this rank's share, accumulation included
    batches = math.ceil(len(sampler) / trainer.args.per_device_train_batch_size)
    return math.ceil(batches / trainer.args.world_size)  # accelerate shards whole batches (even_batches)


def make_plan(params: TrainParams, examples: list[dict], batches: int, world_size: int) -> TrainPlan:
    """The plan for `examples` when each process takes `batches` micro-batches per epoch."""
    ga = params.gradient_accumulation_steps
    steps_per_epoch = max(batches // ga + int(batches % ga > 0), 1)  # Trainer's own rounding
    epoch_tokens = sum(len(e["input_ids"]) for e in examples)
    if params.max_steps > 0:
        steps, source = params.max_steps, "max_steps"
    elif params.target_tokens is not None:
        tokens_per_step = max(epoch_tokens / steps_per_epoch, 1.0)
        steps, source = max(math.ceil(params.target_tokens / tokens_per_step), 1), "target_tokens"
    else:
        steps, source = math.ceil(params.num_train_epochs * steps_per_epoch), "num_train_epochs"
    if steps < params.min_steps:
        steps, source = params.min_steps, "min_steps"
    global_batch = params.per_device_train_batch_size * ga * world_size
    return TrainPlan(len(examples), epoch_tokens, global_batch, steps_per_epoch, steps, source)
