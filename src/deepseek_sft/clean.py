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
from .clean_validate import (
    REASONS,
    Rejected,
    describe_place,
    origin_of,
    parse_line,
    printable_line,
    span_fields,
    validate_record,
)
from .config import StageParams
from .config.data import CleanParams, TaskSpec
from .io import DataError, atomic_path, iter_jsonl_lines, write_jsonl, write_metrics

log = logging.getLogger(__name__)


@dataclass
class CleanResult:
    """What stage clean produced: kept records, rejects (incl. duplicates), metrics and kept text lengths."""

    kept: list[dict] = field(default_factory=list)
    rejects: list[dict] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    lengths: list[int] = field(default_factory=list)


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
            if not isinstance(ann[key], list):  # None: this annotator did not label the field
                continue
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
    if isinstance(record, dict) and origin_of(record.get("meta")):
        row["origin"] = origin_of(record.get("meta"))  # the line of the user's own file
    row.update(err.extra)
    return row


def _annotation_row(lineno: int, record: dict, annotator: str, err: Rejected) -> dict:
    """A rejects-file row for one annotator's dropped labels (the record itself was kept)."""
    row = {"line": lineno, "id": record["id"], "annotator": annotator, "scope": "annotation"}
    row |= {"reason": err.reason, "detail": err.detail, "record_kept": True}
    if origin_of(record.get("meta")):
        row["origin"] = origin_of(record.get("meta"))
    row["annotation"] = record["annotations"][annotator]
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

    def record(self, lineno: int, record: dict) -> tuple[dict, int, list[dict]]:
        """The cleaned record, its length and the rows of annotations it lost, or raise Rejected (a reject
        or a duplicate)."""
        valid = validate_record(record, self.tasks)
        text, usable = valid.text, valid.record
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
        dropped = [_annotation_row(lineno, record, name, err) for name, err in valid.dropped]
        self.counts["annotations_dropped"] += len(dropped)
        meta = record.get("meta")
        self.counts["spans_utf16_converted"] += (
            meta.get("utf16_spans_converted", 0) if isinstance(meta, dict) else 0
        )
        return realign_annotations(usable, m, self.tasks, self.spans), len(m.chars), dropped


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
            cleaned, length, dropped = cleaner.record(lineno, record)
        except Rejected as err:
            cleaner.counts[err.reason] += 1
            rejects.append((lineno, _reject_row(lineno, line, err, record)))
            continue
        kept.append((lineno, cleaned, length))
        rejects += [(lineno, row) for row in dropped]
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
        "annotations_dropped": counts["annotations_dropped"],
        "texts_changed": counts["texts_changed"],
        "spans_total": spans.total,
        "spans_realigned": spans.realigned,
        "spans_dropped": spans.dropped,
        "spans_utf16_converted": counts["spans_utf16_converted"],
        "chars_removed_share": round((chars_in - chars_out) / chars_in, 6) if chars_in else 0.0,
    }
    accounted = kept + rejected + metrics["duplicates_exact"] + metrics["duplicates_near"]
    assert accounted == metrics["records_in"], f"counts do not add up: {accounted} != {metrics['records_in']}"
    return metrics


def _in_user_file(row: dict) -> str:
    place = describe_place(row.get("origin"))
    return f", {place}" if place and place not in row["detail"] else ""


def _no_usable_records(path: str | os.PathLike, result: CleanResult) -> DataError:
    n = result.metrics["records_in"]
    if n == 0:
        return DataError(f"{path}: no records (the file is empty); run stage fetch first")
    first: dict[str, dict] = {}
    for row in result.rejects:
        first.setdefault(row["reason"], row)
    reasons = Counter(row["reason"] for row in result.rejects).most_common(3)
    top = "; ".join(
        f"{reason} x{count} (first at line {first[reason]['line']}{_in_user_file(first[reason])}: "
        f"{first[reason]['detail']})"
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
    # one bar per reason; an annotator's dropped labels (the record kept) are counted apart
    reasons = Counter(row["reason"] + (" (annotation)" if row.get("scope") else "") for row in result.rejects)
    _write_csv(reports_dir / "reject_reasons.csv", ["reason", "count"], sorted(reasons.items()))
    _write_csv(
        reports_dir / "text_lengths.csv", ["chars", "records"], sorted(Counter(result.lengths).items())
    )


def _write_csv(path: Path, header: list[str], rows: list[tuple]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
