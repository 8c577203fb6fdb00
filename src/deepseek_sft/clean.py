"""Stage clean: validate raw records, normalise their text, re-align entity spans, reject and deduplicate.

Every input line ends in exactly one of three places, and the counts are asserted to add up:
kept (data/interim/clean.jsonl), rejected (a reason code, see REASONS) or duplicate (exact / near; the first
occurrence is kept). Rejects and duplicates both go to the rejects file with the source line number and the
original line, so nothing is lost silently; the metrics count duplicates apart from rejects.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .clean_rules import Deduplicator, Mapped, clean_text, language_check, realign_span
from .config import StageParams
from .config.data import CleanParams, TaskSpec
from .io import DataError, atomic_path, iter_jsonl_lines, write_jsonl, write_metrics
from .records import SPLITS

log = logging.getLogger(__name__)

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


@dataclass
class CleanResult:
    """What stage clean produced: kept records, rejects (incl. duplicates), metrics and kept text lengths."""

    kept: list[dict] = field(default_factory=list)
    rejects: list[dict] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    lengths: list[int] = field(default_factory=list)


# ---------------------------------------------------------------- parsing and validation


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
    place = ":".join(str(meta[k]) for k in ("file", "line", "row", "task") if k in meta)
    detail = f"{place}: {error}" if place else error
    raw = printable_line(str(obj.get("_raw_line", line)))
    return Rejected(reason, detail, id=obj.get("id"), source_line=raw, origin=meta)


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


def _check_spans(spans: Any, text_len: int, where: str, allowed: list[str] | None) -> None:
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
        if start < 0 or end > text_len:
            raise Rejected("span_out_of_range", f"{at}: [{start}, {end}) outside text of length {text_len}")
        if allowed is not None and span["type"] not in allowed:
            raise Rejected(
                "unknown_entity_type", f"{at}: type {span['type']!r}; allowed: {', '.join(allowed)}"
            )


def _check_annotation(name: str, annotation: dict, text_len: int, tasks: dict[str, TaskSpec]) -> int:
    """Validate one annotator's labels; return how many task fields it fills."""
    filled = 0
    for task in tasks.values():
        value = annotation.get(task.field)
        where = f"annotations.{name}.{task.field}"
        if value is None:
            continue
        filled += 1
        if task.type == "extraction":
            _check_spans(value, text_len, where, task.entity_types)
        elif not isinstance(value, str):
            raise Rejected("invalid_label", f"{where}={value!r}; expected a string")
        elif task.type == "classification" and task.labels is not None and value not in task.labels:
            raise Rejected("unknown_label", f"{where}={value!r}; allowed: {', '.join(task.labels)}")
    for key in span_fields(annotation, tasks):
        if key not in {t.field for t in tasks.values()}:
            _check_spans(annotation[key], text_len, f"annotations.{name}.{key}", None)
    return filled


def _check_split(record: dict) -> None:
    if "split" in record and record["split"] not in SPLITS:
        raise Rejected(
            "unknown_split",
            f"split={record['split']!r}; expected one of {', '.join(SPLITS)} (or training, validation, dev, "
            "testing); check the split column",
        )


def validate_record(record: dict, tasks: dict[str, TaskSpec]) -> str:
    """Check a parsed record against the raw-record contract and `tasks`; return its text or raise Rejected."""
    text = _check_text(record)
    _check_split(record)
    annotations = record.get("annotations")
    if not annotations:
        raise Rejected("no_annotations", "'annotations' is missing or empty")
    if not isinstance(annotations, dict) or not all(isinstance(a, dict) for a in annotations.values()):
        raise Rejected("bad_annotations", "expected {annotator: {field: label, ...}, ...}")
    filled = sum(_check_annotation(name, ann, len(text), tasks) for name, ann in annotations.items())
    if filled == 0:
        fields = ", ".join(t.field for t in tasks.values())
        raise Rejected("no_annotations", f"no annotator filled any task field ({fields})")
    return text


# ---------------------------------------------------------------- cleaning one record


@dataclass
class SpanStats:
    """Counts of span re-alignment over the whole file."""

    total: int = 0
    realigned: int = 0
    dropped: int = 0


