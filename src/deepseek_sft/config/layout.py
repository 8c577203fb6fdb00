"""params.yaml in the layout `dvc exp run -S` writes back, so an experiment's diff shows only what changed.

`dvc exp run -S key=value` (dvc.utils.hydra.apply_overrides) loads params.yaml with ruamel.yaml's round-trip
loader, sets the values and dumps the *whole* file again: flow lists become block lists, `null` becomes an
empty value, long plain strings wrap at 80 columns and comments on rewritten lines move. A file already in
that layout comes back byte for byte, so after an experiment `git diff params.yaml` shows the changed values
only. This module runs DVC's own writer (not a copy of its rules) to check a file and to put it in that layout:

    python -m deepseek_sft.config.layout --check params.yaml    # exit 1 and name the lines DVC would rewrite
    python -m deepseek_sft.config.layout --write params.yaml    # rewrite it (values unchanged, checked)
"""

from __future__ import annotations

import argparse
import difflib
import io
import itertools
import re
import sys
import tempfile
from collections import Counter
from pathlib import Path

import yaml

from .base import ParamsError


def dvc_rewrite(text: str, overrides: list[str] | tuple[str, ...] = ()) -> str:
    """The file DVC writes back after `dvc exp run -S <override> ...` (no override: every value kept)."""
    from dvc.utils.hydra import apply_overrides

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "params.yaml"
        path.write_text(text, encoding="utf-8")
        apply_overrides(path, list(overrides))
        return path.read_text(encoding="utf-8")


def _block_style(node) -> None:
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    # Empty containers stay flow ({} and []): ruamel cannot write an empty block mapping back.
    if isinstance(node, CommentedMap | CommentedSeq) and len(node):
        node.fa.set_block_style()
        for child in node.values() if isinstance(node, CommentedMap) else node:
            _block_style(child)


_KEY_ONLY = re.compile(r"^(?P<key>\s*[\w.-]+:)\s+(?P<comment>#.*)$")  # `key:   # comment`, no value
_COMMENT = re.compile(r"\S\s{2,}#")


def _align_comments(text: str) -> str:
    """Pull back a comment left far right of a key whose value moved to the lines below (a list or mapping
    that used to be written inline): to the column most comments of its top-level section use.
    DVC keeps a comment's column, so the result is as stable as the input."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line[:1].isalpha()] + [len(lines)]
    for start, end in itertools.pairwise(starts):
        columns = Counter(m.end() - 1 for line in lines[start:end] if (m := _COMMENT.search(line)))
        if not columns:
            continue
        column = columns.most_common(1)[0][0]
        for i in range(start, end):
            match = _KEY_ONLY.match(lines[i])
            if match and match.start("comment") > column > len(match["key"]):
                lines[i] = match["key"].ljust(column) + match["comment"]
    return "\n".join(lines) + "\n"


def to_dvc_layout(text: str) -> str:
    """`text` in the layout DVC writes back, with every value unchanged (checked; ParamsError if not).

    Flow mappings are opened into block mappings first: DVC keeps a flow mapping flow and wraps it at
    80 columns mid-value, which reads worse than the block form it produces for lists anyway.
    """
    from dvc.utils.serialize._yaml import _get_yaml, parse_yaml_for_update

    data = parse_yaml_for_update(text, "params.yaml")
    _block_style(data)
    stream = io.StringIO()
    _get_yaml().dump(data, stream)
    out = _align_comments(dvc_rewrite(stream.getvalue()))
    if yaml.safe_load(out) != yaml.safe_load(text):
        raise ParamsError("params.yaml: rewriting into DVC's layout would change a value; left unchanged")
    if dvc_rewrite(out) != out:
        raise ParamsError("params.yaml: DVC's layout is not stable for this file; left unchanged")
    return out


def layout_drift(text: str) -> list[str]:
    """The unified diff between `text` and what DVC would write back ([] when the file is in its layout)."""
    return list(
        difflib.unified_diff(
            text.splitlines(),
            dvc_rewrite(text).splitlines(),
            "params.yaml",
            "after dvc exp run -S",
            lineterm="",
        )
    )


def main(argv: list[str] | None = None) -> int:
    """--check: exit 1 and show what DVC would rewrite; --write: put the file in DVC's layout."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="exit 1 if `dvc exp run -S` would rewrite lines")
    mode.add_argument("--write", action="store_true", help="rewrite the file in DVC's layout")
    parser.add_argument("path", nargs="?", default="params.yaml", type=Path)
    args = parser.parse_args(argv)
    text = args.path.read_text(encoding="utf-8")
    if args.write:
        try:
            args.path.write_text(to_dvc_layout(text), encoding="utf-8")
        except ParamsError as e:
            print(e, file=sys.stderr)
            return 2
        print(f"{args.path}: in DVC's layout")
        return 0
    drift = layout_drift(text)
    if drift:
        print("\n".join(drift))
        print(
            f"{args.path}: `dvc exp run -S` would rewrite the lines above; run with --write", file=sys.stderr
        )
        return 1
    print(f"{args.path}: in DVC's layout (an experiment's diff shows only the values it sets)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
