"""Grammar-constrained greedy decoding of echo answers: inline (⟦TYPE:…⟧ marks) and tagged (⟨TYPE⟩/⟨+⟩) extraction.

Both answer formats have one valid shape: the input text, token for token, with marks or tags in between.
A constraint allows at each step only what keeps that shape, so the model decides only where entities are
and of which type; it can no longer misspell an entity or drift from the text. Measured on the tiny default,
the unconstrained inline echo kept the marks in the right places but wrote likely names instead of the
text's (``⟦PER:宋诺⟧`` for 史永).

The choice at each step is "a mark (or tag) here" against "go on with the text". The text token is forced,
so `ConstrainedRows` scores "go on" with the model's probability of *any* non-mark token, not of the one
text token: a small model that cannot look ahead in the prompt gives the next character a low probability
and would otherwise open marks wherever the next character is hard to guess (inline entity precision 0.55
-> 0.76 on the tiny default, 400 test records).

Marks and tags must be single tokens (base_model.tiny.tokenizer.label_tokens does this for the embedded
tokenizer); with a tokenizer where they are not, `echo_constraint` returns None and decoding stays free.
A text that itself holds a mark or tag token has no answer of that shape (its echo would read as markup),
so it is decoded free too (the service refuses such texts up front).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import LogitsProcessor

from ..config.data import TaskSpec
from ..tasks import MARK_CLOSE, MARK_OPEN, TAG_CONTINUE, TYPE_SEP, echoes_text, entity_tag


class EchoConstraint:
    """Allowed next tokens of one inline answer, given the text's token ids."""

    def __init__(
        self, text_ids: Sequence[int], open_ids: Sequence[int], close_id: int, eos_ids: Sequence[int]
    ):
        self.text_ids = list(text_ids)
        self.open_ids = list(open_ids)
        self.close_id = close_id
        self.eos_ids = list(eos_ids)
        self.marks = frozenset([*self.open_ids, close_id])

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


class TagConstraint:
    """Allowed next tokens of one tagged answer: the text's tokens, grouped per character (a rare character
    may be several byte tokens), with one optional tag after each complete character."""

    def __init__(
        self,
        char_tokens: Sequence[Sequence[int]],
        start_ids: Sequence[int],
        continue_id: int,
        eos_ids: Sequence[int],
    ):
        self.text_ids = [tok for char in char_tokens for tok in char]
        ends, at = set(), 0
        for char in char_tokens:
            at += len(char)
            ends.add(at)
        self.char_ends = frozenset(ends)  # echoed-token counts at which a character is complete
        self.start_ids = list(start_ids)
        self.continue_id = continue_id
        self.eos_ids = list(eos_ids)
        self.marks = frozenset([*self.start_ids, continue_id])

    def state(self, generated: Sequence[int]) -> tuple[int, bool, bool]:
        """(text tokens echoed, last complete character tagged, the character before it tagged)."""
        echoed, tagged, before = 0, False, False
        for token in generated:
            if token in self.marks and echoed in self.char_ends and not tagged:
                tagged = True
            elif echoed < len(self.text_ids) and token == self.text_ids[echoed]:
                echoed += 1
                if echoed in self.char_ends:
                    tagged, before = False, tagged
        return echoed, tagged, before

    def allowed(self, generated: Sequence[int]) -> list[int]:
        """Token ids that keep the answer an echo of the text with well-placed tags."""
        echoed, tagged, before = self.state(generated)
        out = []
        if echoed in self.char_ends and not tagged:
            out += self.start_ids
            if before:
                out.append(self.continue_id)
        out += [self.text_ids[echoed]] if echoed < len(self.text_ids) else self.eos_ids
        return out


Constraint = EchoConstraint | TagConstraint


def _single_token_ids(tokenizer, words: Sequence[str]) -> list[int] | None:
    ids = [tokenizer(word, add_special_tokens=False)["input_ids"] for word in words]
    return None if any(len(i) != 1 for i in ids) else [i[0] for i in ids]


def mark_token_ids(task: TaskSpec, tokenizer) -> tuple[list[int], int] | None:
    """Ids of the opening marks / start tags (one per entity type) and of the closing mark / continuation
    tag, or None unless the task echoes its text and each of them is one token."""
    if not echoes_text(task) or not task.entity_types:
        return None
    if task.answer_format == "inline":
        words = [f"{MARK_OPEN}{kind}{TYPE_SEP}" for kind in task.entity_types] + [MARK_CLOSE]
    else:
        words = [entity_tag(kind) for kind in task.entity_types] + [entity_tag(TAG_CONTINUE)]
    ids = _single_token_ids(tokenizer, words)
    return None if ids is None else (ids[:-1], ids[-1])