def realign_annotations(record: dict, m: Mapped, tasks: dict[str, TaskSpec], stats: SpanStats) -> dict:
    """Copy of `record` with the cleaned text and every annotator's spans moved onto it."""
    text = m.text
    annotations, dropped = {}, []
    for name, ann in record["annotations"].items():
        ann = dict(ann)
        for key in span_fields(ann, tasks):
            moved = []
            for span in ann[key]:
                stats.total += 1
                new = realign_span(span["start"], span["end"], m)
                if new is None:  # every character of the span was removed by cleaning
                    stats.dropped += 1
                    dropped.append({"annotator": name, "field": key, **span})
                    continue
                stats.realigned += new != (span["start"], span["end"])
                moved.append({**span, "start": new[0], "end": new[1]})
                if "text" in span:
                    moved[-1]["text"] = text[new[0] : new[1]]
            ann[key] = moved
        annotations[name] = ann
    out = {**record, "text": text, "annotations": annotations}
    if dropped and isinstance(record.get("meta", {}), dict):
        out["meta"] = {**record.get("meta", {}), "clean_dropped_spans": dropped}
    return out


def _check_length(text: str, params: CleanParams) -> None:
    if len(text) < params.min_chars:
        raise Rejected("too_short", f"{len(text)} chars after cleaning < min_chars={params.min_chars}")
    if len(text) > params.max_chars:
        raise Rejected("too_long", f"{len(text)} chars after cleaning > max_chars={params.max_chars}")


# ---------------------------------------------------------------- the stage


def _reject_row(lineno: int, line: str, err: Rejected, record: dict | None) -> dict:
    row = {"line": lineno, "reason": err.reason, "detail": err.detail, "source_line": printable_line(line)}
    if isinstance(record, dict) and "id" in record:
        row["id"] = record["id"]
    row.update(err.extra)
    return row


class _Cleaner:
    """The state of one pass over a file: dedup index, kept ids and counters."""

    def __init__(self, stage: StageParams):
        self.params: CleanParams = stage.section
        self.tasks = stage.tasks
        self.dedup = Deduplicator(self.params, stage.seed)
        self.kept_ids: dict[Any, int] = {}  # id -> line of the kept record
        self.counts: Counter = Counter()
        self.spans = SpanStats()
        self.chars_in = self.chars_out = 0

    def record(self, lineno: int, record: dict) -> tuple[dict, int]:
        """The cleaned record and its length, or raise Rejected (a reject or a duplicate)."""
        text = validate_record(record, self.tasks)
        m = clean_text(text, self.params)
        self.chars_in, self.chars_out = self.chars_in + len(text), self.chars_out + len(m.chars)
        self.counts["texts_changed"] += m.text != text
        _check_length(m.text, self.params)
        sig = self.dedup.signature(m.text)
        duplicate = self.dedup.find(sig)
        if duplicate is not None and record.get("split") == "test":
            # a dataset's own test set is kept whole: published numbers are measured on all of it
            self.counts["given_test_duplicates_kept"] += 1
        elif duplicate is not None:
            raise Rejected(duplicate.reason, duplicate.detail, **duplicate.extra)
        ident = record["id"]
        if ident in self.kept_ids:
            raise Rejected("duplicate_id", f"id {ident!r} already kept from line {self.kept_ids[ident]}")
        self.dedup.add(ident, sig)
        self.kept_ids[ident] = lineno
        return realign_annotations(record, m, self.tasks, self.spans), len(m.chars)


def _given_split(line: str) -> str | None:
    """The dataset's own split of a raw line, if it has one (a cheap look before the real parse)."""
    try:
        obj = json.loads(line)
    except (json.JSONDecodeError, ValueError):
        return None
    return obj.get("split") if isinstance(obj, dict) else None


