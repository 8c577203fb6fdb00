"""Streaming answers: token-by-token greedy generation on the worker, server-sent events on the HTTP side.

The worker hands each streamed request its decoded text after every step (`generate_streamed`); the route
turns the growing text into deltas (`TextDeltas`) and sends them as OpenAI chunks (`sse`), ending with
`data: [DONE]`. The admission slot is held until the last byte is sent (`SlotStreamingResponse`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

import torch
from starlette.responses import StreamingResponse
from transformers import StoppingCriteria, StoppingCriteriaList

from ..evaluate.generate import cut_at_eos, eos_token_ids, greedy_config, left_pad, pad_token_id

DONE = "data: [DONE]\n\n"


class _EveryStep(StoppingCriteria):
    """Never stops a row; after each step hands every row its answer so far (EOS cut) to its callback."""

    def __init__(self, prompt_width: int, callbacks: Sequence[Callable[[list[int]], None]], eos_ids):
        self.prompt_width = prompt_width
        self.callbacks = list(callbacks)
        self.eos_ids = list(eos_ids)

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        for row, callback in enumerate(self.callbacks):
            callback(cut_at_eos(input_ids[row, self.prompt_width :].tolist(), self.eos_ids))
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@torch.inference_mode()
def generate_streamed(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    callbacks: Sequence[Callable[[list[int]], None]],
) -> list[list[int]]:
    """Greedy answers (EOS cut) of free prompts in one left-padded batch, calling `callbacks[i]` with answer
    i's tokens after every step. Same greedy config and padding as `generate_batched`, so the same answers."""
    eos_ids = eos_token_ids(model, tokenizer)
    pad_id = pad_token_id(tokenizer, eos_ids)
    input_ids, mask = left_pad(prompts, pad_id, model.device)
    width = input_ids.shape[1]
    out = model.generate(
        input_ids=input_ids,
        attention_mask=mask,
        generation_config=greedy_config(max_new_tokens, eos_ids, pad_id),
        stopping_criteria=StoppingCriteriaList([_EveryStep(width, callbacks, eos_ids)]),
    )
    return [cut_at_eos(out.sequences[row, width:].tolist(), eos_ids) for row in range(len(prompts))]


class TextDeltas:
    """What to send next from a growing decoded text."""

    def __init__(self):
        self.sent = ""

    def feed(self, text: str) -> str:
        """The new part of `text`; nothing while it ends in U+FFFD (a character whose bytes are not all
        generated yet) or does not extend what was sent (decoding re-spaced earlier text)."""
        if text.endswith("\ufffd") or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta

    def finish(self, text: str) -> str:
        """The rest of the final `text` (a final U+FFFD is real)."""
        if not text.startswith(self.sent):
            return ""  # sent text cannot be taken back; the usage and finish chunks still follow
        delta, self.sent = text[len(self.sent) :], text
        return delta


def sse(payload: dict) -> str:
    """One server-sent event carrying `payload` as JSON."""
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class SlotStreamingResponse(StreamingResponse):
    """A streaming response that calls `on_close` once it is over, however it ended (finished, client
    gone, error), so the admission slot it holds is always given back."""

    def __init__(self, content, on_close: Callable[[], None], **kwargs):
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
