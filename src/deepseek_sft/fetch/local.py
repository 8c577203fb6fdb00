"""Source `local`: JSONL, CSV/TSV, Parquet or a Label Studio JSON export (a file or a directory of them).

Columns map onto record fields through `fetch.local` (text_column, id_column, label_columns,
annotator_column; see tables.py). The format comes from the extension unless `fetch.local.format` says.

File-level problems raise DataError naming the file (and line where it applies): missing file, missing
column (listing the columns present), unreadable format. Row-level problems (empty text, unknown label)
pass through untouched: clean rejects them.

Malformed-record convention (a JSONL line that is not a JSON object, a line that is not UTF-8, a
Label Studio task without `data`, conflicting rows of a one-row-per-annotator table) — the record keeps
the raw-record shape so every later stage can read it, and says why it is unusable::

    {"id": "<file stem>-<line>", "text": "", "source": "local", "annotations": {},
     "meta": {"file": "data/x.jsonl", "line": 7},
     "_error": "invalid JSON: Expecting ',' delimiter (column 17)",
     "_raw_line": "<the line as read>"}          # _raw_line only when there is a raw line

clean must reject every record that has `_error`, with that text as the reason and meta.file plus
meta.line (JSONL), meta.row (tables) or meta.task (Label Studio, 1-based) as the place. fetch counts them in metrics.json as `malformed_records`.

Label Studio: the standard JSON export (a list of tasks). The text is `data[text_column]`; each
annotation (skipping cancelled ones) becomes the annotator named by `completed_by` (its email when the
export holds a user object). `choices` results fill the classification field named by `from_name`,
`labels` results become entity spans (value.start/end/labels[0]) of the extraction task's field, and
`textarea` results fill a generation field named by `from_name`. `label_columns` maps a record field
onto a differently named `from_name` (e.g. {intent: category}).
"""

from __future__ import annotations

import glob
import json
import logging
from pathlib import Path

import pandas as pd

from ..config import StageParams, TaskSpec
from ..config.data import LocalParams
from ..io import DataError, iter_jsonl_lines
from ..records import SPLITS, canonical_split, entity
from .tables import check_columns, malformed, plain, row_split, rows_to_records, with_split

VERSION = "local-1"
log = logging.getLogger(__name__)
SECTION = "fetch.local"
EXTENSIONS = {
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv", ".tab": "tsv",
    ".parquet": "parquet", ".pq": "parquet", ".json": "label_studio",
}  # fmt: skip


def fetch_records(params: StageParams) -> list[dict]:
    """Read every input file of `fetch.local` into raw records, in file then row order.

    When `path` maps splits to files, each record carries its file's split (records.py: `split`).
    """
    cfg: LocalParams = params.section.local
    records: list[dict] = []
    for path, fmt, split in input_sources(cfg):
        found = read_file(path, fmt, cfg, params.tasks)
        if split is not None:
            found = [with_split(r, split) for r in found]
        log.info(
            "local: %d records from %s (%s%s)", len(found), path, fmt, f", split {split}" if split else ""
        )
        records.extend(found)
    return records


def input_sources(cfg: LocalParams) -> list[tuple[Path, str, str | None]]:
    """(file, format, given split or None) for every input file of `fetch.local.path`."""
    if isinstance(cfg.path, dict):  # train, val, test order whatever order the map is written in
        return [
            (file, fmt, split)
            for split in SPLITS
            if split in cfg.path
            for file, fmt in expand_path(cfg.path[split], cfg.format, f"{SECTION}.path.{split}")
        ]
    return [(file, fmt, None) for file, fmt in expand_path(cfg.path, cfg.format, f"{SECTION}.path")]


def expand_path(spec: str | list[str], fmt: str, key: str) -> list[tuple[Path, str]]:
    """(file, format) pairs of a file, a directory, a glob, or a list of those (in the order given)."""
    pairs: list[tuple[Path, str]] = []
    for item in [spec] if isinstance(spec, str) else spec:
        if glob.has_magic(item):
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True) if Path(m).is_file())
            if not matches:
                raise DataError(f"{item}: the pattern ({key}) matches no file")
            pairs += [(m, fmt if fmt != "auto" else format_of(m)) for m in matches]
        else:
            pairs += input_files(Path(item), fmt, key)
    return pairs


def input_files(path: Path, fmt: str, key: str = f"{SECTION}.path") -> list[tuple[Path, str]]:
    """(file, format) pairs: the file itself, or the directory's files in sorted order."""
    if not path.exists():
        raise DataError(f"{path}: not found ({key}); give a file, a directory of files or a glob")
    if path.is_file():
        return [(path, fmt if fmt != "auto" else format_of(path))]
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    if fmt != "auto":
        return [(p, fmt) for p in files]
    known = [(p, EXTENSIONS[p.suffix.lower()]) for p in files if p.suffix.lower() in EXTENSIONS]
    if not known:
        raise DataError(f"{path}: no file with a known extension ({', '.join(EXTENSIONS)})")
    return known


def format_of(path: Path) -> str:
    """The format implied by a file's extension."""
    fmt = EXTENSIONS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            f"{path}: cannot tell the format from the extension {path.suffix!r}; known: "
            f"{', '.join(EXTENSIONS)}; or set {SECTION}.format"
        )
    return fmt


