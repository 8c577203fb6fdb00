"""Validation for stage clean: what makes a raw record (or one annotator's labels) unusable, and why.

A record-level problem (no id, no text, an unknown split, unreadable input) rejects the record. A problem
in one annotator's labels (a bad span, an unknown label, a span whose stated text is not the text at its
offsets) drops only that annotation: the record stays with the annotators left, and the dropped
annotation is logged with its annotator (clean.py). When no annotator is left, the record is rejected.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .config.data import TaskSpec
from .records import SPLITS

REASONS: dict[str, str] = {
    "undecodable": "line holds bytes that are not valid UTF-8 (or lone surrogates)",
    "malformed_json": "line is not valid JSON",
    "fetch_error": "fetch could not turn the input into a record (its `_error` says why)",
    "not_object": "line is JSON but not an object",
    "missing_id": "no usable 'id' (string or integer)",
    "missing_text": "no 'text' key",
    "text_not_string": "'text' is not a string",
    "empty_text": "'text' is empty or only whitespace",
    "unknown_split": "'split' (the dataset's own split) is empty or not train, val or test",
    "no_annotations": "no annotator labelled any task field",
    "bad_annotations": "'annotations' is not an object of annotator -> object",
    "invalid_label": "a classification/generation value is not a string",
    "unknown_label": "a classification label not in tasks.<name>.labels",
    "span_invalid": "entities is not a list of {start, end, type} objects",
    "span_not_int": "span start/end is not an integer",
    "span_start_ge_end": "span start >= end",
    "span_out_of_range": "span offsets outside the text",
    "span_text_mismatch": "a span states its text and text[start:end] is not it (also not as UTF-16 offsets)",
    "unknown_entity_type": "an entity type not in tasks.<name>.entity_types",
    "too_short": "cleaned text shorter than clean.min_chars",
    "too_long": "cleaned text longer than clean.max_chars",
    "duplicate_id": "id already used by an earlier kept record with a different text",
}
DUPLICATE_REASONS = ("duplicate_exact", "duplicate_near")
# fetch passes unreadable input on as {"_error": ...}; its message prefix tells which reject it is
FETCH_ERRORS = (
    ("not valid UTF-8", "undecodable"),
    ("invalid JSON", "malformed_json"),
    ("expected a JSON object", "not_object"),
)


class Rejected(Exception):
    """A record that cannot be used: `reason` is a REASONS code, `detail` says what was found."""

    def __init__(self, reason: str, detail: str, **extra: Any):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.extra = reason, detail, extra


def printable_line(line: str) -> str:
    """The line with undecodable bytes shown as \\xNN, so the rejects file is valid UTF-8."""
    return line.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def parse_line(line: str) -> dict:
    """Parse one raw line into a record object, or raise Rejected."""
    if _has_surrogates(line):
        raise Rejected("undecodable", "invalid UTF-8 bytes in the line")
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise Rejected("malformed_json", f"{e.msg} at column {e.colno}") from None
    if not isinstance(obj, dict):
        raise Rejected("not_object", f"expected a JSON object, got {type(obj).__name__}")
    if "_error" in obj or "_raw_line" in obj:
        raise _fetch_error(obj, line)
    if _has_surrogates(json.dumps(obj, ensure_ascii=False)):
        raise Rejected("undecodable", "a string holds a lone surrogate (\\ud8xx escape)")
    return obj


def _fetch_error(obj: dict, line: str) -> Rejected:
    """The reject for a record fetch marked unreadable (see fetch/local.py: `_error`, `_raw_line`, meta)."""
    error = str(obj.get("_error", "unparsable input"))
    reason = next((code for prefix, code in FETCH_ERRORS if error.startswith(prefix)), "fetch_error")
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    place = describe_place(meta)
    detail = f"{place}: {error}" if place else error
    raw = printable_line(str(obj.get("_raw_line", line)))
    return Rejected(reason, detail, id=obj.get("id"), source_line=raw, origin=origin_of(meta))


PLACE_KEYS = ("file", "line", "row", "item", "task", "lines", "rows")


def origin_of(meta: Any) -> dict:
    """Where in the user's own file a record came from (fetch's meta: file plus line/row/item/task)."""
    return {k: meta[k] for k in PLACE_KEYS if k in meta} if isinstance(meta, dict) else {}


def describe_place(meta: Any) -> str:
    """'data/x.csv:12 (row 11)', 'export.json task 3', ... or '' when fetch recorded no file."""
    origin = origin_of(meta)
    if "file" not in origin:
        return ""
    place = str(origin["file"])
    if "line" in origin:
        place += f":{origin['line']}"
    elif origin.get("lines"):
        place += f":{origin['lines'][0]}"
    for unit in ("row", "item", "task"):
        if unit in origin:
            place += f" ({unit} {origin[unit]})" if "line" in origin else f" {unit} {origin[unit]}"
    return place


def _check_text(record: dict) -> str:
    ident = record.get("id")
    if isinstance(ident, bool) or not isinstance(ident, str | int) or ident == "":
        raise Rejected("missing_id", f"id={ident!r}; expected a non-empty string or an integer")
    if "text" not in record:
        raise Rejected("missing_text", "no 'text' key")
    text = record["text"]
    if not isinstance(text, str):
        raise Rejected("text_not_string", f"text is {type(text).__name__}, expected a string")
    if not text.strip():
        raise Rejected("empty_text", "text is empty or only whitespace")
    return text


def span_fields(annotation: dict, tasks: dict[str, TaskSpec]) -> list[str]:
    """Annotation fields holding spans: extraction-task fields plus any undeclared list of span objects."""
    declared = {t.field for t in tasks.values() if t.type == "extraction"}
    other = {t.field for t in tasks.values() if t.type != "extraction"}
    guessed = {
        key
        for key, value in annotation.items()
        if key not in other
        and isinstance(value, list)
        and value
        and all(isinstance(v, dict) for v in value)
        and all("start" in v and "end" in v for v in value)
    }
    return sorted((declared & annotation.keys()) | guessed)


def _check_spans(spans: Any, text: str, where: str, allowed: list[str] | None) -> None:
    if not isinstance(spans, list):
        raise Rejected("span_invalid", f"{where} is {type(spans).__name__}, expected a list of spans")
    for i, span in enumerate(spans):
        at = f"{where}[{i}]"
        if not isinstance(span, dict) or not isinstance(span.get("type"), str):
            raise Rejected("span_invalid", f"{at}={span!r}; expected {{start, end, type}}")
        start, end = span.get("start"), span.get("end")
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in (start, end)):
            raise Rejected("span_not_int", f"{at}: start={start!r} end={end!r}; expected integers")
        if start >= end:
            raise Rejected("span_start_ge_end", f"{at}: start={start} >= end={end}")
        if start < 0 or end > len(text):
            raise Rejected("span_out_of_range", f"{at}: [{start}, {end}) outside text of length {len(text)}")
        if isinstance(span.get("text"), str) and text[start:end] != span["text"]:
            raise Rejected(
                "span_text_mismatch",
                f"{at}: text[{start}:{end}]={text[start:end]!r} but the span says {span['text']!r}",
            )
        if allowed is not None and span["type"] not in allowed:
            raise Rejected(
                "unknown_entity_type", f"{at}: type {span['type']!r}; allowed: {', '.join(allowed)}"
            )


def _check_annotation(name: str, annotation: Any, text: str, tasks: dict[str, TaskSpec]) -> int:
    """Validate one annotator's labels; return how many task fields it fills, or raise Rejected."""
    if not isinstance(annotation, dict):
        raise Rejected(
            "bad_annotations", f"annotations.{name} is {type(annotation).__name__}, expected an object"
        )
    filled = 0
    for task in tasks.values():
        value = annotation.get(task.field)
        where = f"annotations.{name}.{task.field}"
        if value is None:
            continue
        filled += 1
        if task.type == "extraction":
            _check_spans(value, text, where, task.entity_types)
        elif not isinstance(value, str):
            hint = (
                "; a list of labels (multi-label): set fetch.local.multi_label_join"
                if isinstance(value, list)
                else ""
            )
            raise Rejected("invalid_label", f"{where}={value!r}; expected a string{hint}")
        elif task.type == "classification" and task.labels is not None and value not in task.labels:
            raise Rejected("unknown_label", f"{where}={value!r}; allowed: {', '.join(task.labels)}")
    for key in span_fields(annotation, tasks):
        if key not in {t.field for t in tasks.values()}:
            _check_spans(annotation[key], text, f"annotations.{name}.{key}", None)
    return filled