def character_tokens(tokenizer, text: str) -> list[list[int]] | None:
    """The token ids of `text` grouped per character (a rare character may be several byte tokens), or None
    when the tokenizer gives no offsets. A token of several characters (``APP``, ``!!``) is one group: a tag
    can only follow it whole, and then labels its last character, as the answer's text would read."""
    try:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:  # slow tokenizers have no offsets
        return None
    groups: list[list[int]] = []
    last = None
    for token, span in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True):
        if tuple(span) != last:
            groups.append([])
        groups[-1].append(token)
        last = tuple(span)
    return groups


def echo_constraints(
    task: TaskSpec, tokenizer, texts: Sequence[str], eos_ids: Sequence[int]
) -> list[Constraint | None] | None:
    """The constraint of `task`'s answer on each of `texts` (EchoConstraint or TagConstraint), or None when
    the task does not echo its text or its marks are not single tokens (looked up once, not per text). A
    tagged text gets None when the tokenizer gives no offsets."""
    marks = mark_token_ids(task, tokenizer)
    if marks is None:
        return None
    reserved = {*marks[0], marks[1]}
    out: list[Constraint | None] = []
    for text in texts:
        text = text.strip()
        if task.answer_format == "inline":
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            out.append(None if reserved & set(ids) else EchoConstraint(ids, *marks, eos_ids))
        else:
            chars = character_tokens(tokenizer, text)
            holds_marks = chars is None or any(reserved & set(char) for char in chars)
            out.append(None if holds_marks else TagConstraint(chars, *marks, eos_ids))
    return out


def echo_constraint(task: TaskSpec, tokenizer, text: str, eos_ids: Sequence[int]) -> Constraint | None:
    """`echo_constraints` of one text (a serving request)."""
    constraints = echo_constraints(task, tokenizer, [text], eos_ids)
    return None if constraints is None else constraints[0]


def _go_on(constraint: Constraint, allowed: Sequence[int]) -> int:
    """The one allowed non-mark token. A ValueError, not a bare `next()`: a StopIteration escaping a logits
    processor cannot be set on an asyncio Future, and the service's request waited forever."""
    for token in allowed:
        if token not in constraint.marks:
            return token
    raise ValueError(
        f"the constraint allows no text token or EOS here (only marks {allowed}); text holds a mark?"
    )


def constrained_scores(
    constraint: Constraint, generated: Sequence[int], scores: torch.Tensor
) -> torch.Tensor:
    """One row's next-token scores restricted to what `constraint` allows after `generated`.

    The one allowed non-mark token (the next text token, or EOS at the end) takes the probability of every
    non-mark token, so the choice is "mark here or not", not "mark or this exact character" (module doc).
    """
    allowed = constraint.allowed(generated)
    marks = [t for t in allowed if t in constraint.marks]
    go_on = _go_on(constraint, allowed)
    not_mark = torch.ones_like(scores, dtype=torch.bool)
    not_mark[list(constraint.marks)] = False
    masked = torch.full_like(scores, float("-inf"))
    masked[marks] = scores[marks]
    masked[go_on] = torch.logsumexp(scores[not_mark], dim=0)
    return masked


def constrained_choice(constraint: Constraint, generated: Sequence[int], go_on_score: float, scores) -> int:
    """The token `constrained_scores(...).argmax()` picks: the allowed mark with the highest score, or the
    one allowed non-mark token scored `go_on_score` (lowest id first on ties, as argmax)."""
    allowed = constraint.allowed(generated)
    go_on = _go_on(constraint, allowed)
    options = [(go_on_score, go_on)] + [(scores[t], t) for t in allowed if t in constraint.marks]
    return max(options, key=lambda option: (option[0], -option[1]))[1]


class ConstrainedRows(LogitsProcessor):
    """Restricts each constrained row of a batched generate() with `constrained_scores` (None rows are free)."""

    def __init__(self, prompt_width: int, constraints: Sequence[Constraint | None]):
        self.prompt_width = prompt_width
        self.constraints = list(constraints)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_width :].tolist()
        for row, constraint in enumerate(self.constraints):
            if constraint is not None:
                scores[row] = constrained_scores(constraint, generated[row], scores[row])
        return scores
