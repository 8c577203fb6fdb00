"""params.yaml, loaded through one typed schema.

Each script calls `load_section("<stage>")`: it validates the top-level keys, `seed`, `tasks` and
its own section, then returns them. A typo, a string where a float belongs or an out-of-range value
fails here, before any work, with the key named.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError, create_model

from .base import ParamsError, Section, format_validation_error
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

__all__ = ["ParamsError", "Section", "StageParams", "TaskSpec", "load_all", "load_section", "section_class"]


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


def read_yaml(path: Path) -> dict:
    """Read params.yaml as a mapping, with a clear error if it is not one."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ParamsError(f"{path}: not found; run from the repository root or set DSFT_PARAMS") from e
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    return raw


def params_path(path: str | os.PathLike | None = None) -> Path:
    """The params file: `path`, else $DSFT_PARAMS, else ./params.yaml (read at call time, not import time)."""
    return Path(path or os.environ.get("DSFT_PARAMS") or "params.yaml")


class _Common(Section):
    seed: int
    tasks: dict[str, TaskSpec]


def _validate(cls: type[BaseModel], data: Any, prefix: str, path: Path):
    try:
        return cls.model_validate(data if data is not None else {})
    except ValidationError as e:
        raise format_validation_error(e, prefix, str(path)) from None


def _check_top_level(raw: dict, path: Path) -> None:
    unknown = sorted(set(raw) - TOP_LEVEL)
    if unknown:
        raise ParamsError(
            f"{path}: unknown top-level key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(TOP_LEVEL))}"
        )
    if "seed" not in raw:
        raise ParamsError(f"{path}: missing key 'seed' (an integer that seeds every stage)")


def load_section(name: str, path: str | os.PathLike | None = None) -> StageParams:
    """Validate and return `seed`, `tasks` and section `name` of params.yaml."""
    path = params_path(path)
    raw = read_yaml(path)
    _check_top_level(raw, path)
    common = _validate(_Common, {"seed": raw.get("seed"), "tasks": raw.get("tasks") or {}}, "", path)
    section = _validate(section_class(name), raw.get(name), name, path)
    return StageParams(seed=common.seed, tasks=common.tasks, section=section)


def load_all(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Validate every section present in params.yaml (used by `make check-params` and tests)."""
    path = params_path(path)
    raw = read_yaml(path)
    _check_top_level(raw, path)
    out: dict[str, Any] = {"seed": load_section("fetch", path).seed}
    for name in SECTIONS:
        if name in raw:
            out[name] = _validate(section_class(name), raw[name], name, path)
    return out


def params_model() -> type[BaseModel]:
    """One pydantic model of the whole file (for JSON-schema export / editor completion)."""
    fields = {name: (section_class(name) | None, None) for name in SECTIONS}
    return create_model("Params", seed=(int, ...), tasks=(dict[str, TaskSpec], {}), **fields)
