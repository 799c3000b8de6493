"""The package's modules import each other without cycles.

Every import statement counts, at module level or inside a function: a lazy import inside a function still makes
the two modules depend on each other, and such cycles are how layers start to leak (a runner reaching into the
exporter, a sampler swapping in its own subclass). The graph is read from the source with ``ast``, so nothing is
imported and no optional dependency is needed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "fastdiff"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """{dotted module name: file} for every .py file of the package (a package is its __init__.py)."""
    mods = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _imported_names(module: str, path: Path, node: ast.Import | ast.ImportFrom, mods: dict[str, Path]) -> list[str]:
    """The modules one import statement names. ``from a.b import c`` imports the submodule a.b.c when there is
    one, else the name c defined in a.b. The parent packages every import runs implicitly are not counted: a
    package's ``__init__`` importing its own submodules is not a cycle."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:  # relative: resolve against the module's package
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in mods else base for alias in node.names]


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """{module: the package modules it imports}, each import resolved to the deepest existing module."""
    graph = {}
    for module, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for name in _imported_names(module, path, node, mods):
                if name != PACKAGE and not name.startswith(PACKAGE + "."):
                    continue
                while name not in mods and "." in name:
                    name = name.rsplit(".", 1)[0]
                if name in mods and name != module:
                    deps.add(name)
        graph[module] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative), each sorted."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_package_has_no_import_cycles():
    graph = import_graph(module_files())
    assert len(graph) > 50, "the walk found too few modules: is ROOT right?"
    found = cycles(graph)
    detail = "\n".join(
        " <-> ".join(c) + "\n    " + "\n    ".join(f"{m} imports {sorted(graph[m] & set(c))}" for m in c)
        for c in found
    )
    assert not found, f"import cycles in {PACKAGE}:\n{detail}"


@pytest.mark.parametrize("graph,expected", [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
    ({"a": {"b"}, "b": {"a"}}, [["a", "b"]]),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ({"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"c"}}, [["a", "b"], ["c", "d"]]),
])
def test_cycle_finder_finds_what_is_there(graph, expected):
    assert sorted(cycles(graph)) == expected


def test_lazy_and_relative_imports_count(tmp_path):
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "one.py").write_text("from . import two\n")
    (pkg / "sub" / "two.py").write_text("def f():\n    from fastdiff.sub.one import g\n")
    graph = import_graph(module_files(pkg))
    assert graph["fastdiff.sub.one"] == {"fastdiff.sub.two"}
    assert graph["fastdiff.sub.two"] == {"fastdiff.sub.one"}
    assert cycles(graph) == [["fastdiff.sub.one", "fastdiff.sub.two"]]
