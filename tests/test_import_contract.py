"""The import contract of the package, read from the source with ast (tests/import_graph.py).

- no import cycle among module-level imports;
- function-level imports that exist only to dodge a cycle (moved to module level they would close one) are
  counted against a ceiling that may only go down (issue 17: none should be left);
- with a stage layer (`deepseek_sft/stages/`): the library never imports a stage, stages never import each other;
- every third-party package src/ and scripts/ import is declared in pyproject.toml, and pinned in
  requirements.lock.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions

import pytest

from import_graph import PACKAGE, REPO, Edge, package_edges, package_modules

# Function-level imports that dodge a cycle, counted when this test was written: base_model <-> compress.storage
# <-> compress.quantize (5), evaluate.generate <-> evaluate.echo_decode (3), compress.speed -> compress.stage (1,
# new in the working tree). Lower it as they go; the goal (issue 17) is 0.
MAX_CYCLE_DODGING_IMPORTS = 9

STAGES = f"{PACKAGE}.stages"


def module_level_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in package_modules()}
    for edge in package_edges():
        if not edge.function_level:
            graph[edge.source].add(edge.target)
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        for nxt in graph.get(node, ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One shortest cycle through each module that sits on one (deduplicated by its set of modules)."""
    cycles, seen_sets = [], set()
    for start in sorted(graph):
        path = _shortest_path_back(graph, start)
        if path and frozenset(path) not in seen_sets:
            seen_sets.add(frozenset(path))
            cycles.append(path)
    return cycles


def _shortest_path_back(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """Breadth-first: the shortest import path from `start` back to itself, or None."""
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt_frontier = []
        for node in frontier:
            for nxt in sorted(graph.get(node, ())):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1])]
                if nxt not in previous:
                    previous[nxt] = node
                    nxt_frontier.append(nxt)
        frontier = nxt_frontier
    return None


def full_graph() -> dict[str, set[str]]:
    """Module-level and function-level imports alike (what the graph would be with every import at the top)."""
    graph: dict[str, set[str]] = {m: set() for m in package_modules()}
    for edge in package_edges():
        graph[edge.source].add(edge.target)
    return graph


def cycle_dodging_imports() -> list[Edge]:
    """Function-level package imports that sit on a cycle: at module level they would close it.

    Two modules that import each other inside functions both count (neither side can move up).
    """
    graph = full_graph()
    return [e for e in package_edges() if e.function_level and e.source in reachable(graph, e.target)]


def describe(edge: Edge) -> str:
    path = package_modules()[edge.source].relative_to(REPO)
    return f"{path}:{edge.line}: {edge.source} imports {edge.target} inside a function"


def test_no_import_cycle_at_module_level():
    cycles = find_cycles(module_level_graph())
    assert not cycles, "module-level import cycles:\n  " + "\n  ".join(" -> ".join(c + c[:1]) for c in cycles)


def test_cycle_detection_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c"]]


def test_function_level_imports_do_not_dodge_more_cycles_than_before():
    dodges = cycle_dodging_imports()
    listing = "\n  ".join(describe(e) for e in dodges)
    print(f"{len(dodges)} function-level imports dodge a cycle:\n  {listing}")
    assert len(dodges) <= MAX_CYCLE_DODGING_IMPORTS, (
        f"{len(dodges)} function-level imports close a cycle if moved to module level "
        f"(ceiling {MAX_CYCLE_DODGING_IMPORTS}); move the shared code into the library layer instead:\n  {listing}"
    )


def stage_of(module: str) -> str | None:
    """`deepseek_sft.stages.<name>...` -> <name>; None for the library layer (and the stages package itself)."""
    parts = module.split(".")
    return parts[2] if module.startswith(STAGES + ".") and len(parts) > 2 else None


@pytest.mark.skipif(STAGES not in package_modules(), reason="no stage layer (deepseek_sft/stages/) yet")
def test_library_never_imports_a_stage_and_stages_never_import_each_other():
    problems = []
    for edge in package_edges():
        src, dst = stage_of(edge.source), stage_of(edge.target)
        if dst is None or src == dst:
            continue
        kind = "the library" if src is None else f"stage {src}"
        if edge.source != STAGES:
            problems.append(f"{describe(edge)} ({kind} -> stage {dst})")
    assert not problems, "layer contract broken:\n  " + "\n  ".join(problems)


# --- declared dependencies -------------------------------------------------------------------------------


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def third_party_imports() -> dict[str, str]:
    """Top-level third-party import name -> first file:line importing it, over src/ and scripts/."""
    found: dict[str, str] = {}
    files = sorted((REPO / "src").rglob("*.py")) + sorted((REPO / "scripts").glob("*.py"))
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != PACKAGE:
                    found.setdefault(top, f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def declared() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    specs = list(project["dependencies"])
    for group in project.get("optional-dependencies", {}).values():
        specs.extend(group)
    return {normalise(re.split(r"[\s<>=!~;\[]", spec, maxsplit=1)[0]) for spec in specs}


def pinned() -> set[str]:
    lines = (REPO / "requirements.lock").read_text(encoding="utf-8").splitlines()
    return {normalise(line.split("==")[0]) for line in lines if "==" in line and not line.startswith("#")}


def test_every_imported_package_is_declared_in_pyproject():
    distributions = packages_distributions()
    names = declared()
    missing = []
    for top, where in sorted(third_party_imports().items()):
        dists = {normalise(d) for d in distributions.get(top, [top])}
        if not dists & names:
            missing.append(f"{top} (distribution {', '.join(sorted(dists))}; imported at {where})")
    assert not missing, (
        "imported but not declared in pyproject.toml [project] dependencies:\n  " + "\n  ".join(missing)
    )


def test_every_declared_dependency_is_pinned_in_the_lock():
    unpinned = sorted(declared() - pinned())
    assert not unpinned, f"declared in pyproject.toml but not pinned in requirements.lock: {unpinned}"
