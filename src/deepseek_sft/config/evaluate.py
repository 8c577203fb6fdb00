"""Params of the evaluate stage (also used by compress, which evaluates every variant the same way)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .base import Section


class MaxNewTokens(Section):
    """Generation budget per task type: short, because greedy decoding stops at EOS anyway."""

    classification: int = Field(default=8, ge=1, le=512, description="new tokens for a label answer")
    extraction: int = Field(default=32, ge=1, le=2048, description="new tokens for an entity list answer")
    generation: int = Field(default=128, ge=1, le=4096, description="new tokens for a free-text answer")


class BaselineParams(Section):
    """The classical reference: TF-IDF over character n-grams + logistic regression, per label task."""

    enabled: bool = Field(
        default=True, description="train and report the TF-IDF + LogisticRegression baseline"
    )
    ngram_min: int = Field(default=1, ge=1, le=8, description="shortest character n-gram")
    ngram_max: int = Field(default=3, ge=1, le=8, description="longest character n-gram")
    max_features: int | None = Field(default=50000, ge=10, description="vocabulary cap; null = no cap")
    C: float = Field(
        default=10.0, gt=0.0, description="inverse regularisation strength of LogisticRegression"
    )
    max_iter: int = Field(default=2000, ge=10, description="LogisticRegression solver iterations")

    @model_validator(mode="after")
    def _check_ngrams(self):
        if self.ngram_min > self.ngram_max:
            raise ValueError(f"ngram_min={self.ngram_min} > ngram_max={self.ngram_max}")
        return self


class EfficiencyParams(Section):
    """Latency measurement: batch-1 prefill and cached decode on a sample of test prompts."""

    samples: int = Field(default=16, ge=1, le=10000, description="prompts timed (spread over tasks)")
    decode_tokens: int = Field(default=16, ge=1, le=4096, description="decode steps timed per prompt")
    warmup: int = Field(
        default=2, ge=0, le=100, description="untimed runs first (allocator and kernel warm-up)"
    )


class EvaluateParams(Section):
    """Stage evaluate: task metrics, efficiency and error analysis of the base and the SFT model."""

    batch_size: int = Field(default=64, ge=1, le=4096, description="prompts per batched greedy generate call")
    ppl_batch_size: int = Field(default=32, ge=1, le=4096, description="examples per perplexity forward pass")
    max_length: int = Field(
        default=512,
        ge=16,
        le=131072,
        description="token cap of prompt + answer for perplexity (as in training)",
    )
    truncation: Literal["truncate", "drop", "error"] = Field(
        default="truncate",
        description="over-long perplexity examples (as sft_data): cut the text, drop, or fail",
    )
    max_new_tokens: MaxNewTokens = Field(default_factory=MaxNewTokens)
    rebatch_every: int | None = Field(
        default=8,
        ge=1,
        le=4096,
        description="every N new tokens finished rows leave the batch (same tokens, less compute); null = never",
    )
    constrained_decoding: bool = Field(
        default=True,
        description="tagged/inline extraction answers decode under their grammar: the text echoed, tags or "
        "marks in between",
    )
    draft_block: int | None = Field(
        default=8,
        ge=2,
        le=256,
        description="constrained echo answers: tokens per forward pass, the text ahead as the draft "
        "(echo_decode.py; same answers, fewer passes); null = one token per pass",
    )
    stop_when_unparseable: bool = Field(
        default=True,
        description="end a label/entity answer once no continuation can parse (same scores, less compute)",
    )
    limit: int | None = Field(
        default=None, ge=1, description="evaluate only the first N test records; null = all"
    )
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="auto = cuda when available")
    num_threads: int | None = Field(
        default=1,
        ge=1,
        le=512,
        description="torch CPU threads per evaluating process; null = torch default (all cores)",
    )
    workers: int = Field(
        default=2,
        ge=1,
        le=64,
        description="on CPU, models evaluated in parallel processes (each num_threads); 1 = in this process",
    )
    error_examples: int = Field(default=50, ge=1, le=100000, description="examples kept per error kind")
    efficiency: EfficiencyParams = Field(default_factory=EfficiencyParams)
    baseline: BaselineParams = Field(default_factory=BaselineParams)
