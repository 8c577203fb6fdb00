"""Request bodies of the service's JSON endpoints (validated by FastAPI through pydantic)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class TaskRequest(BaseModel):
    """POST /v1/tasks/<name>: the text the task is asked about."""

    model_config = ConfigDict(extra="forbid")
    text: str = Field(description="input text (non-empty, at most serve.max_text_chars characters)")


class GenerateRequest(BaseModel):
    """POST /v1/generate: a raw prompt (no chat template) continued greedily."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(description="raw prompt text")
    max_new_tokens: int | None = Field(
        default=None, ge=1, description="new tokens; null = serve.default_new_tokens"
    )


class ChatMessage(BaseModel):
    """One chat turn."""

    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(BaseModel):
    """POST /v1/chat/completions: the OpenAI request shape (non-streaming, greedy; sampling knobs are ignored)."""

    # OpenAI clients send many optional fields (top_p, user, ...); unknown ones are ignored, as OpenAI does.
    model_config = ConfigDict(extra="ignore")
    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    stream: bool = False
    n: int = Field(default=1, ge=1)
