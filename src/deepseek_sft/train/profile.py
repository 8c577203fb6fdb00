"""Params profiles (configs/profiles/*.yaml): documented overlays of params.yaml for real hardware.

    python -m deepseek_sft.train.profile apply configs/profiles/deepseek_v2_lite_moe.yaml   # edit params.yaml
    dvc exp run $(python -m deepseek_sft.train.profile flags configs/profiles/lora.yaml)   # a DVC experiment

`apply` merges the overlay into params.yaml in place, keeping its comments and key order (ruamel round trip),
after validating the result with the params schema; `flags` prints `-S key=value` arguments instead, so the
profile becomes a `dvc exp run` variant and params.yaml stays untouched.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

import yaml

from ..config import ParamsError, load_all
from ..io import write_text


def read_profile(path: str | Path) -> dict:
    """A profile: a mapping of params sections to (nested) overrides."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ParamsError(f"{path}: no such profile; see configs/profiles/") from e
    if not isinstance(data, dict) or not data:
        raise ParamsError(f"{path}: expected a mapping of params sections (e.g. train:, base_model:)")
    return data


def flatten(overlay: dict, prefix: str = "") -> dict[str, object]:
    """Dotted keys of the leaves (lists are leaves): {"train": {"lora": {"r": 8}}} -> {"train.lora.r": 8}."""
    out: dict[str, object] = {}
    for key, value in overlay.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out |= flatten(value, f"{dotted}.")
        else:
            out[dotted] = value
    return out


def dvc_flags(overlay: dict) -> list[str]:
    """`-S key=value` arguments for `dvc exp run` (values in YAML flow style, as DVC parses them)."""
    flags = []
    for key, value in flatten(overlay).items():
        flags += ["-S", f"{key}={yaml_scalar(value)}"]
    return flags


def yaml_scalar(value: object) -> str:
    """A value as YAML flow text; floats always carry a dot (YAML 1.1 reads 2e-05 as a string)."""
    if isinstance(value, float):
        text = repr(value)
        mantissa, e, exponent = text.partition("e")
        return f"{mantissa}.0e{exponent}" if e and "." not in mantissa else text
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if (
        isinstance(value, str)
        and re.fullmatch(r"[A-Za-z_][\w./-]*", value)
        and yaml.safe_load(value) == value
    ):
        return value  # a plain scalar reads back as the same string
    if isinstance(value, list):
        return "[" + ", ".join(yaml_scalar(v) for v in value) + "]"
    if isinstance(value, str | dict):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def merged_text(params_path: Path, overlay: dict) -> str:
    """params.yaml with the overlay's leaves set in place: only the value text of those lines changes, so
    every comment, blank line and hand-wrapped list elsewhere stays byte for byte."""
    lines = params_path.read_text(encoding="utf-8").splitlines()
    for key, value in flatten(overlay).items():
        _set_leaf(lines, key.split("."), value)
    return "\n".join(lines) + "\n"


_LINE = re.compile(r"^(?P<key>\s*[\w.-]+:)(?P<gap>\s*)(?P<value>.*?)(?P<comment>\s+#.*)?$")


def _set_leaf(lines: list[str], parts: list[str], value: object) -> None:
    text = yaml_scalar(value)
    start, end, indent = 0, len(lines), 0
    for depth, part in enumerate(parts):
        row = _find_key(lines, start, end, indent, part)
        leaf = depth == len(parts) - 1
        if row is None:  # a key params.yaml does not spell out: add it at the end of its parent block
            row = _block_end(lines, start, end)
            lines.insert(row, f"{' ' * indent}{part}:" + (f" {text}" if leaf else ""))
            end += 1
            if leaf:
                return
        if not leaf and _inline_value(lines[row]) is not None:
            _merge_inline(
                lines, row, parts[depth + 1 :], value
            )  # e.g. `path: null` gets {train: ..., test: ...}
            return
        if leaf:
            cont = _block_end(lines, row + 1, len(lines), indent)  # continuation lines of a wrapped list
            old = yaml.safe_load("\n".join([lines[row].strip(), *(x.strip() for x in lines[row + 1 : cont])]))
            if old == {parts[-1]: value}:
                return  # unchanged: leave the line (and its layout) alone
            del lines[row + 1 : cont]
            lines[row] = _with_value(lines[row], text)
            return
        start, end, indent = row + 1, _block_end(lines, row + 1, end, indent), indent + 2


