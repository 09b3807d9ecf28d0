"""The package's folders are its layers: imports only go down, no module imports itself back, rooms stay small.

Layers, bottom to top (ARCHITECTURE.md): ``core`` → ``layers`` → ``scoring`` →
``solvers`` → ``model`` → ``scale``; the package root (``jaxinf/__init__.py``,
``demo.py``) may use all of them. A module may import its own layer and the
layers below it, never one above. The test reads the source with ``ast``
(function-local imports included), so it cannot be fooled by import order.
"""

from __future__ import annotations

import ast
import importlib
import pathlib
import re

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "jaxinf"
REPO = PACKAGE.parent
ORDER = ("core", "layers", "scoring", "solvers", "model", "scale", "root")
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 80  # code lines, docstring excluded


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in ("demo", "breakdown"):
        return "root"
    return parts[1]


def _imports(path: pathlib.Path, modules: dict) -> set[str]:
    """Every jaxinf module ``path`` imports (``from a import b`` counts as ``a.b`` when that is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "jaxinf"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "jaxinf":
            assert node.level == 0, f"{path}: relative import"
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in modules else node.module)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) & set(modules) for name, path in modules.items()}


def test_layers_import_only_downwards():
    bad = []
    for module, targets in _graph().items():
        for target in targets:
            if ORDER.index(_layer(target)) > ORDER.index(_layer(module)):
                bad.append(f"{module} ({_layer(module)}) imports {target} ({_layer(target)})")
    assert not bad, "imports that go up a layer:\n" + "\n".join(sorted(bad))


def test_core_imports_nothing_of_ours_above_it():
    graph = _graph()
    assert all(_layer(t) == "core" for m, ts in graph.items() if _layer(m) == "core" for t in ts)


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_checker_sees_an_upward_import(tmp_path):
    """The walker is not vacuous: a function-local upward import in a core module is caught."""
    fake = tmp_path / "jaxinf" / "core"
    fake.mkdir(parents=True)
    (fake / "x.py").write_text("def f():\n    from jaxinf.scale import calculator\n")
    assert _imports(fake / "x.py", {"jaxinf.scale.calculator": None}) == {"jaxinf.scale.calculator"}
    assert ORDER.index(_layer("jaxinf.scale.calculator")) > ORDER.index(_layer("jaxinf.core.x"))


def _function_lengths(path: pathlib.Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = 0
            first = node.body[0]
            value = first.value if isinstance(first, ast.Expr) else None
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                doc = first.end_lineno - first.lineno + 1
            yield node.name, node.end_lineno - node.lineno + 1 - doc


def test_rooms_stay_small():
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = len(path.read_text().splitlines())
        if lines > MAX_FILE_LINES:
            too_long.append(f"{path.relative_to(REPO)}: {lines} lines")
        where = path.relative_to(REPO)
        too_long += [f"{where}:{name}: {n} lines" for name, n in _function_lengths(path) if n > MAX_FUNCTION_LINES]
    assert not too_long, "split these:\n" + "\n".join(too_long)


DOTTED = re.compile(r"\bjaxinf(?:\.[A-Za-z_][A-Za-z0-9_]*)+")


def _documented_paths() -> list[str]:
    """Dotted names in the README, ARCHITECTURE.md, docs, docstrings (the API reference), notebooks and benchmarks."""
    texts = [REPO / "README.md", REPO / "ARCHITECTURE.md", *sorted((REPO / "docs").rglob("*.md"))]
    texts += [*sorted(PACKAGE.rglob("*.py")), *sorted((REPO / "notebooks").glob("*.ipynb"))]
    texts += sorted((REPO / "benchmarks").glob("*.py"))
    found = set()
    for path in texts:
        if path.exists():
            found |= set(DOTTED.findall(path.read_text()))
    return sorted(found)


def _resolve(dotted: str):
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


@pytest.mark.parametrize("dotted", _documented_paths())
def test_documented_dotted_paths_resolve(dotted):
    assert _resolve(dotted) is not None
