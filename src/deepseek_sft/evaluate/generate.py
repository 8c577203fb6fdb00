"""Greedy generation for evaluation: batched (left padding, KV cache, early stop at EOS) and a naive reference.

The batched path is what evaluation uses; `generate_naive` (one prompt at a time, a hand-written cached
greedy loop) exists only so a test and the benchmark can check that batching changes nothing but speed.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Sequence

import torch
from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from .constrain import ConstrainedRows, Constraint, constrained_scores

# answer tokens so far -> True when the answer can no longer parse (prefix.answer_stop)
StopFn = Callable[[Sequence[int]], bool]

log = logging.getLogger(__name__)


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends an answer: the tokenizer's EOS plus the model's generation-config EOS ids."""
    ids: set[int] = set()
    for source in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(int(i) for i in source)
    if not ids:
        raise ValueError("tokenizer and model define no EOS token; generation could never stop early")
    return sorted(ids)


def pad_token_id(tokenizer, eos_ids: Sequence[int]) -> int:
    """The padding id (pad token if set, else the first EOS; padded positions are masked anyway)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else int(eos_ids[0])


def left_pad(batch: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into (input_ids, attention_mask) so every prompt ends at the last column."""
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        mask[row, width - len(ids) :] = 1
    return input_ids.to(device), mask.to(device)


def cut_at_eos(tokens: Sequence[int], eos_ids: Sequence[int], stop: StopFn | None = None) -> list[int]:
    """The answer proper: tokens before the first EOS, and up to the token after which `stop` says the
    answer can no longer parse (generation ends there too, so the rest of the row is padding)."""
    out: list[int] = []
    for tok in tokens:
        if tok in eos_ids:
            break
        out.append(int(tok))
        if stop is not None and stop(out):
            break
    return out


class StopWhenUnparseable(StoppingCriteria):
    """Ends a row of a batched generate() once its answer can no longer parse (see prefix.py)."""

    def __init__(self, prompt_width: int, stop: StopFn):
        self.prompt_width = prompt_width
        self.stop = stop

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        answers = input_ids[:, self.prompt_width :].tolist()
        return torch.tensor([self.stop(a) for a in answers], dtype=torch.bool, device=input_ids.device)


def greedy_config(max_new_tokens: int, eos_ids: Sequence[int], pad_id: int) -> GenerationConfig:
    """A plain greedy GenerationConfig: no sampling, beams, penalties or length tricks from the checkpoint."""
    return GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        eos_token_id=list(eos_ids),
        pad_token_id=pad_id,
        use_cache=True,
        repetition_penalty=1.0,
        temperature=None,
        top_p=None,
        top_k=None,
        return_dict_in_generate=True,  # .sequences plus the cache, to resume a re-batched generation
    )


@torch.inference_mode()
def generate_batched(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    batch_size: int,
    progress=None,
    stop: StopFn | None = None,
    rebatch_every: int | None = None,
    constraints: Sequence[Constraint | None] | None = None,
    draft_block: int | None = None,
) -> list[list[int]]:
    """Answer token ids (EOS cut) for each prompt, via batched greedy `model.generate`, in input order.

    Prompts are sorted by length so a batch holds similar lengths (little padding); a row ends at EOS
    (or, with `stop`, once its answer can no longer parse); see `generate_rows` for `rebatch_every`.
    `constraints` (one per prompt, None = free) restrict each answer to its grammar (constrain.py); with
    `draft_block`, a batch whose rows are all constrained decodes `draft_block` tokens per pass
    (echo_decode.py: the same answers).
    """
    eos_ids = eos_token_ids(model, tokenizer)
    pad_id = pad_token_id(tokenizer, eos_ids)
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    answers: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        chunk_constraints = [constraints[i] for i in chunk] if constraints is not None else None
        rows = generate_rows(
            model,
            [prompts[i] for i in chunk],
            max_new_tokens,
            eos_ids,
            pad_id,
            stop,
            rebatch_every,
            chunk_constraints,
            draft_block,
        )
        for i, tokens in zip(chunk, rows, strict=True):
            answers[i] = tokens
        if progress is not None:
            progress(len(chunk))
    return answers


