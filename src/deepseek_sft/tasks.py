"""Tasks: how a processed record becomes a chat prompt and a response, and how a response parses back.

Shared by training (targets), evaluation and serving (parsing), so all three agree on one format.

Response formats (short, because the tiny default model pays for every token):
- classification: the label itself, e.g. ``card_loss``;
- extraction, ``answer_format: items``: ``TYPE:text`` items joined by ``|`` in reading order, e.g.
  ``ORG:招商银行|MONEY:5000元``; ``无`` (none) when there is no entity;
- extraction, ``answer_format: inline``: the input text echoed with each entity marked, e.g.
  ``在⟦ORG:招商银行⟧存了⟦MONEY:5000元⟧``. Longer, but every answer token is a copy of the text, so a small
  model learns to copy (and spans come out as exact positions);
- generation: the text itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config.data import TaskSpec

NO_ENTITY = "无"
ITEM_SEP = "|"
TYPE_SEP = ":"
MARK_OPEN = "⟦"  # U+27E6/U+27E7: brackets that financial text does not use, unlike 【】
MARK_CLOSE = "⟧"


@dataclass
class Parsed:
    """A parsed model answer; `ok` is False when the answer does not fit the task's format."""

    value: object
    ok: bool
    error: str = ""
    raw: str = ""
    spans: list[dict] = field(default_factory=list)


def build_messages(task: TaskSpec, text: str) -> list[dict]:
    """The chat messages (without the answer) that ask `task` about `text`."""
    return [{"role": "user", "content": f"{task.instruction}\n{text}"}]


def format_response(task: TaskSpec, record: dict) -> str:
    """The target answer for `record` under `task`."""
    value = record[task.field]
    if task.type == "extraction" and task.answer_format == "inline":
        return inline_markup(record["text"], value)
    if task.type == "extraction":
        ordered = sorted(value, key=lambda s: (s["start"], s["end"]))
        items = [f"{s['type']}{TYPE_SEP}{record['text'][s['start'] : s['end']]}" for s in ordered]
        return ITEM_SEP.join(items) if items else NO_ENTITY
    return str(value)


def inline_markup(text: str, spans: list[dict]) -> str:
    """`text` with every entity span wrapped as ⟦TYPE:surface⟧ (nested or overlapping spans: the first wins)."""
    out, cursor = [], 0
    for span in sorted(spans, key=lambda s: (s["start"], -s["end"])):
        if span["start"] < cursor:
            continue
        out += [text[cursor : span["start"]], f"{MARK_OPEN}{span['type']}{TYPE_SEP}"]
        out += [text[span["start"] : span["end"]], MARK_CLOSE]
        cursor = span["end"]
    out.append(text[cursor:])
    return "".join(out)


def answer_budget(task: TaskSpec, configured: int, text_tokens: int) -> int:
    """New-token budget of one answer. An inline extraction answer echoes its text, so it gets the text's
    token count plus `configured` (room for the marks); every other answer gets `configured`."""
    if task.type == "extraction" and task.answer_format == "inline":
        return text_tokens + configured
    return configured


def parse_response(task: TaskSpec, answer: str, text: str = "") -> Parsed:
    """Parse a generated answer; anything off-format is `ok=False` (and counts as wrong)."""
    answer = answer.strip()
    if task.type == "classification":
        return _parse_label(task, answer)
    if task.type == "extraction" and task.answer_format == "inline":
        return _parse_inline(task, answer, text)
    if task.type == "extraction":
        return _parse_entities(task, answer, text)
    return Parsed(value=answer, ok=bool(answer), error="" if answer else "empty answer", raw=answer)


def _parse_label(task: TaskSpec, answer: str) -> Parsed:
    if not answer:
        return Parsed(value=None, ok=False, error="empty answer", raw=answer)
    if task.labels is not None and answer not in task.labels:
        return Parsed(value=answer, ok=False, error=f"unknown label {answer!r}", raw=answer)
    return Parsed(value=answer, ok=True, raw=answer)


def _parse_entities(task: TaskSpec, answer: str, text: str) -> Parsed:
    if answer == NO_ENTITY:
        return Parsed(value=[], ok=True, raw=answer)
    if not answer:
        return Parsed(value=[], ok=False, error="empty answer", raw=answer)
    items, errors = [], []
    for item in answer.split(ITEM_SEP):
        kind, sep, surface = item.partition(TYPE_SEP)
        kind, surface = kind.strip(), surface.strip()
        if not sep or not kind or not surface:
            errors.append(f"item {item!r} is not TYPE:text")
        elif task.entity_types is not None and kind not in task.entity_types:
            errors.append(f"unknown entity type {kind!r}")
        else:
            items.append((kind, surface))
    spans = locate_spans(items, text) if text else []
    ok = not errors
    return Parsed(value=items, ok=ok, error="; ".join(errors), raw=answer, spans=spans)


def _parse_inline(task: TaskSpec, answer: str, text: str) -> Parsed:
    """Read ⟦TYPE:surface⟧ marks out of an echoed text; spans are exact when the echo equals `text`."""
    if not answer:
        return Parsed(value=[], ok=False, error="empty answer", raw=answer)
    plain, items, offsets, errors, cursor = [], [], [], [], 0
    while (opened := answer.find(MARK_OPEN, cursor)) >= 0:
        closed = answer.find(MARK_CLOSE, opened)
        plain.append(answer[cursor:opened])
        if closed < 0:
            errors.append(f"unclosed {MARK_OPEN} at {opened}")
            cursor = len(answer)
            break
        kind, sep, surface = answer[opened + 1 : closed].partition(TYPE_SEP)
        if not sep or not kind or not surface:
            errors.append(f"mark {answer[opened : closed + 1]!r} is not {MARK_OPEN}TYPE:text{MARK_CLOSE}")
        elif task.entity_types is not None and kind not in task.entity_types:
            errors.append(f"unknown entity type {kind!r}")
        else:
            items.append((kind, surface))
            offsets.append(sum(map(len, plain)))
        plain.append(surface)
        cursor = closed + 1
    plain.append(answer[cursor:])
    echo = "".join(plain)
    if MARK_CLOSE in echo:
        errors.append(f"{MARK_CLOSE} without {MARK_OPEN}")
    if text and echo == text:
        spans = [
            {"start": at, "end": at + len(surface), "type": kind, "text": surface}
            for at, (kind, surface) in zip(offsets, items, strict=True)
        ]
    else:  # the echo drifted from the input: place the marked surfaces as the items format does
        spans = locate_spans(items, text) if text else []
    return Parsed(value=items, ok=not errors, error="; ".join(errors), raw=answer, spans=spans)


def locate_spans(items: list[tuple[str, str]], text: str) -> list[dict]:
    """Map (type, surface) items onto character spans of `text`, searching left to right.

    Items whose surface is not in the text yield no span (they count as false positives).
    """
    spans, cursor = [], 0
    for kind, surface in items:
        pos = text.find(surface, cursor)
        if pos < 0:
            pos = text.find(surface)
        if pos < 0:
            continue
        spans.append({"start": pos, "end": pos + len(surface), "type": kind, "text": surface})
        cursor = pos + len(surface)
    return spans
