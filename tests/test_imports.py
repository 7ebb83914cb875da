"""The package's import structure: no cycles between ``dtp_search`` modules, and none
dodged with an import inside a function; the pruning core stays plain PyTorch."""

from __future__ import annotations

import ast
from pathlib import Path

import dtp_search

PACKAGE = Path(dtp_search.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    path = PACKAGE.parent / name.replace(".", "/")
    return path.with_suffix(".py").exists() or path.is_dir()


def _imports(path: Path) -> list[str]:
    """Every module ``path`` imports, anywhere in it; ``from x import y`` counts as
    ``x.y`` when that is a module, else as ``x``. (The package uses no relative imports.)"""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"{path.name}: a relative import; write dtp_search.<module>"
            base = node.module or ""
            out += [
                f"{base}.{a.name}" if _is_module(f"{base}.{a.name}") else base for a in node.names
            ]
    return out


def _graph() -> dict[str, set[str]]:
    """Module → the package modules it imports, at module level or inside functions (an
    import moved into a function to dodge a cycle is still one)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {
        name: {t for t in _imports(path) if t in modules and t != name}
        for name, path in modules.items()
    }


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _without_package_inits(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """A package's ``__init__`` re-exports its modules; a module importing a sibling
    through the package (``from dtp_search.pruning import X``) is not a cycle."""
    return {v: {w for w in deps if not v.startswith(w + ".")} for v, deps in graph.items()}


def test_no_import_cycles_in_the_package():
    graph = _without_package_inits(_graph())
    assert _cycles(graph) == []


def test_the_pruning_core_imports_neither_optuna_nor_mlflow():
    for path in (PACKAGE / "pruning").rglob("*.py"):
        roots = {target.split(".")[0] for target in _imports(path)}
        assert not roots & {"optuna", "mlflow", "hydra", "omegaconf"}, path.name
        assert not any(
            t.startswith("dtp_search.") and not t.startswith("dtp_search.pruning")
            for t in _imports(path)
        ), path.name


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