def _inline_value(line: str) -> object | None:
    """The value written on a key's own line (`path: null`, `cols: {}`) as YAML, or None for a block parent."""
    match = _LINE.match(line)
    if match is None or not match["value"].strip():
        return None
    return yaml.safe_load(match["value"]) if match["value"].strip() != "null" else {}


def _merge_inline(lines: list[str], row: int, rest: list[str], value: object) -> None:
    """Set `rest` inside the flow mapping on `lines[row]` (a scalar such as null becomes a mapping)."""
    current = _inline_value(lines[row])
    mapping = current if isinstance(current, dict) else {}
    node = mapping
    for part in rest[:-1]:
        node = node.setdefault(part, {})
    node[rest[-1]] = value
    lines[row] = _with_value(lines[row], yaml_scalar(mapping))


def _with_value(line: str, text: str) -> str:
    """`line` (`  key: old  # comment`) with its value replaced, the comment kept at its column if it fits."""
    match = _LINE.match(line)
    head = f"{match['key']} {text}"
    if not match["comment"]:
        return head
    column = match.start("comment") + len(match["comment"]) - len(match["comment"].lstrip())
    comment = match["comment"].strip()
    return f"{head.ljust(column)}{comment}" if len(head) < column else f"{head}  {comment}"


def _find_key(lines: list[str], start: int, end: int, indent: int, key: str) -> int | None:
    pattern = re.compile(rf"^ {{{indent}}}{re.escape(key)}:(\s|$)")
    return next((i for i in range(start, end) if pattern.match(lines[i])), None)


def _block_end(lines: list[str], start: int, end: int, indent: int | None = None) -> int:
    """First line at or after `start` that leaves the block (a key at column <= indent); trailing blanks
    and comments stay outside. Without `indent`: the end of the children of the enclosing block."""
    last = start
    for i in range(start, end):
        stripped = lines[i].strip()
        if not stripped or stripped.startswith("#"):
            continue
        column = len(lines[i]) - len(lines[i].lstrip())
        # DVC writes a block list at its key's own indent (`labels:` then `- a`): those items still belong to it
        item_of_key = column == indent and stripped.startswith("- ")
        if indent is not None and column <= indent and not item_of_key:
            break
        last = i + 1
    return last


def apply_profile(profile: str | Path, params_path: str | Path = "params.yaml") -> list[str]:
    """Merge `profile` into `params_path` after validating the result; return the keys set."""
    params_path = Path(params_path)
    overlay = read_profile(profile)
    text = merged_text(params_path, overlay)
    with tempfile.TemporaryDirectory() as tmp:
        candidate = Path(tmp) / "params.yaml"
        candidate.write_text(text, encoding="utf-8")
        try:
            load_all(candidate)
        except ParamsError as e:
            detail = str(e).replace(str(candidate), f"{params_path} + {profile}")
            raise ParamsError(f"{profile}: the merged params would be invalid:\n{detail}") from None
    write_text(params_path, text)
    return list(flatten(overlay))


def main(argv: list[str] | None = None) -> None:
    """CLI: `apply PROFILE [--params params.yaml]` or `flags PROFILE`."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("action", choices=["apply", "flags"])
    parser.add_argument("profile", help="configs/profiles/<name>.yaml")
    parser.add_argument("--params", default="params.yaml", help="params file to edit (apply)")
    args = parser.parse_args(argv)
    if args.action == "flags":
        print(" ".join(_quote(f) for f in dvc_flags(read_profile(args.profile))))
        return
    keys = apply_profile(args.profile, args.params)
    print(f"{args.params}: set {len(keys)} keys from {args.profile}:", *keys, sep="\n  ", file=sys.stderr)


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


if __name__ == "__main__":
    main()