def dedup_order(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """The lines in the order they meet the deduplicator: a dataset's own test records first, then val.

    The first of two duplicates is kept, so a train copy of a test text is the one dropped: the given test
    set stays as the dataset defines it and train holds no copy of it (duplicates within a given test set
    are kept too, and counted). Lines without a given split keep their order (a stable sort).
    """
    rank = {"test": 0, "val": 1}
    return sorted(lines, key=lambda pair: rank.get(_given_split(pair[1]), 2))


def clean_lines(lines: Iterable[tuple[int, str]], stage: StageParams) -> CleanResult:
    """Clean (line number, raw line) pairs; see the module docstring for where each record goes.

    Kept records and rejects come out in line order whatever order dedup_order processed them in.
    """
    cleaner, kept, rejects = _Cleaner(stage), [], []
    for lineno, line in tqdm(dedup_order(list(lines)), desc="clean", unit="rec", mininterval=5):
        cleaner.counts["records_in"] += 1
        record = None
        try:
            record = parse_line(line)
            cleaned, length = cleaner.record(lineno, record)
        except Rejected as err:
            cleaner.counts[err.reason] += 1
            rejects.append((lineno, _reject_row(lineno, line, err, record)))
            continue
        kept.append((lineno, cleaned, length))
    kept.sort(key=lambda item: item[0])
    rejects.sort(key=lambda item: item[0])
    result = CleanResult(
        kept=[record for _, record, _ in kept],
        rejects=[row for _, row in rejects],
        lengths=[length for _, _, length in kept],
    )
    result.metrics = _metrics(cleaner, len(result.kept))
    result.metrics |= language_check([r["text"] for r in result.kept], stage.section, stage.tasks)
    return result


def _metrics(cleaner: _Cleaner, kept: int) -> dict[str, Any]:
    counts, spans, chars_in, chars_out = cleaner.counts, cleaner.spans, cleaner.chars_in, cleaner.chars_out
    rejected = sum(counts[r] for r in REASONS)
    metrics = {
        "records_in": counts["records_in"],
        "kept": kept,
        "rejected": rejected,
        "duplicates_exact": counts["duplicate_exact"],
        "duplicates_near": counts["duplicate_near"],
        "given_test_duplicates_kept": counts["given_test_duplicates_kept"],
        **{f"rejected_{r}": counts[r] for r in REASONS},
        "texts_changed": counts["texts_changed"],
        "spans_total": spans.total,
        "spans_realigned": spans.realigned,
        "spans_dropped": spans.dropped,
        "chars_removed_share": round((chars_in - chars_out) / chars_in, 6) if chars_in else 0.0,
    }
    accounted = kept + rejected + metrics["duplicates_exact"] + metrics["duplicates_near"]
    assert accounted == metrics["records_in"], f"counts do not add up: {accounted} != {metrics['records_in']}"
    return metrics


def _no_usable_records(path: str | os.PathLike, result: CleanResult) -> DataError:
    n = result.metrics["records_in"]
    if n == 0:
        return DataError(f"{path}: no records (the file is empty); run stage fetch first")
    first: dict[str, dict] = {}
    for row in result.rejects:
        first.setdefault(row["reason"], row)
    reasons = Counter(row["reason"] for row in result.rejects).most_common(3)
    top = "; ".join(
        f"{reason} x{count} (first at line {first[reason]['line']}: {first[reason]['detail']})"
        for reason, count in reasons
    )
    return DataError(f"{path}: no usable record among {n} lines; top reject reasons: {top}")


def clean_file(path: str | os.PathLike, stage: StageParams) -> CleanResult:
    """Clean the raw JSONL file at `path`; raise DataError naming the file if no record survives."""
    if not Path(path).is_file():
        raise DataError(f"{path}: input file not found; run stage fetch first (dvc repro fetch)")
    result = clean_lines(iter_jsonl_lines(path), stage)
    if not result.kept:
        raise _no_usable_records(path, result)
    m = result.metrics
    log.info(
        "clean: %d in, %d kept, %d rejected, %d exact + %d near duplicates",
        m["records_in"], m["kept"], m["rejected"], m["duplicates_exact"], m["duplicates_near"],
    )  # fmt: skip
    return result


def write_outputs(result: CleanResult, out: str, rejects: str, reports: str) -> None:
    """Write kept records, rejects, metrics.json and the plot data (reject reasons, text lengths)."""
    write_jsonl(out, result.kept)
    write_jsonl(rejects, result.rejects)
    reports_dir = Path(reports)
    write_metrics(reports_dir / "metrics.json", result.metrics)
    reasons = Counter(row["reason"] for row in result.rejects)
    _write_csv(reports_dir / "reject_reasons.csv", ["reason", "count"], sorted(reasons.items()))
    _write_csv(
        reports_dir / "text_lengths.csv", ["chars", "records"], sorted(Counter(result.lengths).items())
    )


def _write_csv(path: Path, header: list[str], rows: list[tuple]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
