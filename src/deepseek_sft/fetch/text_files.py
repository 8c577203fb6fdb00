"""Reading users' text files: byte-order marks, line numbers, and CSV rows that keep their line.

Spreadsheet programs save "CSV UTF-8" with a UTF-8 byte-order mark and "Unicode text" as UTF-16 with one;
both are decoded. A file without a BOM is read as UTF-8. UTF-16 without a BOM (NUL bytes every other byte)
cannot be told apart reliably, so it is refused with what to do about it.
"""

from __future__ import annotations

import codecs
import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

from ..io import DataError

# UTF-32-LE's BOM starts with UTF-16-LE's: the longer marks are tried first
BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
RESAVE = "re-save it as UTF-8"


def sniff_encoding(path: Path, data: bytes) -> str:
    """The encoding of a file's bytes: from its BOM, else UTF-8; BOM-less UTF-16 is refused."""
    for bom, name in BOMS:
        if data.startswith(bom):
            return name
    head = data[:4096]
    if len(head) >= 4 and head.count(0) * 4 >= len(head):  # ASCII in UTF-16: every other byte is NUL
        raise DataError(f"{path}: looks like UTF-16 without a byte-order mark; {RESAVE}")
    return "utf-8"


def read_text(path: Path, strict: bool = False) -> tuple[str, str]:
    """(text, encoding) of a file. UTF-8 bytes that do not decode raise DataError naming the line when
    `strict`, else they stay as surrogate escapes for the line-by-line readers to mark malformed."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e}") from e
    encoding = sniff_encoding(path, data)
    errors = "strict" if strict or encoding != "utf-8" else "surrogateescape"
    try:
        text = data.decode(encoding, errors=errors)
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        what = (
            "UTF-16/32 detected (byte-order mark) but the file does not decode"
            if encoding != "utf-8"
            else "not UTF-8 text"
        )
        raise DataError(f"{path}:{line}: {what} (bad byte at offset {e.start}); {RESAVE}") from e
    return text, encoding


def physical_lines(text: str) -> list[str]:
    """The text's lines as an editor numbers them (\\n, \\r\\n or \\r; not the Unicode line separators)."""
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def text_lines(path: Path) -> list[tuple[int, str]]:
    """(1-based line number, line) for each non-blank line of a text file (a JSONL file)."""
    text, _ = read_text(path)
    return [(n, line) for n, line in enumerate(physical_lines(text), start=1) if line.strip()]


@dataclass
class CsvRows:
    """A CSV/TSV file: its header, its good rows (row number, line, cells by column) and its ragged rows."""

    header: list[str]
    rows: list[tuple[int, int, dict]] = field(default_factory=list)
    ragged: list[tuple[int, int, str, str]] = field(default_factory=list)  # row, line, raw text, why


def read_csv_rows(path: Path, delimiter: str) -> CsvRows:
    """Every row of a CSV/TSV file with the line it starts on; cells stay strings exactly as written.

    A row whose number of cells differs from the header's is kept apart as ragged (clean rejects it with
    its line) instead of refusing the whole file. Blank lines are skipped and not counted as rows.
    """
    text, _ = read_text(path, strict=True)
    lines = physical_lines(text)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(f"{path}: empty file; expected a header row, then one record per row") from None
    except csv.Error as e:
        raise DataError(f"{path}:1: cannot read the header as CSV: {e}") from e
    duplicated = sorted({c for c in header if header.count(c) > 1})
    if duplicated:
        raise DataError(f"{path}:1: column(s) {', '.join(map(repr, duplicated))} appear twice in the header")
    out, number, start = CsvRows(header=header), 0, reader.line_num + 1
    last_start = start
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as e:  # e.g. a quote left open: the rest of the file is one field
            raise DataError(f"{path}:{start}: cannot read as CSV: {e}") from e
        if cells:
            number, last_start = number + 1, start
            if len(cells) == len(header):
                out.rows.append((number, start, dict(zip(header, cells, strict=True))))
            else:
                raw = "\n".join(lines[start - 1 : reader.line_num])
                why = f"ragged row: {len(cells)} cells where the header has {len(header)}"
                out.ragged.append((number, start, raw, why))
        start = reader.line_num + 1
    if "\n".join(lines[last_start - 1 :]).count('"') % 2:
        raise DataError(
            f"{path}:{last_start}: a quoted cell opened on this line is never closed (the rest of the file "
            "would be one cell); close the quote"
        )
    return out
