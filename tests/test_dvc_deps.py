"""dvc.yaml's deps cover every package module a stage loads, so editing a module re-runs every stage it affects.

For each stage whose cmd runs `scripts/<x>.py` (or `python -m deepseek_sft...`), the modules it loads are the
transitive closure of the imports (read with ast: module- and function-level imports, parent packages'
__init__.py, and `import_module(f"{__name__}.{x}")` as every submodule). A dep covers a module file when it is
that file or a folder holding it. The deps may be wider than the closure (a whole library folder keeps the list
short); they may not be narrower.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from import_graph import PACKAGE, REPO, closure, file_edges, package_modules

DVC_YAML = REPO / "dvc.yaml"
SCRIPT_RE = re.compile(r"\b(scripts/\w+\.py)\b")
MODULE_RE = re.compile(rf"\bpython\s+-m\s+({PACKAGE}(?:\.\w+)*)")


def stages() -> dict[str, dict]:
    return yaml.safe_load(DVC_YAML.read_text(encoding="utf-8"))["stages"]


def stage_roots(cmd: str) -> tuple[list[Path], list[str]]:
    """The scripts a stage command runs, and the package modules it runs with `python -m`."""
    scripts = [REPO / s for s in SCRIPT_RE.findall(cmd)]
    modules = MODULE_RE.findall(cmd)
    return scripts, modules


def loaded_modules(cmd: str) -> set[str]:
    """Every package module a stage command loads."""
    scripts, modules = stage_roots(cmd)
    roots = list(modules)
    for script in scripts:
        roots.extend(edge.target for edge in file_edges(script))
    return closure(roots)


def covered(path: Path, deps: list[str]) -> bool:
    """A dep covers a file when it is the file or one of its folders."""
    rel = path.relative_to(REPO)
    return any(rel == Path(d) or Path(d) in rel.parents for d in deps)


def dep_paths(stage: dict) -> list[str]:
    return [d.rstrip("/") for d in stage.get("deps", [])]


SCRIPT_STAGES = sorted(name for name, s in stages().items() if SCRIPT_RE.search(str(s.get("cmd", ""))))


def test_every_python_stage_is_checked():
    """The check must see each stage that runs Python (a cmd this test cannot parse would be skipped silently)."""
    assert SCRIPT_STAGES, "no stage in dvc.yaml runs scripts/<x>.py"
    for name, stage in stages().items():
        cmd = str(stage.get("cmd", ""))
        if "python" in cmd or "deepspeed" in cmd:
            assert name in SCRIPT_STAGES, (
                f"dvc.yaml stage {name}: cmd runs Python but names no scripts/<x>.py"
            )


@pytest.mark.parametrize("name", SCRIPT_STAGES)
def test_stage_deps_cover_every_module_its_script_loads(name):
    stage = stages()[name]
    deps = dep_paths(stage)
    scripts, _ = stage_roots(str(stage["cmd"]))
    problems = [f"script {s.relative_to(REPO)}" for s in scripts if not covered(s, deps)]
    files = package_modules()
    for module in sorted(loaded_modules(str(stage["cmd"]))):
        if not covered(files[module], deps):
            problems.append(f"module {module} ({files[module].relative_to(REPO)})")
    assert not problems, (
        f"dvc.yaml stage {name!r}: its deps do not cover what its command loads "
        f"(add the file or its folder to stages.{name}.deps):\n  " + "\n  ".join(problems)
    )


def test_the_closure_follows_function_level_and_dynamic_imports():
    """The rules this check relies on, on the package itself: parents' __init__ and config's dynamic sections."""
    loaded = closure([f"{PACKAGE}.config.data"])
    assert {PACKAGE, f"{PACKAGE}.config"} <= loaded  # parent packages run first
    # config/__init__.py loads every section's schema by name (whole-file validation)
    assert {m for m in package_modules() if m.startswith(f"{PACKAGE}.config.")} - {
        f"{PACKAGE}.config.__main__"
    } <= loaded | {f"{PACKAGE}.config.layout"}


def test_a_missing_dep_is_named():
    """The message names the stage and the module: drop one folder from a stage's deps and check."""
    stage = {"cmd": "python scripts/clean.py", "deps": ["scripts/clean.py"]}
    missing = [
        m for m in sorted(loaded_modules(stage["cmd"])) if not covered(package_modules()[m], stage["deps"])
    ]
    assert f"{PACKAGE}.clean" in missing or any(m.startswith(f"{PACKAGE}.stages.clean") for m in missing)
    assert f"{PACKAGE}.io" in missing
