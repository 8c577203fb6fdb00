"""params.yaml, loaded through one typed schema.

Each script calls `load_section("<stage>")`. It validates the *whole* file first (top-level keys,
`seed`, `tasks` and every section: a few milliseconds, cached per file content), so a typo in
`train:` stops `make data` at its first stage instead of an hour later at the train stage; then it
returns `seed`, `tasks` and the stage's own section. Errors name the file, the line and the key.
`python -m deepseek_sft.config` (`make check-params`) runs the same check from the shell.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError, create_model, field_validator

from .base import LineOf, ParamsError, Section, describe_errors, params_error
from .data import TaskSpec

# section name -> "module:Class"; imported lazily so loading `fetch` does not import torch.
SECTIONS: dict[str, str] = {
    "fetch": "data:FetchParams",
    "clean": "data:CleanParams",
    "label_qa": "data:LabelQaParams",
    "augment": "augment:AugmentParams",
    "base_model": "model:BaseModelParams",
    "train": "train:TrainParams",
    "evaluate": "evaluate:EvaluateParams",
    "compress": "compress:CompressParams",
    "serve": "serve:ServeParams",
    "bench": "bench:BenchParams",
}
TOP_LEVEL = {"seed", "tasks", *SECTIONS}

__all__ = [
    "ParamsError",
    "Section",
    "StageParams",
    "TaskSpec",
    "check_params",
    "load_all",
    "load_section",
    "section_class",
]


@dataclass(frozen=True)
class StageParams:
    """What a stage sees: the global seed, the task list and its own validated section."""

    seed: int
    tasks: dict[str, TaskSpec]
    section: Any


def section_class(name: str) -> type[Section]:
    """The schema class of a params section."""
    if name not in SECTIONS:
        raise ParamsError(f"unknown params section {name!r}; known: {', '.join(SECTIONS)}")
    module, cls = SECTIONS[name].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def params_path(path: str | os.PathLike | None = None) -> Path:
    """The params file: `path`, else $DSFT_PARAMS, else ./params.yaml (read at call time, not import time)."""
    return Path(path or os.environ.get("DSFT_PARAMS") or "params.yaml")


def _read_text(path: Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise ParamsError(f"{path}: not found; run from the repository root or set DSFT_PARAMS") from e


def _parse(text: str, path: Path) -> dict:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    return raw


def read_yaml(path: Path) -> dict:
    """Read params.yaml as a mapping, with a clear error if it is not one."""
    return _parse(_read_text(path), path)


def line_finder(text: str) -> LineOf:
    """A function from a key path (("train", "lora", "r")) to its 1-based line in `text`.

    A path that leaves the file (a missing key, a pydantic union tag) gives the line of its deepest
    existing ancestor, which is where the fix goes. The YAML is composed only when an error needs it.
    """

    @functools.cache
    def root() -> yaml.Node | None:
        return yaml.compose(text)

    def line_of(path: tuple) -> int | None:
        node, line = root(), None
        for part in path:
            if isinstance(node, yaml.MappingNode):
                hit = next(((k, v) for k, v in node.value if k.value == str(part)), None)
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
                hit = (node.value[part], node.value[part])
            else:
                hit = None
            if hit is None:
                break
            line, node = hit[0].start_mark.line + 1, hit[1]
        return line

    return line_of


class _Common(Section):
    seed: int
    tasks: dict[str, TaskSpec]

    @field_validator("tasks")
    @classmethod
    def _enabled_only(cls, tasks: dict[str, TaskSpec]) -> dict[str, TaskSpec]:
        # `enabled: false` switches a task off by params only (dvc exp run -S tasks.x.enabled=false)
        return {name: task for name, task in tasks.items() if task.enabled}


def _errors(cls: type[BaseModel], data: Any, prefix: str, line_of: LineOf) -> list[str]:
    try:
        cls.model_validate(data if data is not None else {})
    except ValidationError as e:
        return describe_errors(e, prefix, line_of)
    return []


def _validate(cls: type[BaseModel], data: Any, prefix: str, path: Path, text: str):
    try:
        return cls.model_validate(data if data is not None else {})
    except ValidationError as e:
        raise params_error(str(path), describe_errors(e, prefix, line_finder(text))) from None


def _top_level_errors(raw: dict, line_of: LineOf) -> list[str]:
    allowed = ", ".join(sorted(TOP_LEVEL))
    lines = [
        f"line {line_of((key,))}: unknown top-level key {key!r} (typo?); allowed: {allowed}"
        for key in raw
        if key not in TOP_LEVEL
    ]
    if "seed" not in raw:
        lines.append("missing key 'seed' (an integer that seeds every stage)")
    return lines


def _file_errors(raw: dict, text: str) -> list[str]:
    """Every problem in the file, one line each: top-level keys, seed/tasks, each section present."""
    line_of = line_finder(text)
    lines = _top_level_errors(raw, line_of)
    if "seed" in raw:
        common = {"seed": raw["seed"], "tasks": raw.get("tasks") or {}}
        lines += _errors(_Common, common, "", line_of)
    for name in SECTIONS:
        if name in raw:
            lines += _errors(section_class(name), raw[name], name, line_of)
    return lines


@functools.lru_cache(maxsize=8)
def _check_text(source: str, text: str) -> None:
    """Raise ParamsError listing every problem of the file; cached, so a script loading three sections
    (or a test loading one many times) validates a given file content once. Errors are never cached."""
    lines = _file_errors(_parse(text, Path(source)), text)
    if lines:
        raise params_error(source, lines)


def check_params(path: str | os.PathLike | None = None) -> Path:
    """Validate the whole params file; raise one ParamsError naming every bad key. Returns its path."""
    path = params_path(path)
    _check_text(str(path), _read_text(path))
    return path


def load_section(name: str, path: str | os.PathLike | None = None) -> StageParams:
    """Validate the whole params file, then return `seed`, `tasks` and section `name`."""
    cls = section_class(name)
    path = params_path(path)
    text = _read_text(path)
    _check_text(str(path), text)
    raw = _parse(text, path)
    common = _validate(_Common, {"seed": raw["seed"], "tasks": raw.get("tasks") or {}}, "", path, text)
    section = _validate(cls, raw.get(name), name, path, text)
    return StageParams(seed=common.seed, tasks=common.tasks, section=section)


def load_all(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """`seed` and every section present in the params file, validated (`make check-params`, tests)."""
    path = params_path(path)
    text = _read_text(path)
    _check_text(str(path), text)
    raw = _parse(text, path)
    out: dict[str, Any] = {"seed": raw["seed"]}
    for name in SECTIONS:
        if name in raw:
            out[name] = _validate(section_class(name), raw[name], name, path, text)
    return out


def params_model() -> type[BaseModel]:
    """One pydantic model of the whole file (for JSON-schema export / editor completion)."""
    fields = {name: (section_class(name) | None, None) for name in SECTIONS}
    return create_model("Params", seed=(int, ...), tasks=(dict[str, TaskSpec], {}), **fields)


def _print_params_errors(previous):
    """An excepthook: a ParamsError nobody caught prints its message alone (it names file, line and key; the
    traceback would add nothing) and the process exits 1; any other exception goes to `previous`."""

    def hook(kind, value, traceback):
        if issubclass(kind, ParamsError):
            print(f"error: {value}", file=sys.stderr)
        else:
            previous(kind, value, traceback)

    hook.params_errors = True
    return hook


# Installed on import so that every stage script (each loads its params through here) reports a bad
# params.yaml as its message, with or without its own `except ParamsError`.
if not getattr(sys.excepthook, "params_errors", False):
    sys.excepthook = _print_params_errors(sys.excepthook)


def main(argv: list[str] | None = None) -> int:
    """`python -m deepseek_sft.config [params.yaml]`: exit 0 and say ok, or print the problems alone, exit 2."""
    args = sys.argv[1:] if argv is None else argv
    try:
        path = check_params(args[0] if args else None)
    except ParamsError as e:
        print(e, file=sys.stderr)
        return 2
    print(f"{path}: ok")
    return 0
