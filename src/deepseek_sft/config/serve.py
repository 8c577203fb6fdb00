"""Params of the inference service (`make serve`) and of its bounded load test (`make loadtest`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .base import Section
from .evaluate import MaxNewTokens


class LoadtestParams(Section):
    """A bounded load test against a service on the loopback interface."""

    requests: int = Field(default=200, ge=1, le=100_000, description="requests sent in total (fixed count)")
    concurrency: int = Field(default=8, ge=1, le=256, description="concurrent clients")
    duration_s: float = Field(
        default=120.0, gt=0.0, le=3600.0, description="wall-clock cap: stop sending after it"
    )
    timeout_s: float = Field(default=60.0, gt=0.0, le=600.0, description="per-request client timeout")
    tasks: list[str] | None = Field(
        default=None, description="task endpoints hit in turn; null = every task in `tasks`"
    )
    texts_path: str | None = Field(
        default="data/processed/test.jsonl",
        description="JSONL records whose `text` fields are sent; null = a few built-in example texts",
    )


class ServeParams(Section):
    """The HTTP inference service: what it serves, where, and the limits that keep it up."""

    model_dir: str = Field(
        default="models/sft", description="model directory served (models/sft, models/compressed/x)"
    )
    model_name: str | None = Field(
        default=None,
        description="name published in /v1/models, responses, /readyz and /metrics; null = the directory's name",
    )
    host: str = Field(
        default="127.0.0.1", description="interface to bind; loopback unless you mean to expose it"
    )
    port: int = Field(default=8000, ge=1, le=65535, description="TCP port")
    trust_remote_code: bool = Field(
        default=False, description="allow the checkpoint's own modeling code to run"
    )
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        default="float32", description="weights dtype; auto = as saved"
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flex_attention"] = Field(
        default="sdpa", description="attention kernel"
    )
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="auto = cuda when available")
    num_threads: int | None = Field(
        default=None, ge=1, le=512, description="torch CPU threads; null = default"
    )
    max_text_chars: int = Field(
        default=2000, ge=1, le=1_000_000, description="longest text/prompt accepted (chars)"
    )
    max_body_bytes: int = Field(default=65536, ge=1024, description="largest request body accepted (bytes)")
    max_new_tokens: MaxNewTokens = Field(default_factory=MaxNewTokens)
    constrained_decoding: bool = Field(
        default=True,
        description="inline extraction answers decode under their grammar, as in evaluate (constrain.py)",
    )
    default_new_tokens: int = Field(
        default=64, ge=1, description="new tokens for /v1/generate and chat when the request names none"
    )
    max_new_tokens_limit: int = Field(default=256, ge=1, description="most new tokens a request may ask for")
    max_batch_size: int = Field(
        default=8, ge=1, le=1024, description="requests generated together in one batch"
    )
    batch_wait_ms: float = Field(
        default=5.0,
        ge=0.0,
        le=1000.0,
        description="how long the batcher waits for more requests to fill a batch",
    )
    max_concurrency: int = Field(
        default=32, ge=1, le=100_000, description="generation requests admitted at once (queued + running)"
    )
    queue_timeout_s: float = Field(
        default=0.0, ge=0.0, le=600.0, description="wait for an admission slot before 503; 0 = refuse at once"
    )
    request_timeout_s: float = Field(
        default=300.0, gt=0.0, le=86_400.0, description="a request's wait for its answer before 504"
    )
    stuck_after_s: float = Field(
        default=120.0,
        gt=0.0,
        le=86_400.0,
        description="a request in the engine this long counts as stuck: /readyz 503, dsft_engine_stuck_requests",
    )
    shutdown_timeout_s: float = Field(
        default=5.0,
        ge=0.0,
        le=600.0,
        description="on SIGTERM, wait this long for open requests, then fail them",
    )
    token_env: str = Field(
        default="DSFT_SERVE_TOKEN", description="env var holding the bearer token; unset/empty = no auth"
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        default="info", description="uvicorn and service log level"
    )
    loadtest: LoadtestParams = Field(default_factory=LoadtestParams)

    @model_validator(mode="after")
    def _check_limits(self):
        if self.default_new_tokens > self.max_new_tokens_limit:
            raise ValueError(
                f"default_new_tokens={self.default_new_tokens} > max_new_tokens_limit={self.max_new_tokens_limit}"
            )
        biggest = max(self.max_new_tokens.model_dump().values())
        if biggest > self.max_new_tokens_limit:
            raise ValueError(
                f"max_new_tokens per task ({biggest}) > max_new_tokens_limit={self.max_new_tokens_limit}"
            )
        if self.max_concurrency < self.max_batch_size:
            raise ValueError(f"max_concurrency={self.max_concurrency} < max_batch_size={self.max_batch_size}")
        return self
