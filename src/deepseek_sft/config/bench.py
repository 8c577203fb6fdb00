"""Params of `make bench`: the token budget, the CPU layouts tried and what is measured besides throughput."""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from .base import Section

_LAYOUT = re.compile(r"^([1-9]\d*)x([1-9]\d*)$")


def parse_layout(layout: str) -> tuple[int, int]:
    """'2x1' -> (2 processes, 1 torch thread each)."""
    match = _LAYOUT.match(layout)
    if match is None:
        raise ValueError(f"layout {layout!r}: expected PROCESSESxTHREADS, e.g. 1x2 or 2x1")
    return int(match.group(1)), int(match.group(2))


class BenchParams(Section):
    """`make bench`: the project's training path against plain HF Trainer and TRL's SFTTrainer.

    Every contender trains the same model on the same examples (a seeded prefix of the train split holding
    `budget_tokens` real tokens) with the train stage's hyperparameters, each in its own subprocess.
    """

    budget_tokens: int = Field(
        default=80000, ge=1000, description="real (non-padding) train tokens every contender trains on"
    )
    global_batch_size: int | None = Field(
        default=None,
        ge=1,
        description="examples per optimizer step for the baselines; null = train's per-device batch x processes",
    )
    warmup_steps_excluded: int = Field(
        default=2,
        ge=0,
        description="first optimizer steps left out of tokens/s (allocation, first-call cost)",
    )
    layouts: list[str] = Field(
        default_factory=lambda: ["1x2", "2x1"],
        description="processes x threads tried for the project's path with DeepSpeed (the first 2 cores)",
    )
    deepspeed_overhead: bool = Field(
        default=True, description="also run the project's path as a plain single process (no DeepSpeed)"
    )
    trl: bool = Field(default=True, description="run TRL's SFTTrainer (contender c)")
    heldout_batch_size: int = Field(default=64, ge=1, description="val examples per held-out forward pass")
    heldout_max_examples: int | None = Field(
        default=None, ge=1, description="score only the first N val examples (seeded order); null = all"
    )
    profile_steps: int = Field(
        default=6, ge=0, description="optimizer steps of the project's path under torch.profiler; 0 = skip"
    )
    peak_matrix_size: int = Field(default=1024, ge=64, description="n of the n x n matmuls timing the peak")
    peak_seconds: float = Field(default=2.0, gt=0.0, description="seconds spent timing the matmul peak")
    run_timeout_s: float = Field(default=300.0, gt=0.0, description="a contender taking longer is killed")
    max_seconds: float = Field(
        default=540.0,
        gt=0.0,
        description="optional runs (layouts, plain, profile) are skipped rather than run past this time",
    )

    @field_validator("layouts")
    @classmethod
    def _check_layouts(cls, layouts: list[str]) -> list[str]:
        if not layouts:
            raise ValueError("layouts needs at least one PROCESSESxTHREADS entry")
        for layout in layouts:
            parse_layout(layout)
        return layouts
