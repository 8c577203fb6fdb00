"""Rows of a user table (local file or HF dataset) -> raw records, via the params column mapping.

Shared by the `local` and `hf` sources. Without `annotator_column` each row is one record labelled by
one annotator, records.GOLD_ANNOTATOR. With it, rows are grouped by id (or by text when there is no id
column) and each row becomes that annotator's labels. With `split_column`, the row's split (canonical
name, records.canonical_split) goes onto the record as `split`.

Row-level problems are not fetch's job (clean rejects them); they pass through. Where a row cannot be
turned into a record faithfully, it becomes a *malformed record* (see local.py for the convention).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import Any

from ..config import TaskSpec
from ..config.data import ColumnMapping
from ..io import DataError
from ..records import GOLD_ANNOTATOR, canonical_split
from .spans import align_to_text, canonical_spans


def malformed(record_id: str, source: str, meta: dict, error: str, raw: str | None = None) -> dict:
    """A record that stands for input fetch could not read; clean rejects it with `_error` as reason."""
    record = {"id": record_id, "text": "", "source": source, "annotations": {}, "meta": meta, "_error": error}
    if raw is not None:
        record["_raw_line"] = raw
    return record


def plain(value: Any) -> Any:
    """Python values from numpy/pandas/arrow cells: NaN -> None, numpy scalars/arrays -> int/float/list."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if hasattr(value, "tolist") and not isinstance(value, str | bytes):
        return plain(value.tolist())  # numpy arrays and scalars
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def check_columns(columns: list[str], mapping: ColumnMapping, where: str, section: str) -> None:
    """Every column the mapping names must exist; the error names it and lists the columns present."""
    wanted = {"text_column": mapping.text_column}
    if mapping.id_column is not None:
        wanted["id_column"] = mapping.id_column
    if mapping.annotator_column is not None:
        wanted["annotator_column"] = mapping.annotator_column
    if mapping.split_column is not None:
        wanted["split_column"] = mapping.split_column
    for field, column in mapping.label_columns.items():
        wanted[f"label_columns.{field}"] = column
    for key, column in wanted.items():
        if column not in columns:
            present = ", ".join(map(str, columns)) or "(none)"
            raise DataError(
                f"{where}: column {column!r} ({section}.{key}) not found; columns present: {present}"
            )


def label_value(field: str, value: Any, tasks: dict[str, TaskSpec], join: str | None = None) -> Any:
    """A label cell as a record value: '' -> None; an extraction field (or its JSON string) -> spans in the
    record shape (spans.py); a list in another field -> one label joined by `join` (multi-label)."""
    value = plain(value)
    if field in _extraction_fields(tasks):
        if value is None or value == "":
            return []  # the column holds this task's spans: an empty cell means "no entities" (as Label Studio)
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                return value  # kept as is: clean rejects it with the reason
        return canonical_spans(value)
    if value == "":
        return None
    if join is not None and isinstance(value, list) and all(isinstance(v, str) for v in value):
        # sorted: the same set of labels is the same label; an empty list is no label (like an empty cell)
        return join.join(sorted(set(value))) or None
    return value


def _extraction_fields(tasks: dict[str, TaskSpec]) -> set[str]:
    return {t.field for t in tasks.values() if t.type == "extraction"}


def row_labels(
    row: dict, mapping: ColumnMapping, tasks: dict[str, TaskSpec], meta: dict | None = None
) -> dict:
    """The labels a row holds, keyed by record field. A list in a non-span field without
    `multi_label_join` is a params problem of the whole column: DataError naming the place (from `meta`)."""
    labels = {}
    for field, column in mapping.label_columns.items():
        value = label_value(field, row.get(column), tasks, mapping.multi_label_join)
        if isinstance(value, list) and field not in _extraction_fields(tasks):
            where = ", ".join(f"{k} {v}" for k, v in (meta or {}).items() if k != "file")
            raise DataError(
                f"{(meta or {}).get('file', 'input')}: {where}: column {column!r} (label_columns.{field}) holds a "
                f"list {value!r}; a multi-label field needs multi_label_join (e.g. '+') to become one label"
            )
        labels[field] = value
    return labels


def align_labels(text: Any, labels: dict, tasks: dict[str, TaskSpec]) -> tuple[dict, int]:
    """`labels` with spans given in UTF-16 offsets moved onto characters (spans.py); how many moved."""
    converted = 0
    for field in _extraction_fields(tasks) & labels.keys():
        labels[field], n = align_to_text(text, labels[field])
        converted += n
    return labels, converted


