"""Source `local`: JSONL, JSON arrays, CSV/TSV, Parquet or Label Studio JSON exports (files, directories, globs).

Columns map onto record fields through `fetch.local` (text_column, id_column, label_columns,
annotator_column, split_column, multi_label_join; see tables.py; span shapes: spans.py). The format comes
from the extension unless `fetch.local.format` says; a .json file is a Label Studio export when its items
hold a `data` object (label_studio.py), else an array of row objects. Text files may carry a UTF-8 or
UTF-16 byte-order mark (text_files.py). `path` may map the dataset's own splits to files; each record then
carries its split (records.py).

File-level problems raise DataError naming the file (and line where it applies): missing file, missing
column (listing the columns present), unreadable format. Row-level problems (empty text, unknown label)
pass through untouched: clean rejects them. A file without records (a header-only CSV) is named in a
warning, and in the error when no file has any.

Malformed-record convention (a JSONL line that is not a JSON object, a line that is not UTF-8, a CSV row
with more or fewer cells than the header, a Label Studio task without `data`, conflicting rows of a
one-row-per-annotator table) — the record keeps the raw-record shape so every later stage can read it,
and says why it is unusable::

    {"id": "<file stem>-<line>", "text": "", "source": "local", "annotations": {},
     "meta": {"file": "data/x.jsonl", "line": 7},
     "_error": "invalid JSON: Expecting ',' delimiter (column 17)",
     "_raw_line": "<the line as read>"}          # _raw_line only when there is a raw line

clean must reject every record that has `_error`, with that text as the reason and meta.file plus
meta.line (JSONL; CSV rows have meta.row and meta.line), meta.item (JSON arrays) or meta.task (Label Studio,
1-based) as the place. fetch counts them in metrics.json as `malformed_records`.
"""

from __future__ import annotations

import glob
import json
import logging
from pathlib import Path

import pandas as pd

from ..config import StageParams, TaskSpec
from ..config.data import LocalParams
from ..io import DataError
from ..records import SPLITS, canonical_split
from .label_studio import is_label_studio, load_json, read_label_studio
from .tables import check_columns, malformed, row_split, rows_to_records, with_split
from .text_files import read_csv_rows, text_lines

VERSION = "local-1"
log = logging.getLogger(__name__)
SECTION = "fetch.local"
EXTENSIONS = {
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv", ".tab": "tsv",
    ".parquet": "parquet", ".pq": "parquet", ".json": "json",
}  # fmt: skip


def fetch_records(params: StageParams) -> list[dict]:
    """Read every input file of `fetch.local` into raw records, in file then row order.

    When `path` maps splits to files, each record carries its file's split (records.py: `split`).
    """
    cfg: LocalParams = params.section.local
    records: list[dict] = []
    empty: list[str] = []
    for path, fmt, split in input_sources(cfg):
        found = read_file(path, fmt, cfg, params.tasks)
        if not found:
            log.warning("local: %s holds no records (a header only, or an empty array)", path)
            empty.append(str(path))
        if split is not None:
            found = [with_split(r, split) for r in found]
        log.info(
            "local: %d records from %s (%s%s)", len(found), path, fmt, f", split {split}" if split else ""
        )
        records.extend(found)
    if not records:
        raise DataError(f"no records in {', '.join(empty)} ({SECTION}.path): a header only or an empty file")
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
    if fmt in ("json", "label_studio"):
        export = load_json(path, "a JSON array of objects or a Label Studio export")
        if fmt == "label_studio" or (cfg.format == "auto" and is_label_studio(export)):
            return read_label_studio(path, cfg, tasks, export)
        return read_json_array(path, export, cfg, tasks)
    if fmt == "parquet":
        return read_parquet(path, cfg, tasks)
    table = read_csv_rows(path, "\t" if fmt == "tsv" else ",")
    check_columns(table.header, cfg, str(path), SECTION)
    origin = {"file": str(path)}
    lines = {n: line for n, line, _ in table.rows}
    records = rows_to_records(
        [(n, row) for n, _, row in table.rows], cfg, tasks,
        source="local", origin=origin, id_prefix=path.stem, lines=lines,
    )  # fmt: skip
    ragged = [
        malformed(f"{path.stem}-{n}", "local", {**origin, "row": n, "line": line}, why, raw)
        for n, line, raw, why in table.ragged
    ]
    return sorted([*records, *ragged], key=lambda r: _place(r, "row"))


def read_parquet(path: Path, cfg: LocalParams, tasks: dict[str, TaskSpec]) -> list[dict]:
    """Records of a Parquet file (its cells as plain Python values)."""
    try:
        frame = pd.read_parquet(path)
    except (ValueError, OSError) as e:  # pyarrow errors are ValueErrors / OSErrors
        raise DataError(f"{path}: cannot read as parquet: {e}") from e
    check_columns(list(frame.columns), cfg, str(path), SECTION)
    rows = enumerate(frame.to_dict("records"), start=1)
    return rows_to_records(rows, cfg, tasks, source="local", origin={"file": str(path)}, id_prefix=path.stem)


def read_json_array(path: Path, items: object, cfg: LocalParams, tasks: dict[str, TaskSpec]) -> list[dict]:
    """Records of a JSON array of row objects (e.g. NLU++ folds); `meta.item` is the 1-based position."""
    if not isinstance(items, list):
        kind = "object" if isinstance(items, dict) else type(items).__name__
        raise DataError(
            f"{path}: expected a JSON array of row objects or a Label Studio export (a list of tasks with "
            f"a 'data' object), got a JSON {kind}"
        )
    origin = {"file": str(path)}
    good = [(i, obj) for i, obj in enumerate(items, start=1) if isinstance(obj, dict)]
    bad = [
        malformed(
            f"{path.stem}-{i}",
            "local",
            {**origin, "item": i},
            f"expected a JSON object, got {type(obj).__name__}",
        )
        for i, obj in enumerate(items, start=1)
        if not isinstance(obj, dict)
    ]
    if not good:
        return bad
    keys = list(dict.fromkeys(k for _, obj in good for k in obj))
    check_columns(keys, cfg, str(path), SECTION)
    records = rows_to_records(
        good, cfg, tasks, source="local", origin=origin, id_prefix=path.stem, unit="item"
    )
    return sorted([*records, *bad], key=lambda r: _place(r, "item"))


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
    parsed = [(n, line, *parse_line(line)) for n, line in text_lines(path)]
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
    return sorted([*records, *bad], key=lambda r: _place(r, "line"))


def _printable(line: str) -> str:
    """The raw line with undecodable bytes shown as U+FFFD (lone surrogates cannot be written as UTF-8)."""
    return line.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _place(record: dict, unit: str) -> int:
    """Where a record starts in its file, in `unit`s (a grouped record: its first row)."""
    meta = record["meta"]
    return meta[unit] if unit in meta else meta[unit + "s"][0]


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
