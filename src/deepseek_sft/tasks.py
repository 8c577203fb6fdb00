"""Tasks: how a processed record becomes a chat prompt and a response, and how a response parses back.

Shared by training (targets), evaluation and serving (parsing), so all three agree on one format.

Response formats (short, because the tiny default model pays for every token):
- classification: the label itself, e.g. ``card_loss``;
- extraction, ``answer_format: items``: ``TYPE:text`` items joined by ``|`` in reading order, e.g.
  ``ORG:招商银行|MONEY:5000元``; ``无`` (none) when there is no entity;
- extraction, ``answer_format: inline``: the input text echoed with each entity marked, e.g.
  ``在⟦ORG:招商银行⟧存了⟦MONEY:5000元⟧``. Longer, but every answer token is a copy of the text, so a small
  model learns to copy (and spans come out as exact positions);
- extraction, ``answer_format: tagged``: the input text echoed with a tag after every entity character:
  ``⟨TYPE⟩`` after the first, ``⟨+⟩`` after each further one, e.g. ``在招⟨ORG⟩商⟨+⟩银⟨+⟩行⟨+⟩存了``. Each tag
  is decided right after its character is written, so a left-to-right model sees the character it labels;
  with inline marks it must decide where a name starts or ends before it sees the next character;
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
TAG_OPEN = "⟨"  # U+27E8/U+27E9, as rare in financial text as the marks
TAG_CLOSE = "⟩"
TAG_CONTINUE = "+"  # ⟨+⟩: this character continues the entity of the character before it


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
    user = {"role": "user", "content": f"{task.instruction}\n{text}"}
    return [{"role": "system", "content": task.system_prompt}, user] if task.system_prompt else [user]


def format_response(task: TaskSpec, record: dict) -> str:
    """The target answer for `record` under `task`."""
    value = record[task.field]
    if task.type == "extraction" and task.answer_format == "inline":
        return inline_markup(record["text"], value)
    if task.type == "extraction" and task.answer_format == "tagged":
        return tagged_markup(record["text"], value)
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


def entity_tag(kind: str) -> str:
    """The tag after an entity's first character (⟨PER⟩); `TAG_CONTINUE` gives the continuation tag ⟨+⟩."""
    return f"{TAG_OPEN}{kind}{TAG_CLOSE}"


def tagged_markup(text: str, spans: list[dict]) -> str:
    """`text` with ⟨TYPE⟩ after each span's first character and ⟨+⟩ after every further one (nested or
    overlapping spans: the first wins)."""
    tags: dict[int, str] = {}
    cursor = 0
    for span in sorted(spans, key=lambda s: (s["start"], -s["end"])):
        if span["start"] < cursor or span["end"] <= span["start"]:
            continue
        tags[span["start"]] = entity_tag(span["type"])
        tags.update({i: entity_tag(TAG_CONTINUE) for i in range(span["start"] + 1, span["end"])})
        cursor = span["end"]
    return "".join(char + tags.get(i, "") for i, char in enumerate(text))


def echoes_text(task: TaskSpec) -> bool:
    """Whether `task`'s answer is its input text echoed with marks or tags (inline or tagged extraction)."""
    return task.type == "extraction" and task.answer_format in ("inline", "tagged")


def answer_budget(task: TaskSpec, configured: int, text_tokens: int) -> int:
    """New-token budget of one answer. An inline or tagged extraction answer echoes its text, so it gets the
    text's token count plus `configured` (room for the marks or tags); every other answer gets `configured`."""
    if echoes_text(task):
        return text_tokens + configured
    return configured


def parse_response(task: TaskSpec, answer: str, text: str = "") -> Parsed:
    """Parse a generated answer; anything off-format is `ok=False` (and counts as wrong)."""
    answer = answer.strip()
    if task.type == "classification":
        return _parse_label(task, answer)
    if task.type == "extraction" and task.answer_format == "inline":
        return _parse_inline(task, answer, text)
    if task.type == "extraction" and task.answer_format == "tagged":
        return _parse_tagged(task, answer, text)
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


def _parse_tagged(task: TaskSpec, answer: str, text: str) -> Parsed:
    """Read ⟨TYPE⟩ / ⟨+⟩ tags out of an echoed text; spans are exact when the echo equals `text`."""
    if not answer:
        return Parsed(value=[], ok=False, error="empty answer", raw=answer)
    echo, spans, errors, cursor = [], [], [], 0
    tagged_last = False  # whether the character before the current tag position carries a tag
    while cursor < len(answer):
        opened = answer.find(TAG_OPEN, cursor)
        plain = answer[cursor : opened if opened >= 0 else len(answer)]
        echo.append(plain)
        tagged_last = tagged_last and not plain
        if opened < 0:
            break
        closed = answer.find(TAG_CLOSE, opened)
        if closed < 0:
            errors.append(f"unclosed {TAG_OPEN} at {opened}")
            break
        kind, at = answer[opened + 1 : closed], sum(map(len, echo)) - 1
        cursor = closed + 1
        if at < 0 or (not plain and (tagged_last or opened == 0)):
            errors.append(f"tag {answer[opened:cursor]!r} at {opened} follows no character")
        elif kind == TAG_CONTINUE:
            if not spans or spans[-1]["end"] != at:
                errors.append(f"{entity_tag(TAG_CONTINUE)} at {opened} continues no entity")
            else:
                spans[-1]["end"] = at + 1
        elif task.entity_types is not None and kind not in task.entity_types:
            errors.append(f"unknown entity type {kind!r}")
        else:
            spans.append({"start": at, "end": at + 1, "type": kind})
        tagged_last = True
    echo = "".join(echo)
    if TAG_CLOSE in echo:
        errors.append(f"{TAG_CLOSE} without {TAG_OPEN}")
    items = [(s["type"], echo[s["start"] : s["end"]]) for s in spans]
    if text and echo == text:
        spans = [s | {"text": surface} for s, (_, surface) in zip(spans, items, strict=True)]
    else:  # the echo drifted from the input: place the tagged surfaces as the items format does
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