def note_converted(meta: dict, converted: int) -> dict:
    """Meta that records how many spans had UTF-16 offsets converted (nothing when none)."""
    if converted:
        meta["utf16_spans_converted"] = meta.get("utf16_spans_converted", 0) + converted
    return meta


def rows_to_records(
    rows: Iterable[tuple[int, dict]],
    mapping: ColumnMapping,
    tasks: dict[str, TaskSpec],
    *,
    source: str,
    origin: dict,
    id_prefix: str,
    unit: str = "row",
    lines: dict[int, int] | None = None,
) -> list[dict]:
    """Records from (row number, row) pairs; `origin` (file or dataset) and the row number (under the
    key `unit`: "row", "line" for JSONL, "item" for a JSON array) go into every record's meta, and with
    `lines` (row number -> line of the user's file, for CSV) the line too."""
    lines = lines or {}
    if mapping.annotator_column is None:
        return [
            _single(n, row, mapping, tasks, source, _place(origin, unit, n, lines), id_prefix)
            for n, row in rows
        ]
    return _grouped(rows, mapping, tasks, source, origin, id_prefix, unit, lines)


def _place(origin: dict, unit: str, n: int, lines: dict[int, int]) -> dict:
    return {**origin, unit: n, "line": lines[n]} if n in lines else {**origin, unit: n}


def _row_id(n: int, row: dict, mapping: ColumnMapping, id_prefix: str) -> str:
    value = plain(row.get(mapping.id_column)) if mapping.id_column else None
    return f"{id_prefix}-{n}" if value is None or value == "" else str(value)


def with_split(record: dict, split: object) -> dict:
    """`record` with `split` placed after `source` (where a reader of records.jsonl looks for it)."""
    out = {k: v for k, v in record.items() if k not in ("annotations", "meta", "split")}
    out["split"] = split
    return {**out, **{k: record[k] for k in ("annotations", "meta") if k in record}}


def row_split(row: dict, mapping: ColumnMapping) -> object:
    """The canonical split named by the row's split column."""
    return canonical_split(plain(row.get(mapping.split_column)))


def _single(n, row, mapping, tasks, source, meta, id_prefix) -> dict:
    text = plain(row.get(mapping.text_column))
    labels, converted = align_labels(text, row_labels(row, mapping, tasks, meta), tasks)
    record = {
        "id": _row_id(n, row, mapping, id_prefix),
        "text": text,
        "source": source,
        "annotations": {GOLD_ANNOTATOR: labels} if labels else {},
        "meta": note_converted(meta, converted),
    }
    return with_split(record, row_split(row, mapping)) if mapping.split_column else record


def _grouped(rows, mapping, tasks, source, origin, id_prefix, unit, lines) -> list[dict]:
    """One record per id (or text); one annotation per row. Conflicting rows become malformed records."""
    records: list[dict] = []
    by_key: dict[str, dict] = {}
    for n, row in rows:
        text = plain(row.get(mapping.text_column))
        record_id = _row_id(n, row, mapping, id_prefix)
        key = record_id if mapping.id_column else str(text)
        annotator = plain(row.get(mapping.annotator_column))
        meta = _place(origin, unit, n, lines)
        record = by_key.get(key)
        error = None
        if annotator is None or annotator == "":
            error = f"empty {mapping.annotator_column!r} (annotator column)"
        elif record is not None and record["text"] != text:
            error = f"id {record_id!r} was first seen with a different text ({unit} {record['meta'][unit + 's'][0]})"
        elif record is not None and str(annotator) in record["annotations"]:
            first = record["meta"][unit + "s"][0]
            error = f"second annotation by {annotator!r} for id {record['id']!r} (first at {unit} {first})"
        elif record is not None and mapping.split_column and record["split"] != row_split(row, mapping):
            first = record["meta"][unit + "s"][0]
            error = f"id {record_id!r} was first seen in split {record['split']!r} ({unit} {first})"
        if error:
            records.append(malformed(f"{record_id}@{unit}{n}", source, meta, error))
            continue
        if record is None:
            meta = {**origin, unit + "s": [], **({"lines": []} if lines else {})}
            record = {"id": record_id, "text": text, "source": source, "annotations": {}, "meta": meta}
            if mapping.split_column:
                record = with_split(record, row_split(row, mapping))
            by_key[key] = record
            records.append(record)
        labels, converted = align_labels(text, row_labels(row, mapping, tasks, meta), tasks)
        record["annotations"][str(annotator)] = labels
        note_converted(record["meta"], converted)
        record["meta"][unit + "s"].append(n)
        if n in lines:
            record["meta"]["lines"].append(lines[n])
    return records
