"""Request bodies of the service's JSON endpoints (validated by FastAPI through pydantic).

Types are strict: `"5"` or `true` is not a number of tokens, `1` is not a boolean (pydantic's lax mode would
coerce them and hide a client's bug). Every string must be valid Unicode: JSON can carry a lone surrogate
(`"\\ud800"`) that no tokenizer can encode, and it is refused here with a 422 instead of failing inside the model.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


def _valid_unicode(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"holds a lone surrogate (U+{ord(value[e.start]):04X} at character {e.start}); "
            "send valid Unicode text (a surrogate pair must be complete)"
        ) from None
    return value


Text = Annotated[str, AfterValidator(_valid_unicode)]


class Strict(BaseModel):
    """Strict types, unknown fields refused (a typo in a field name is an error, not a silent default)."""

    model_config = ConfigDict(strict=True, extra="forbid")


class TaskRequest(Strict):
    """POST /v1/tasks/<name>: the text the task is asked about."""

    text: Text = Field(
        description="input text (non-empty, at most serve.max_text_chars characters; an extraction task that "
        "echoes its text refuses the characters of its own markup: ⟨⟩ for tagged, ⟦⟧ for inline answers)"
    )


class GenerateRequest(Strict):
    """POST /v1/generate: a raw prompt (no chat template) continued greedily."""

    prompt: Text = Field(description="raw prompt text")
    max_new_tokens: int | None = Field(
        default=None, ge=1, description="new tokens; null = serve.default_new_tokens"
    )


# ----- OpenAI-compatible requests -------------------------------------------------------------------------


class OpenAIRequest(BaseModel):
    """Strict types on the fields the service reads; other OpenAI fields (top_p, user, seed, ...) are
    ignored as OpenAI's own API ignores what it does not need, so stock clients work."""

    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(Strict):
    """One part of a message's content given as a list (only text parts: the model reads text)."""

    type: Literal["text"]
    text: Text


class ChatMessage(OpenAIRequest):
    """One chat turn; `developer` is OpenAI's newer name for `system` and is sent to the template as such."""

    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]

    def as_template_message(self) -> dict:
        """{"role", "content"} as chat templates expect them (content parts joined, developer -> system)."""
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class StreamOptions(OpenAIRequest):
    include_usage: bool = False


class CompletionSettings(OpenAIRequest):
    """What chat and text completions share: greedy decoding, one choice, optional streaming."""

    model: Text | None = Field(default=None, description="ignored: the service serves one model")
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, description="ignored: decoding is greedy")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, description="1 only: greedy decoding gives one answer")
    stop: Text | list[Text] | None = Field(default=None, description="not supported (null only)")


class ChatRequest(CompletionSettings):
    """POST /v1/chat/completions: the conversation, rendered by the model's own chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class CompletionRequest(CompletionSettings):
    """POST /v1/completions: a raw prompt continued greedily (no chat template)."""

    prompt: Text
    echo: bool = Field(default=False, description="not supported (false only)")
