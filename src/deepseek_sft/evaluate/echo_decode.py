"""Greedy decoding of echo answers (tagged / inline extraction) with the input text as the draft.

Under its constraint (constrain.py) an echo answer is the text itself except where the model chooses a tag or
mark. So instead of one forward pass per answer token, each pass feeds a block of `block` tokens: the token
chosen last, then the text tokens that follow it (the answer if the model chose "go on with the text" at every
step). The logits at every block position are checked in order against the same constrained greedy rule;
the block is accepted up to the first position where the model chose otherwise (a tag, a mark), and that
choice becomes the next block's first token. It is speculative decoding with the text as the free draft: the
answer is the one step-by-step greedy decoding gives (a test compares them), in about (tags + marks + text /
block) passes instead of one per token.

Rows of a batch accept different lengths, so each row keeps its own position counter; the KV cache keeps
the rejected positions, which the attention mask hides from every later token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .constrain import Constraint, constrained_choice


def draft(constraint: Constraint, generated: list[int], length: int, eos_ids: Sequence[int]) -> list[int]:
    """Up to `length` tokens that follow `generated` if the model goes on with the text at every step."""
    out: list[int] = []
    while len(out) < length:
        allowed = constraint.allowed(generated + out)
        token = next(t for t in allowed if t not in constraint.marks)
        out.append(token)
        if token in eos_ids:
            break
    return out


class _Scores:
    """Per block position: the "go on" score (logsumexp of every non-mark token) and each mark's score."""

    def __init__(self, logits: torch.Tensor, marks: list[int]):
        not_mark = torch.ones(logits.shape[-1], dtype=torch.bool, device=logits.device)
        not_mark[marks] = False
        self.go_on = torch.logsumexp(logits[..., not_mark], dim=-1).tolist()
        self.marks = [
            [dict(zip(marks, at, strict=True)) for at in row] for row in logits[..., marks].tolist()
        ]


def _forward(model, input_ids, mask, positions, cache, last_only: bool = False):
    from .generate import _forward_kwargs, _returned_cache

    kwargs = _forward_kwargs(model, cache)
    if not last_only:
        kwargs.pop("logits_to_keep", None)
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs)
    return out.logits.float(), _returned_cache(out)


@torch.inference_mode()
def generate_echo_rows(
    model,
    batch: Sequence[Sequence[int]],
    constraints: Sequence[Constraint],
    max_new_tokens: int,
    eos_ids: Sequence[int],
    pad_id: int,
    block: int = 8,
) -> list[list[int]]:
    """Greedy answers (EOS cut) of one batch of prompts whose answers all decode under a constraint."""
    from .generate import left_pad

    device = model.device
    marks = sorted(set().union(*(c.marks for c in constraints)))
    input_ids, mask = left_pad(batch, pad_id, device)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    logits, cache = _forward(model, input_ids, mask, positions, None, last_only=True)
    first = _Scores(logits[:, -1:], marks)
    pending = [
        constrained_choice(c, [], first.go_on[r][0], first.marks[r][0]) for r, c in enumerate(constraints)
    ]
    next_position = mask.sum(dim=1).tolist()
    answers: list[list[int]] = [[] for _ in batch]
    live = [r for r in range(len(batch)) if pending[r] not in eos_ids] if max_new_tokens > 0 else []
    rows = list(range(len(batch)))  # the batch rows held in the cache, in cache order
    while live:
        if rows != live:  # finished rows leave the cache and the mask
            keep = torch.tensor([rows.index(r) for r in live], device=device)
            cache.batch_select_indices(keep)
            mask, rows = mask[keep], list(live)
        blocks = []
        for r in rows:  # the pending token, then the text ahead, within the answer's budget
            ahead = min(block, max_new_tokens - len(answers[r])) - 1
            blocks.append([pending[r], *draft(constraints[r], [*answers[r], pending[r]], ahead, eos_ids)])
        width = max(map(len, blocks))
        step_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        step_mask = torch.zeros((len(rows), width), dtype=mask.dtype)
        for i, tokens in enumerate(blocks):
            step_ids[i, : len(tokens)] = torch.tensor(tokens)
            step_mask[i, : len(tokens)] = 1
        step_positions = torch.tensor([next_position[r] for r in rows]).unsqueeze(1) + torch.arange(width)
        mask = torch.cat([mask, step_mask.to(device)], dim=1)
        logits, cache = _forward(model, step_ids.to(device), mask, step_positions.to(device), cache)
        scores = _Scores(logits, marks)
        live = []
        for i, (r, tokens) in enumerate(zip(rows, blocks, strict=True)):
            accepted, choice = _verify(constraints[r], answers[r], tokens, scores, i, eos_ids, max_new_tokens)
            answers[r] = answers[r] + tokens[:accepted]
            mask[i, mask.shape[1] - width + accepted :] = 0  # rejected draft positions stay hidden
            next_position[r] += accepted
            if choice is not None:
                pending[r] = choice
                live.append(r)
    return [[t for t in answer if t not in eos_ids] for answer in answers]


def _verify(constraint, answer, tokens, scores, i, eos_ids, max_new_tokens) -> tuple[int, int | None]:
    """(block tokens accepted, next token to feed or None when the answer ended) for block row `i`."""
    generated = list(answer)
    for j, token in enumerate(tokens):
        generated.append(token)
        if token in eos_ids or len(generated) >= max_new_tokens:
            return j + 1, None
        choice = constrained_choice(constraint, generated, scores.go_on[i][j], scores.marks[i][j])
        if j + 1 == len(tokens) or choice != tokens[j + 1]:
            return j + 1, None if choice in eos_ids else choice
    raise AssertionError("a block is never empty")
