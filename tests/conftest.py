"""Shared test fixtures: the repository root and a writable copy of params.yaml."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def repo_root() -> Path:
    """The repository root (tests run offline against its files)."""
    return REPO


@pytest.fixture
def params_copy(tmp_path, monkeypatch) -> Path:
    """A copy of params.yaml in tmp_path, selected through DSFT_PARAMS for the duration of the test."""
    path = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", path)
    monkeypatch.setenv("DSFT_PARAMS", str(path))
    return path


def edit_params(path: Path, updates: dict) -> None:
    """Set dotted keys (e.g. {"fetch.synthetic.num_records": 200}) in a params file."""
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    for dotted, value in updates.items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")


def copy_repo(dst: Path) -> Path:
    """Copy the git-tracked shape of the repository (no data, models, caches or venv) to `dst`."""
    ignore = shutil.ignore_patterns(
        ".venv",
        ".git",
        "dvc-storage",
        "__pycache__",
        ".pytest_cache",
        ".ruff_cache",
        "dvclive",
        "*.egg-info",
        "tmp",
        "cache",
    )
    shutil.copytree(REPO, dst, ignore=ignore, dirs_exist_ok=True)
    for generated in ("data", "models", "reports"):
        for path in (dst / generated).rglob("*"):
            if path.is_file() and path.name not in ("README.md", ".gitkeep"):
                path.unlink()
    return dst