def _check_split(record: dict) -> None:
    if "split" in record and record["split"] not in SPLITS:
        raise Rejected(
            "unknown_split",
            f"split={record['split']!r}; expected one of {', '.join(SPLITS)} (or training, validation, dev, "
            "testing); check the split column",
        )


@dataclass
class Validated:
    """A usable record: its text, the record with its usable annotations, and the annotations dropped."""

    text: str
    record: dict
    dropped: list[tuple[str, Rejected]]


def validate_record(record: dict, tasks: dict[str, TaskSpec]) -> Validated:
    """Check a parsed record against the raw-record contract and `tasks`.

    One annotator's bad labels drop that annotation only; the record is rejected (Rejected raised) when it
    is unusable itself or no annotator with usable labels is left.
    """
    text = _check_text(record)
    _check_split(record)
    annotations = record.get("annotations")
    if not annotations:
        raise Rejected("no_annotations", "'annotations' is missing or empty")
    if not isinstance(annotations, dict):
        raise Rejected("bad_annotations", "expected {annotator: {field: label, ...}, ...}")
    kept, dropped, filled = {}, [], 0
    for name, annotation in annotations.items():
        try:
            filled += _check_annotation(name, annotation, text, tasks)
        except Rejected as err:
            dropped.append((name, err))
            continue
        kept[name] = annotation
    if not kept:
        name, first = dropped[0]
        others = f" (and {len(dropped) - 1} more annotator(s) with errors)" if len(dropped) > 1 else ""
        raise Rejected(first.reason, first.detail + others, **first.extra)
    if filled == 0:
        fields = ", ".join(t.field for t in tasks.values())
        raise Rejected("no_annotations", f"no annotator filled any task field ({fields})")
    usable = record if not dropped else {**record, "annotations": kept}
    return Validated(text=text, record=usable, dropped=dropped)