def generate_rows(
    model,
    batch: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_ids: Sequence[int],
    pad_id: int,
    stop: StopFn | None = None,
    rebatch_every: int | None = None,
    constraints: Sequence[Constraint | None] | None = None,
    draft_block: int | None = None,
) -> list[list[int]]:
    """Greedy answers of one left-padded batch.

    A batch runs until its longest answer ends, so one answer that loops to max_new_tokens makes every
    finished row keep computing. With `rebatch_every` = N, generation pauses every N new tokens, and rows
    that finished leave the batch (their KV-cache rows are dropped) before it resumes from the cache:
    the same greedy tokens, fewer wasted row-steps.
    """
    if draft_block and constraints and all(c is not None for c in constraints):
        from .echo_decode import generate_echo_rows  # it imports this module's helpers

        # constrained answers always parse, so `stop` never fires on them
        return generate_echo_rows(model, batch, constraints, max_new_tokens, eos_ids, pad_id, draft_block)
    input_ids, mask = left_pad(batch, pad_id, model.device)
    width = input_ids.shape[1]
    criteria = StoppingCriteriaList([StopWhenUnparseable(width, stop)] if stop else [])
    rows, answers = list(range(len(batch))), [[] for _ in batch]
    cache, remaining = None, max_new_tokens
    while rows:
        step = min(rebatch_every or remaining, remaining)
        kwargs = {"cache": cache} if cache is not None else {}
        if constraints is not None and any(c is not None for c in constraints):
            row_constraints = [constraints[row] for row in rows]
            kwargs["logits_processor"] = LogitsProcessorList([ConstrainedRows(width, row_constraints)])
        out = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            generation_config=greedy_config(step, eos_ids, pad_id),
            stopping_criteria=criteria,
            **kwargs,
        )
        produced = out.sequences.shape[1] - input_ids.shape[1]
        remaining -= produced
        keep = []
        for j, row in enumerate(rows):
            new = out.sequences[j, width:].tolist()
            answers[row] = cut_at_eos(new, eos_ids, stop)
            ended = len(answers[row]) < len(new) or (stop is not None and stop(answers[row]))
            if not ended and produced == step and remaining > 0:
                keep.append(j)
        if not keep:
            break
        cache = _returned_cache(out)
        if not hasattr(cache, "batch_select_indices"):  # a cache type that cannot drop rows: one plain call
            return generate_rows(model, batch, max_new_tokens, eos_ids, pad_id, stop, None, constraints)
        index = torch.tensor(keep, device=input_ids.device)
        cache.batch_select_indices(index)
        grown = torch.ones((mask.shape[0], produced), dtype=mask.dtype, device=mask.device)
        mask = torch.cat([mask, grown], dim=1)[index]
        input_ids = out.sequences[index]
        rows = [rows[j] for j in keep]
    return answers


def _forward_kwargs(model, cache) -> dict:
    params = inspect.signature(model.forward).parameters
    kwargs = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    if cache is not None:
        # transformers 5.x renamed `past_key_values` to `cache`; remote-code models may use the old name.
        kwargs["cache" if "cache" in params else "past_key_values"] = cache
    return kwargs


def _returned_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


@torch.inference_mode()
def greedy_one(
    model,
    ids: Sequence[int],
    max_new_tokens: int,
    eos_ids: Sequence[int],
    stop_at_eos: bool = True,
    stop: StopFn | None = None,
    constraint: Constraint | None = None,
) -> tuple[list[int], list[float]]:
    """Greedy-decode one prompt with a KV cache; returns (new tokens, seconds per step; step 0 = prefill).

    Ends at EOS (unless `stop_at_eos` is False, for timing a fixed number of steps) or when `stop` fires;
    `constraint` restricts each step to its allowed tokens, as in the batched path.
    """
    device = model.device
    step_input = torch.tensor([list(ids)], dtype=torch.long, device=device)
    cache, tokens, seconds = None, [], []
    for _ in range(max_new_tokens):
        started = time.perf_counter()
        out = model(input_ids=step_input, use_cache=True, **_forward_kwargs(model, cache))
        logits = out.logits[0, -1]
        if constraint is not None:
            logits = constrained_scores(constraint, tokens, logits)
        token = int(logits.argmax())  # .item() also synchronises a GPU, so the timing is honest
        seconds.append(time.perf_counter() - started)
        cache = _returned_cache(out)
        tokens.append(token)
        if stop_at_eos and (token in eos_ids or (stop is not None and stop(tokens))):
            break
        step_input = torch.tensor([[token]], dtype=torch.long, device=device)
    return tokens, seconds


def generate_naive(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    stop: StopFn | None = None,
    constraints: Sequence[Constraint | None] | None = None,
) -> list[list[int]]:
    """Reference loop: one prompt at a time (used only by tests/benchmarks against `generate_batched`)."""
    eos_ids = eos_token_ids(model, tokenizer)
    constraints = constraints if constraints is not None else [None] * len(prompts)
    answers = [
        greedy_one(model, p, max_new_tokens, eos_ids, stop=stop, constraint=c)[0]
        for p, c in zip(prompts, constraints, strict=True)
    ]
    return [cut_at_eos(tokens, eos_ids, stop) for tokens in answers]


def decode_answers(tokenizer, answers: Sequence[Sequence[int]]) -> list[str]:
    """Answer strings (special tokens removed) for answer token lists."""
    return tokenizer.batch_decode([list(a) for a in answers], skip_special_tokens=True)
