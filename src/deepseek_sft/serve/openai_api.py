"""OpenAI-compatible endpoints: /v1/chat/completions, /v1/completions (both with `stream`), /v1/models.

Chat prompts go through the served model's own chat template (`apply_chat_template`, generation prompt
added), so a ChatML checkpoint (SmolLM2) and the tiny default each get the format they were trained on.
Decoding is greedy: `temperature` and other sampling knobs are accepted and ignored, `n` must be 1; `stop`
sequences and `echo` are refused rather than ignored (the answer would not be what the client asked for).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import TYPE_CHECKING

from fastapi import FastAPI

from .engine import Generation
from .errors import ApiError, engine_error, error_body
from .schemas import ChatRequest, CompletionRequest, CompletionSettings
from .streaming import DONE, SlotStreamingResponse, TextDeltas, sse

if TYPE_CHECKING:
    from .app import Service

_END = object()  # queued after a streamed request's last text


def usage(gen: Generation) -> dict:
    """OpenAI's usage object of one generation."""
    completion = len(gen.token_ids)
    return {
        "prompt_tokens": gen.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": gen.prompt_tokens + completion,
    }


def check_settings(body: CompletionSettings) -> None:
    """Refuse what greedy decoding of one answer cannot honour (400, naming the field)."""
    if body.n != 1:
        raise ApiError(
            400, f"n={body.n} is not supported; greedy decoding gives one choice (n=1)", "unsupported", "n"
        )
    if body.stop is not None:
        raise ApiError(400, "stop sequences are not supported; send stop=null", "unsupported", "stop")
    if getattr(body, "echo", False):
        raise ApiError(400, "echo=true is not supported; send echo=false", "unsupported", "echo")


class Completion:
    """One response's identity and the shapes of its objects: a chat completion or a text completion."""

    def __init__(self, chat: bool, model: str):
        self.chat = chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model

    def _object(self, kind: str, choices: list, **extra) -> dict:
        head = {"id": self.id, "object": kind, "created": self.created, "model": self.model}
        return head | {"choices": choices} | extra

    def body(self, gen: Generation) -> dict:
        """The whole (non-streamed) response object."""
        if self.chat:
            message = {"role": "assistant", "content": gen.text}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": gen.finish_reason}
            return self._object("chat.completion", [choice], usage=usage(gen))
        choice = {"index": 0, "text": gen.text, "logprobs": None, "finish_reason": gen.finish_reason}
        return self._object("text_completion", [choice], usage=usage(gen))

    def chunk(self, text: str | None = None, finish_reason: str | None = None, first: bool = False) -> dict:
        """One streamed chunk: the first carries the assistant role, the last the finish reason."""
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return self._object("chat.completion.chunk", [choice])
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return self._object("text_completion", [choice])

    def usage_chunk(self, gen: Generation) -> dict:
        """The extra last chunk of `stream_options.include_usage` (no choices, the usage)."""
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return self._object(kind, [], usage=usage(gen))


async def stream(
    service: Service, endpoint: str, ids: list[int], budget: int, shape: Completion, include_usage: bool
) -> SlotStreamingResponse:
    """Admit and queue the request, then answer with server-sent events as the tokens come.

    Refusals (saturated, shutting down) are still plain JSON errors: they happen before the stream starts.
    A failure after it started is sent as a final `{"error": ...}` event (OpenAI's client raises it).
    """
    loop = asyncio.get_running_loop()
    texts: asyncio.Queue = asyncio.Queue()
    await service.admit()
    try:
        future = service.submit(ids, budget, on_text=lambda t: loop.call_soon_threadsafe(texts.put_nowait, t))
    except BaseException:
        service.release()
        raise
    waiter = asyncio.wrap_future(future)
    # resolves after every text the worker queued before it (both reach the loop in call order)
    waiter.add_done_callback(lambda _: texts.put_nowait(_END))
    timeout = service.params.request_timeout_s

    async def events():
        deadline = loop.time() + timeout
        deltas = TextDeltas()
        yield sse(shape.chunk(first=True))
        try:
            while (item := await asyncio.wait_for(texts.get(), deadline - loop.time())) is not _END:
                if delta := deltas.feed(item):
                    yield sse(shape.chunk(delta))
            gen = waiter.result()
        except Exception as e:
            err = engine_error(e, timeout)
            yield sse(error_body(err.status, err.message, err.code))
            yield DONE
            return
        finally:  # timed out, or the client went away: a request still queued is dropped unrun
            if not waiter.done():
                waiter.cancel()
        if delta := deltas.finish(gen.text):
            yield sse(shape.chunk(delta))
        yield sse(shape.chunk(finish_reason=gen.finish_reason))
        if include_usage:
            yield sse(shape.usage_chunk(gen))
        yield DONE
        service.metrics.observe_generation(endpoint, gen.prompt_tokens, len(gen.token_ids), gen.batch_seconds)

    return SlotStreamingResponse(
        events(),
        on_close=service.release,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def complete(
    service: Service, endpoint: str, body: CompletionSettings, encode, budget: int, chat: bool
):
    """A (streamed or whole) completion of the prompt `encode()` builds."""
    shape = Completion(chat, service.model_name)
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return await stream(service, endpoint, service.encode(encode, budget), budget, shape, include_usage)
    return shape.body(await service.generate(endpoint, encode, budget))


def add_openai_routes(app: FastAPI, service: Service) -> None:
    """The OpenAI-compatible routes on `app`."""
    engine = service.engine

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        """OpenAI chat completion through the model's chat template (greedy; `stream` supported)."""
        check_settings(body)
        messages = [m.as_template_message() for m in body.messages]
        service.check_text("".join(m["content"] for m in messages), "messages content")
        requested = body.max_completion_tokens or body.max_tokens
        budget = service.budget(
            requested, "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        )
        encode = lambda: engine.encode_chat(messages)  # noqa: E731 - runs after the checks above
        return await complete(service, "/v1/chat/completions", body, encode, budget, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        """OpenAI text completion of a raw prompt (no chat template; greedy; `stream` supported)."""
        check_settings(body)
        service.check_text(body.prompt, "prompt")
        budget = service.budget(body.max_tokens, "max_tokens")
        encode = lambda: engine.encode_raw(body.prompt)  # noqa: E731
        return await complete(service, "/v1/completions", body, encode, budget, chat=False)

    @app.get("/v1/models")
    async def models():
        """OpenAI model list: the one model served, by its published name."""
        card = {"id": service.model_name, "object": "model", "created": 0, "owned_by": "deepseek-sft"}
        return {"object": "list", "data": [card]}
