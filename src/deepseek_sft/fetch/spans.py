"""Entity spans as users' files write them -> the record shape [{start, end, type(, text)}] (records.py).

Accepted shapes of an extraction column (a JSON string of them too):
- [{start, end, type}]            this project's own shape (kept as is);
- [{start, end, label}]           doccano / Label Studio-like objects (`label` becomes `type`);
- [[start, end, label], ...]      doccano JSONL and spaCy-style triples;
- {name: {span: [start, end], text}}  a map of named spans (NLU++ slots; the name becomes the type); a
                                      name may also hold a list of such objects.
A span that says its text keeps it under `text`; clean rejects the record's annotation when
text[start:end] is not that text (span_text_mismatch). Anything else passes through unchanged for clean
to reject with a reason (span_invalid, span_not_int, ...): fetch never guesses.

Offsets counted in UTF-16 code units (JavaScript tools, some Label Studio versions) drift by one after
every character outside the Basic Multilingual Plane (emoji, rare CJK). When a span's stated text does
not match its offsets but does match them read as UTF-16 units, they are converted (utf16_to_chars).
"""

from __future__ import annotations

from typing import Any


def canonical_spans(value: Any) -> Any:
    """`value` in the record shape when it is one of the accepted shapes, else `value` unchanged."""
    if isinstance(value, dict):
        return [span for name, entry in value.items() for span in _named(str(name), entry)]
    if not isinstance(value, list):
        return value
    return [_one(item) for item in value]


def _one(item: Any) -> Any:
    if isinstance(item, list | tuple) and len(item) == 3 and isinstance(item[2], str):
        return {"start": item[0], "end": item[1], "type": item[2]}
    if isinstance(item, dict) and "type" not in item and "label" in item:
        return {**{k: v for k, v in item.items() if k != "label"}, "type": item["label"]}
    return item


def _named(name: str, entry: Any) -> list[Any]:
    """The spans of one named entry: {span: [start, end], text} or a list of those."""
    if isinstance(entry, list):
        return [s for e in entry for s in _named(name, e)]
    if not isinstance(entry, dict):
        return [{"start": None, "end": None, "type": name, "given": entry}]
    bounds = entry.get("span")
    if isinstance(bounds, list | tuple) and len(bounds) == 2:
        start, end = bounds
    else:
        start, end = entry.get("start"), entry.get("end")
    span: dict[str, Any] = {"start": start, "end": end, "type": name}
    if isinstance(entry.get("text"), str):
        span["text"] = entry["text"]
    return [span]


def utf16_to_chars(text: str, offset: int) -> int | None:
    """The character offset of UTF-16 code-unit offset `offset` in `text` (None if it splits a pair)."""
    units = 0
    for i, char in enumerate(text):
        if units == offset:
            return i
        units += 2 if ord(char) > 0xFFFF else 1
        if units > offset:
            return None
    return len(text) if units == offset else None


def align_to_text(text: Any, spans: Any) -> tuple[Any, int]:
    """Spans whose stated text matches only as UTF-16 offsets, converted; and how many were converted."""
    if not isinstance(text, str) or not isinstance(spans, list):
        return spans, 0
    out, converted = [], 0
    for span in spans:
        fixed = _from_utf16(text, span)
        converted += fixed is not span
        out.append(fixed)
    return out, converted


def _from_utf16(text: str, span: Any) -> Any:
    if not isinstance(span, dict) or not isinstance(span.get("text"), str):
        return span
    start, end = span.get("start"), span.get("end")
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in (start, end)):
        return span
    if text[start:end] == span["text"]:
        return span
    new_start, new_end = utf16_to_chars(text, start), utf16_to_chars(text, end)
    if new_start is None or new_end is None or text[new_start:new_end] != span["text"]:
        return span  # clean rejects it: span_text_mismatch
    return {**span, "start": new_start, "end": new_end}
