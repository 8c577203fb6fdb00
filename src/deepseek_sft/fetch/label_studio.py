"""Label Studio's standard JSON export (a list of tasks) -> raw records (read by the `local` source).

The text is `data[text_column]`; each annotation (skipping cancelled ones) becomes the annotator named by
`completed_by` (its email when the export holds a user object). `choices` results fill the classification
field named by `from_name`, `labels` results become entity spans (value.start/end/labels[0], with
value.text as the span's `text`) of the extraction task's field, and `textarea` results fill a generation
field named by `from_name`. `label_columns` maps a record field onto a differently named `from_name`
(e.g. {intent: category}).

Some Label Studio versions count offsets in UTF-16 code units, so every span after an emoji is shifted;
spans whose value.text agrees only with the UTF-16 reading are converted (spans.py, counted in
meta.utf16_spans_converted), and clean rejects the annotation of a span that agrees with neither
(span_text_mismatch).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import TaskSpec
from ..config.data import LocalParams
from ..io import DataError
from ..records import entity
from .tables import align_labels, malformed, note_converted, plain, row_split, with_split
from .text_files import read_text

SECTION = "fetch.local"


def load_json(path: Path, expected: str) -> object:
    """A JSON file parsed (BOM-aware); invalid JSON raises DataError naming the line and what was expected."""
    text, _ = read_text(path, strict=True)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg}); expected {expected}") from e


def is_label_studio(export: object) -> bool:
    """Whether parsed JSON looks like a Label Studio export (a list of tasks with a `data` object)."""
    return isinstance(export, list) and any(
        isinstance(t, dict) and isinstance(t.get("data"), dict) for t in export
    )


def read_label_studio(
    path: Path, cfg: LocalParams, tasks: dict[str, TaskSpec], export: object = None
) -> list[dict]:
    """Records of a Label Studio JSON export (`export`: the file already parsed); each annotation's
    completed_by becomes the annotator."""
    if export is None:
        export = load_json(path, "a Label Studio export (a JSON list of tasks)")
    if not is_label_studio(export):
        raise DataError(
            f"{path}: not a Label Studio export: expected a JSON list of tasks with a 'data' object "
            "(for rows of plain objects use JSONL)"
        )
    data_keys = list(dict.fromkeys(k for t in export if isinstance(t, dict) for k in t.get("data") or {}))
    for key in ("text_column", "split_column"):
        column = getattr(cfg, key)
        if column is not None and column not in data_keys:
            raise DataError(
                f"{path}: column {column!r} ({SECTION}.{key}) not found in the tasks' data; "
                f"columns present: {', '.join(data_keys)}"
            )
    fields = _LabelStudioFields(cfg, tasks, export)
    return [_ls_task(i, task, cfg, fields, path) for i, task in enumerate(export, start=1)]


class _LabelStudioFields:
    """Which record field a Label Studio result (by from_name and type) fills."""

    def __init__(self, cfg: LocalParams, tasks: dict[str, TaskSpec], export: list):
        self.tasks = tasks
        self.by_from_name = {column: field for field, column in cfg.label_columns.items()}
        extraction = next((t.field for t in tasks.values() if t.type == "extraction"), "entities")
        self.span_field = extraction
        # every annotation gets the span field ([] = "no entities") once any task in the file has spans
        self.has_spans = any(
            r.get("type") == "labels"
            for t in export
            if isinstance(t, dict)
            for a in t.get("annotations") or []
            if isinstance(a, dict)
            for r in a.get("result") or []
            if isinstance(r, dict)
        )

    def field(self, result: dict) -> str:
        from_name = str(result.get("from_name", ""))
        if from_name in self.by_from_name:
            return self.by_from_name[from_name]
        return self.span_field if result.get("type") == "labels" else from_name


def _ls_task(i: int, task: object, cfg: LocalParams, fields: _LabelStudioFields, path: Path) -> dict:
    origin = {"file": str(path), "task": i}
    if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
        return malformed(f"{path.stem}-task{i}", "local", origin, "Label Studio task without a 'data' object")
    data = task["data"]
    record_id = data.get(cfg.id_column) if cfg.id_column else task.get("id")
    annotations, skipped, superseded = {}, 0, 0
    for ann in task.get("annotations") or []:
        if not isinstance(ann, dict) or ann.get("was_cancelled"):
            skipped += 1
            continue
        name = _annotator(ann)
        superseded += name in annotations  # the later annotation by the same person wins
        annotations[name] = _ls_labels(ann.get("result") or [], fields)
    meta = {**origin, "ls_id": task.get("id")}
    if skipped:
        meta["skipped_annotations"] = skipped  # cancelled (skipped) in Label Studio: no labels to keep
    if superseded:
        meta["superseded_annotations"] = superseded
    text = plain(data.get(cfg.text_column))
    for name, labels in annotations.items():
        annotations[name], converted = align_labels(text, labels, fields.tasks)
        note_converted(meta, converted)
    record = {
        "id": str(record_id) if record_id not in (None, "") else f"{path.stem}-task{i}",
        "text": text,
        "source": "local",
        "annotations": annotations,
        "meta": meta,
    }
    return with_split(record, row_split(data, cfg)) if cfg.split_column else record


def _annotator(ann: dict) -> str:
    who = ann.get("completed_by")
    if isinstance(who, dict):
        who = who.get("email") or who.get("id")
    return str(who) if who not in (None, "") else f"annotation-{ann.get('id')}"


def _ls_labels(results: list, fields: _LabelStudioFields) -> dict:
    labels: dict = {fields.span_field: []} if fields.has_spans else {}
    for result in results:
        if not isinstance(result, dict):
            continue
        value, kind, field = result.get("value") or {}, result.get("type"), fields.field(result)
        if kind == "choices":
            choices = value.get("choices") or []
            labels[field] = choices[0] if len(choices) == 1 else choices
        elif kind == "labels":
            names = value.get("labels") or [None]
            # value.text is what the annotator saw: kept so the offsets can be checked against it
            stated = value.get("text") if isinstance(value.get("text"), str) else None
            span = entity(value.get("start"), value.get("end"), names[0], stated)
            labels.setdefault(field, []).append(span)
        elif kind == "textarea":
            labels[field] = "\n".join(value.get("text") or [])
    return labels
