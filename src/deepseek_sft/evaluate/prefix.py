"""Can a partial answer still parse? Lets generation stop a row as soon as its answer is certain to be wrong.

`viable_prefix(task, text)` is False only when *no* continuation of `text` can satisfy
tasks.parse_response, so stopping there never changes a score: the answer is unparseable either way
(it is still kept and listed). It errs on the side of True. This matters most for an untrained base model,
whose random tokens would otherwise run to max_new_tokens on every prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..config.data import TaskSpec
from ..tasks import (
    ITEM_SEP,
    MARK_CLOSE,
    MARK_OPEN,
    NO_ENTITY,
    TAG_CLOSE,
    TAG_CONTINUE,
    TAG_OPEN,
    TYPE_SEP,
    parse_response,
)

REPLACEMENT = "\ufffd"  # a multi-byte character cut between byte-level tokens decodes to this, for now


def _complete_or_prefix(text: str, options: Sequence[str]) -> bool:
    # text may still grow into an option, or is an option followed only by whitespace (parse strips it)
    return any(
        opt.startswith(text) or (text.startswith(opt) and not text[len(opt) :].strip()) for opt in options
    )


def _viable_item(item: str, types: Sequence[str] | None, last: bool) -> bool:
    kind, sep, surface = item.partition(TYPE_SEP)
    kind = kind.strip()
    if not sep:  # still typing the type (only the last item may be unfinished)
        return last and (not kind or types is None or any(t.startswith(kind) for t in types))
    if not kind or (types is not None and kind not in types):
        return False
    return last or bool(surface.strip())


def _viable_inline(text: str, types: Sequence[str] | None) -> bool:
    cursor = 0
    while (opened := text.find(MARK_OPEN, cursor)) >= 0:
        if MARK_CLOSE in text[cursor:opened]:
            return False
        closed = text.find(MARK_CLOSE, opened)
        kind, sep, surface = text[opened + 1 : closed if closed >= 0 else len(text)].partition(TYPE_SEP)
        if closed < 0:  # the last mark is still being written
            if not sep:
                return types is None or any(t.startswith(kind) for t in types)
            return bool(kind) and (types is None or kind in types)
        if not kind or not sep or not surface or (types is not None and kind not in types):
            return False
        cursor = closed + 1
    return MARK_CLOSE not in text[cursor:]


def _viable_tagged(task: TaskSpec, text: str) -> bool:
    opened = text.rfind(TAG_OPEN)
    if opened >= 0 and TAG_CLOSE not in text[opened:]:  # the last tag is still being written
        kinds = [*(task.entity_types or []), TAG_CONTINUE]
        if task.entity_types is not None and not any(k.startswith(text[opened + 1 :]) for k in kinds):
            return False
        text = text[:opened]
    return not text or parse_response(task, text).ok


def viable_prefix(task: TaskSpec, text: str) -> bool:
    """False only if every continuation of the partial answer `text` fails tasks.parse_response."""
    text = text.lstrip().rstrip(REPLACEMENT)
    if task.type == "classification":
        return task.labels is None or _complete_or_prefix(text, task.labels)
    if task.type == "extraction" and task.answer_format == "inline":
        return _viable_inline(text, task.entity_types)
    if task.type == "extraction" and task.answer_format == "tagged":
        return _viable_tagged(task, text)
    if task.type != "extraction" or not text or _complete_or_prefix(text, [NO_ENTITY]):
        return True
    items = text.split(ITEM_SEP)
    return all(
        _viable_item(item, task.entity_types, last=i == len(items) - 1) for i, item in enumerate(items)
    )


def answer_stop(task: TaskSpec, tokenizer) -> Callable[[Sequence[int]], bool] | None:
    """A stop test on answer tokens (True = can no longer parse), or None for free-text tasks."""
    if task.type == "generation" or (task.type == "classification" and task.labels is None):
        return None

    def stop(tokens: Sequence[int]) -> bool:
        return not viable_prefix(task, tokenizer.decode(list(tokens), skip_special_tokens=True))

    return stop
