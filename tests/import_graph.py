"""The package's import graph, read from the source with `ast` (nothing is imported or executed).

Shared by tests/test_import_contract.py (cycles, layers, declared dependencies) and tests/test_dvc_deps.py
(dvc.yaml deps cover every module a stage's script loads). An edge records where the import sits: at module
level (runs on import) or inside a function (runs on call; still loaded by the stage that calls it).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
PACKAGE = "deepseek_sft"


@dataclass(frozen=True)
class Edge:
    """One import statement's target inside the package."""

    source: str  # importing module, dotted
    target: str  # imported module, dotted
    line: int
    function_level: bool  # inside a def: runs when the function is called, not on import


@cache
def package_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package (a package is its __init__.py)."""
    modules = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def is_package(module: str) -> bool:
    return package_modules()[module].name == "__init__.py"


def submodules(package: str) -> list[str]:
    """The direct children of a package."""
    depth = package.count(".") + 1
    return [m for m in package_modules() if m.startswith(package + ".") and m.count(".") == depth]


def parents(module: str) -> list[str]:
    """The packages whose __init__.py Python runs before `module` (deepseek_sft, deepseek_sft.config, ...)."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute module an ImportFrom names (relative imports resolved against `module`)."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package(module) else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _targets(module: str, node: ast.AST) -> list[str]:
    """Package modules an import node loads: the named module, or each `from X import name` that is a module."""
    known = package_modules()
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name in known]
    if isinstance(node, ast.ImportFrom):
        base = _resolve(module, node)
        found = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
        if base in known and len(found) < len(node.names):
            found.append(base)  # some names are attributes of `base` itself
        return found
    return []


def _dynamic_targets(module: str, node: ast.Call) -> list[str]:
    """`importlib.import_module(f"{__name__}.{x}")` in a package loads one of its submodules: count them all."""
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    if name != "import_module" or not node.args or not isinstance(node.args[0], ast.JoinedStr):
        return []
    head = node.args[0].values[0] if node.args[0].values else None
    names_self = (
        isinstance(head, ast.FormattedValue)
        and isinstance(head.value, ast.Name)
        and head.value.id == "__name__"
    )
    if not (names_self and is_package(module)):
        return []
    return [m for m in submodules(module) if not m.endswith(".__main__")]  # __main__ is run, never imported


def _is_type_checking_block(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_in(module: str, tree: ast.AST) -> list[Edge]:
    """Every package-internal import in a parsed file, with its level; `if TYPE_CHECKING:` blocks skipped."""
    edges: list[Edge] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        if _is_type_checking_block(node):
            for child in node.orelse:
                visit(child, in_function)
            return
        for target in _targets(module, node):
            edges.append(Edge(module, target, node.lineno, in_function))
        if isinstance(node, ast.Call):
            for target in _dynamic_targets(module, node):
                edges.append(Edge(module, target, node.lineno, in_function))
        inner = in_function or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree, False)
    return [e for e in edges if e.target != module]


@cache
def package_edges() -> tuple[Edge, ...]:
    """All internal import edges of the package."""
    edges = []
    for module, path in package_modules().items():
        edges.extend(imports_in(module, ast.parse(path.read_text(encoding="utf-8"), filename=str(path))))
    return tuple(edges)


def file_edges(path: Path) -> list[Edge]:
    """Package imports of a file outside the package (a script), under the name `path`."""
    return imports_in(str(path), ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))


def closure(roots: list[str]) -> set[str]:
    """Every package module loaded when `roots` are (transitively; function-level imports and parents included)."""
    by_source: dict[str, set[str]] = {}
    for edge in package_edges():
        by_source.setdefault(edge.source, set()).add(edge.target)
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo.extend(parents(module))
        todo.extend(by_source.get(module, ()))
    return seen