def read_file(path: Path, fmt: str, cfg: LocalParams, tasks: dict[str, TaskSpec]) -> list[dict]:
    """Records of one file in format `fmt`."""
    if fmt == "jsonl":
        return read_jsonl_file(path, cfg, tasks)
    if fmt == "label_studio":
        return read_label_studio(path, cfg, tasks)
    frame = read_table(path, fmt)
    check_columns(list(frame.columns), cfg, str(path), SECTION)
    rows = enumerate(frame.to_dict("records"), start=1)
    return rows_to_records(rows, cfg, tasks, source="local", origin={"file": str(path)}, id_prefix=path.stem)


def read_table(path: Path, fmt: str) -> pd.DataFrame:
    """A CSV/TSV (all cells as strings, empty cells kept as '') or Parquet file as a DataFrame."""
    try:
        if fmt == "parquet":
            return pd.read_parquet(path)
        # dtype=str keeps ids such as 007 and labels such as 1 exactly as written
        sep = "\t" if fmt == "tsv" else ","
        return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}: not UTF-8 text (bad byte at offset {e.start}); expected a UTF-8 {fmt} file"
        ) from e
    except (ValueError, OSError) as e:  # pandas ParserError/EmptyDataError and pyarrow errors are ValueErrors
        raise DataError(f"{path}: cannot read as {fmt}: {e}") from e


def parse_line(line: str) -> tuple[object, str | None]:
    """(JSON object, None) for a good line, else (None, why it is not one)."""
    try:
        line.encode("utf-8")
    except UnicodeEncodeError as e:
        return None, f"not valid UTF-8 (character {e.start + 1})"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return None, f"invalid JSON: {e.msg} (column {e.colno})"
    if not isinstance(obj, dict):
        return None, f"expected a JSON object, got {type(obj).__name__}"
    return obj, None


def read_jsonl_file(path: Path, cfg: LocalParams, tasks: dict[str, TaskSpec]) -> list[dict]:
    """Records of a JSONL file; bad lines become malformed records, a file with no good line is an error."""
    try:
        parsed = [(n, line, *parse_line(line)) for n, line in iter_jsonl_lines(path)]
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e}") from e
    good = [(n, obj) for n, _, obj, error in parsed if error is None]
    if not good:
        first = next(((n, error) for n, _, _, error in parsed), None)
        where = f"{path}:{first[0]}: {first[1]}" if first else f"{path}: empty file"
        raise DataError(f"{where}; expected one JSON object per line (JSONL)")
    origin = {"file": str(path)}
    bad = [
        malformed(f"{path.stem}-{n}", "local", {**origin, "line": n}, error, _printable(line))
        for n, line, _, error in parsed
        if error is not None
    ]
    if _is_raw_record_file(good, cfg):
        records = [_raw_record(n, obj, cfg, path) for n, obj in good]
    else:
        keys = list(dict.fromkeys(k for _, obj in good for k in obj))
        check_columns(keys, cfg, str(path), SECTION)
        records = rows_to_records(
            good, cfg, tasks, source="local", origin=origin, id_prefix=path.stem, unit="line"
        )
    return sorted([*records, *bad], key=_first_line)


def _printable(line: str) -> str:
    """The raw line with undecodable bytes shown as U+FFFD (lone surrogates cannot be written as UTF-8)."""
    return line.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _first_line(record: dict) -> int:
    meta = record["meta"]
    return meta["line"] if "line" in meta else meta["lines"][0]


def _is_raw_record_file(good: list[tuple[int, dict]], cfg: LocalParams) -> bool:
    """A JSONL already in the raw-record shape (e.g. an earlier fetch output) is kept as it is."""
    if cfg.label_columns or cfg.annotator_column:
        return False
    return all(isinstance(obj.get("annotations"), dict) for _, obj in good)


def _raw_record(n: int, obj: dict, cfg: LocalParams, path: Path) -> dict:
    record_id = obj.get(cfg.id_column or "id")
    meta = dict(obj.get("meta") or {})
    if "source" in obj:
        meta["original_source"] = obj["source"]
    record = {
        "id": str(record_id) if record_id not in (None, "") else f"{path.stem}-{n}",
        "text": obj.get(cfg.text_column),
        "source": "local",
        "annotations": obj["annotations"],
        "meta": {**meta, "file": str(path), "line": n},
    }
    for key in ("_error", "_raw_line"):  # a malformed record stays malformed
        if key in obj:
            record[key] = obj[key]
    if cfg.split_column:
        return with_split(record, row_split(obj, cfg))
    return with_split(record, canonical_split(obj["split"])) if "split" in obj else record


def read_label_studio(path: Path, cfg: LocalParams, tasks: dict[str, TaskSpec]) -> list[dict]:
    """Records of a Label Studio JSON export; each annotation's completed_by becomes the annotator."""
    try:
        export = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (bad byte at offset {e.start})") from e
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}:{e.lineno}: invalid JSON ({e.msg}); expected a Label Studio export (a JSON list of tasks)"
        ) from e
    if not isinstance(export, list) or not any(
        isinstance(t, dict) and isinstance(t.get("data"), dict) for t in export
    ):
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
    record = {
        "id": str(record_id) if record_id not in (None, "") else f"{path.stem}-task{i}",
        "text": plain(data.get(cfg.text_column)),
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
            labels.setdefault(field, []).append(entity(value.get("start"), value.get("end"), names[0]))
        elif kind == "textarea":
            labels[field] = "\n".join(value.get("text") or [])
    return labels
