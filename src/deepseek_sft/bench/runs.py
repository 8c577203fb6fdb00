"""The contenders of `make bench` and what they share: the data budget, the hyperparameters, the counters.

(a) project: the train stage's own trainer construction (its collator, loss, MoE controls, DeepSpeed, layout);
(b) hf: plain transformers.Trainer, model's own loss, dynamic padding (DataCollatorForSeq2Seq), no packing;
(c) trl: TRL's SFTTrainer with its defaults, except the hyperparameters params.train sets for everyone.
All train on the same examples in the same sampler order, with the same global batch (examples per step).
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from transformers import TrainerCallback

# train params copied into every contender's TrainingArguments (the shared hyperparameters)
SHARED_FIELDS = (
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "weight_decay",
    "max_grad_norm",
    "label_smoothing_factor",
    "gradient_checkpointing",
    "logging_steps",
)
CONTENDERS = ("project", "hf", "trl")


@dataclass(frozen=True)
class RunSpec:
    """One subprocess of the bench: which contender, in which processes x threads layout."""

    name: str
    contender: str
    processes: int = 1
    threads: int = 2
    deepspeed: bool = False
    profile_steps: int = 0

    def __post_init__(self):
        if self.contender not in CONTENDERS:
            raise ValueError(f"contender {self.contender!r}: expected one of {', '.join(CONTENDERS)}")
        if self.processes > 1 and not self.deepspeed:
            raise ValueError(
                f"run {self.name}: {self.processes} processes need DeepSpeed (as the train stage)"
            )

    @property
    def layout(self) -> str:
        """'PxT' (processes x threads per process)."""
        return f"{self.processes}x{self.threads}"

    def to_dict(self) -> dict:
        """JSON-able form (passed to the worker)."""
        return asdict(self)


def budget_examples(examples: Sequence[dict], budget_tokens: int, seed: int) -> list[dict]:
    """The shortest prefix of a seeded shuffle of `examples` holding at least `budget_tokens` tokens."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    chosen, tokens = [], 0
    for i in order:
        if tokens >= budget_tokens:
            break
        chosen.append(examples[i])
        tokens += len(examples[i]["input_ids"])
    if tokens < budget_tokens:
        raise ValueError(
            f"bench.budget_tokens={budget_tokens} but the train split holds only {tokens} tokens; lower the budget"
        )
    return chosen


def padding_fraction(real_tokens: int, padded_tokens: int) -> float:
    """Share of the positions the model computed that were padding (0 when fully packed)."""
    return (padded_tokens - real_tokens) / padded_tokens if padded_tokens else 0.0


def batch_layout(global_batch: int, micro_batch: int, processes: int) -> tuple[int, int]:
    """(per-device batch, gradient accumulation) giving `global_batch` examples per optimizer step."""
    if global_batch % processes:
        raise ValueError(f"global batch {global_batch} is not divisible by {processes} processes")
    per_process = global_batch // processes
    if per_process % micro_batch == 0:
        return micro_batch, per_process // micro_batch
    return per_process, 1


class CountingCollator:
    """Wraps a collator: counts real tokens (the examples' own) and computed positions (the batch's width)."""

    def __init__(self, inner):
        self.inner = inner
        self.batch_real: list[int] = []
        self.padded = 0
        self.seconds = 0.0

    def __call__(self, features: list[dict]) -> dict:
        """Collate with the wrapped collator, recording the counts (and time, under a profiler label)."""
        start = time.perf_counter()
        with torch.profiler.record_function("bench::collate"):
            batch = self.inner(features)
        self.seconds += time.perf_counter() - start
        self.batch_real.append(sum(len(f["input_ids"]) for f in features))
        self.padded += int(batch["input_ids"].numel())
        return batch

    @property
    def real(self) -> int:
        """Real tokens collated so far."""
        return sum(self.batch_real)


class StepClock(TrainerCallback):
    """Wall-clock and process CPU time at the start of training and at the end of every optimizer step.

    CPU time (all threads of this process) is the contention-robust view: on a shared machine wall time
    also counts the time other processes held the cores.
    """

    def __init__(self):
        self.start: float | None = None
        self.cpu_start: float | None = None
        self.step_ends: list[float] = []
        self.cpu_ends: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.start, self.cpu_start = time.perf_counter(), time.process_time()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_ends.append(time.perf_counter())
        self.cpu_ends.append(time.process_time())


def steady_window(
    clock: StepClock, counter: CountingCollator, grad_accum: int, skip: int
) -> tuple[int, float, float]:
    """(real tokens, wall seconds, CPU seconds) of the optimizer steps after the first `skip` ones."""
    steps = len(clock.step_ends)
    if not steps:
        return 0, 0.0, 0.0
    skip = skip if steps > skip else 0
    t0 = clock.step_ends[skip - 1] if skip else clock.start
    c0 = clock.cpu_ends[skip - 1] if skip else clock.cpu_start
    tokens = sum(counter.batch_real[skip * grad_accum : steps * grad_accum])
    return tokens, clock.step_ends[-1] - t0, clock.cpu_ends[-1] - c0


def shared_arguments(train, spec: RunSpec, global_batch: int, out_dir: str, seed: int, precision) -> dict:
    """TrainingArguments fields every contender gets: params.train's hyperparameters, one epoch of the budget."""
    per_device, accum = batch_layout(global_batch, train.per_device_train_batch_size, spec.processes)
    fields = {name: getattr(train, name) for name in SHARED_FIELDS}
    return {
        **fields,
        "output_dir": out_dir,
        "per_device_train_batch_size": per_device,
        "gradient_accumulation_steps": accum,
        "num_train_epochs": 1.0,
        "max_steps": -1,
        "bf16": precision[0],
        "fp16": precision[1],
        "seed": seed,
        "data_seed": seed,
        "use_cpu": not torch.cuda.is_available(),
        "save_strategy": "no",
        "eval_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "remove_unused_columns": False,
    }
