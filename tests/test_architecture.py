"""The floors of docs/architecture.md hold: imports run only downward, no cycles, small modules and functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "orthoft"
# floor of each top-level part of the package (docs/architecture.md); diffusion sits on training
FLOORS = {
    "version": 0,
    "orthogonal": 1,
    "adapters": 2,
    "optim": 2,
    "io": 3,
    "defaults": 3.5,  # the embedded models write their caches through io.files
    "evaluation": 4,
    "export": 4,
    "training": 5,
    "diffusion": 5.5,
    "cli": 6,
}
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path, top_level_only: bool = False) -> list[tuple[int, str]]:
    """(line, imported orthoft module) for every import in a module (inside functions too, unless top_level_only)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "orthoft"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "orthoft":
                continue
            for alias in node.names:  # `from .x import y` may import the submodule y
                candidate = f"{module}.{alias.name}"
                found.append((node.lineno, candidate if candidate in MODULES else module))
    return found


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_part_has_a_floor():
    parts = {_part(name) for name in MODULES} - {""}
    assert parts <= set(FLOORS), f"add {sorted(parts - set(FLOORS))} to FLOORS and docs/architecture.md"


def test_imports_run_only_downward():
    upward = []
    for name, path in MODULES.items():
        if name == "orthoft":
            continue  # the package facade re-exports the public API
        source = _part(name)
        for line, target in _imports(name, path):
            if target == "orthoft":
                upward.append(f"{path.name}:{line} imports the package facade `orthoft` (import the submodule)")
                continue
            part = _part(target)
            if part == source:
                continue
            if FLOORS[part] >= FLOORS[source]:
                upward.append(f"{name}:{line} (floor {FLOORS[source]}) imports {target} (floor {FLOORS[part]})")
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    graph = {name: {t for _, t in _imports(name, path, top_level_only=True) if t in MODULES and t != name}
             for name, path in MODULES.items()}
    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if nxt.startswith(node + "."):
                continue  # a package importing its own submodules is how packages work
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "\n".join(cycles)


def test_no_try_except_around_orthoft_imports():
    found = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Try):
                continue
            for inner in node.body:
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    module = inner.module if isinstance(inner, ast.ImportFrom) else inner.names[0].name
                    if inner.__class__ is ast.ImportFrom and inner.level or (module or "").startswith("orthoft"):
                        found.append(f"{name}:{inner.lineno}")
    assert not found, f"try/except around orthoft imports: {found}"


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _private_definitions(tree: ast.AST) -> set[str]:
    """Private names a module defines: functions, methods, classes, ``self._x`` / ``cls._x`` attributes."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and _is_private(node.name):
            names.add(node.name)
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.ctx, ast.Store)
            and isinstance(node.value, ast.Name)
            and node.value.id in ("self", "cls")
            and _is_private(node.attr)
        ):
            names.add(node.attr)
    return names


def test_no_private_names_across_modules():
    trees = {name: ast.parse(path.read_text(encoding="utf-8")) for name, path in MODULES.items()}
    defined = {name: _private_definitions(tree) for name, tree in trees.items()}
    found = []
    for name, tree in trees.items():
        elsewhere = set().union(*(names for other, names in defined.items() if other != name)) - defined[name]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("orthoft")):
                private = [a.name for a in node.names if _is_private(a.name)]
                if private:
                    found.append(f"{name}:{node.lineno} imports {private}")
            elif (
                isinstance(node, ast.Attribute)
                and node.attr in elsewhere
                and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
            ):
                found.append(f"{name}:{node.lineno} uses {node.attr}, private to another orthoft module")
    assert not found, "\n".join(found)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_and_function_sizes(name):
    path = MODULES[name]
    text = path.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= MAX_MODULE_LINES, f"{path} has {len(text.splitlines())} lines"
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(text))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"{path}: functions over {MAX_FUNCTION_LINES} lines: {long}"
