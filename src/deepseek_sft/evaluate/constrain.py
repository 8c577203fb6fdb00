"""Grammar-constrained greedy decoding of inline extraction answers (the text echoed with ⟦TYPE:…⟧ marks).

An inline answer has one valid shape: the input text, token for token, with marks inserted between tokens.
`EchoConstraint` allows at each step only what keeps that shape (the next text token, an opening mark when
outside a mark, the closing mark after at least one marked token, EOS once the text is used up), so the
model decides only where entities start and end and of which type; it can no longer misspell an entity or
drift from the text. Measured on the tiny default, the unconstrained echo kept the marks in the right places
but wrote likely names instead of the text's (``⟦PER:宋诺⟧`` for 史永).

Marks must be single tokens (base_model.tiny.tokenizer.label_tokens does this for the embedded tokenizer);
with a tokenizer where they are not, `echo_constraint` returns None and decoding stays unconstrained.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import LogitsProcessor

from ..config.data import TaskSpec
from ..tasks import MARK_CLOSE, MARK_OPEN, TYPE_SEP


class EchoConstraint:
    """Allowed next tokens of one inline answer, given the text's token ids."""

    def __init__(
        self, text_ids: Sequence[int], open_ids: Sequence[int], close_id: int, eos_ids: Sequence[int]
    ):
        self.text_ids = list(text_ids)
        self.open_ids = list(open_ids)
        self.close_id = close_id
        self.eos_ids = list(eos_ids)

    def state(self, generated: Sequence[int]) -> tuple[int, bool, int]:
        """(text tokens echoed, inside a mark, tokens inside the current mark) after `generated`."""
        echoed, inside, marked = 0, False, 0
        for token in generated:
            if token in self.open_ids and not inside:
                inside, marked = True, 0
            elif token == self.close_id and inside:
                inside = False
            elif echoed < len(self.text_ids) and token == self.text_ids[echoed]:
                echoed += 1
                marked += inside
        return echoed, inside, marked

    def allowed(self, generated: Sequence[int]) -> list[int]:
        """Token ids that keep the answer an echo of the text with well-formed marks."""
        echoed, inside, marked = self.state(generated)
        out = []
        if echoed < len(self.text_ids):
            out.append(self.text_ids[echoed])
            if not inside:
                out += self.open_ids
        if inside and marked:
            out.append(self.close_id)
        if echoed == len(self.text_ids) and not inside:
            out += self.eos_ids
        return out


def mark_token_ids(task: TaskSpec, tokenizer) -> tuple[list[int], int] | None:
    """Ids of the opening marks (one per entity type) and of the closing mark, or None unless each is one token."""
    if task.type != "extraction" or task.answer_format != "inline" or not task.entity_types:
        return None
    marks = [f"{MARK_OPEN}{kind}{TYPE_SEP}" for kind in task.entity_types] + [MARK_CLOSE]
    ids = [tokenizer(mark, add_special_tokens=False)["input_ids"] for mark in marks]
    if any(len(i) != 1 for i in ids):
        return None
    return [i[0] for i in ids[:-1]], ids[-1][0]


def echo_constraint(task: TaskSpec, tokenizer, text: str, eos_ids: Sequence[int]) -> EchoConstraint | None:
    """The constraint of `task`'s answer on `text`, or None (not inline extraction, or marks span tokens)."""
    marks = mark_token_ids(task, tokenizer)
    if marks is None:
        return None
    text_ids = tokenizer(text.strip(), add_special_tokens=False)["input_ids"]
    return EchoConstraint(text_ids, marks[0], marks[1], eos_ids)


class ConstrainedRows(LogitsProcessor):
    """Masks each constrained row of a batched generate() to its allowed tokens (None rows are free)."""

    def __init__(self, prompt_width: int, constraints: Sequence[EchoConstraint | None]):
        self.prompt_width = prompt_width
        self.constraints = list(constraints)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_width :].tolist()
        for row, constraint in enumerate(self.constraints):
            if constraint is None:
                continue
            keep = torch.tensor(constraint.allowed(generated[row]), dtype=torch.long, device=scores.device)
            masked = torch.full_like(scores[row], float("-inf"))
            masked[keep] = scores[row, keep]
            scores[row] = masked
        return scores
