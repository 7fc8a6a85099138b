"""The package's tree is its architecture: these checks keep it so (see CONTRIBUTING, Layout).

The client side (what runs on every start) imports only the standard library, itself and the
shared wire/paths modules; no module imports one that imports it back, directly or not; no
class grows past 400 lines. Imports inside functions count: they run too.
"""

from __future__ import annotations

import ast
import pathlib
import sys

PKG = pathlib.Path(__file__).resolve().parent.parent / "preloaded"
CLIENT_MAY_IMPORT = ("preloaded.client", "preloaded.wire", "preloaded.paths")
MAX_CLASS_LINES = 400


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict:
    return {module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PKG.rglob("*.py"))}


def imports(name: str, tree: ast.AST, known) -> set:
    """Every module ``tree`` imports, anywhere in it (``from a import b``: a.b if b is a module)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names
                         if f"{node.module}.{a.name}" in known)  # fmt: skip
    return found - {name}


def own(names) -> set:
    return {n for n in names if n == "preloaded" or n.startswith("preloaded.")}


def graph() -> dict:
    trees = modules()
    return {name: own(imports(name, tree, trees)) - {"preloaded"} for name, tree in trees.items()}


def cycles(edges: dict) -> list:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_circles():
    assert cycles(graph()) == []


def test_cycle_finder_finds_a_cycle():
    """The check above can fail: a circle of three modules is found."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_client_side_imports_only_stdlib_and_itself():
    trees = modules()
    for name, tree in trees.items():
        if name == "preloaded.starter" or name.startswith("preloaded.client"):
            for imported in imports(name, tree, trees):
                top = imported.split(".")[0]
                if top == "preloaded":
                    ok = imported == "preloaded" or imported.startswith(CLIENT_MAY_IMPORT)
                    assert ok, (name, imported)
                else:
                    assert top in sys.stdlib_module_names or top == "__future__", (name, imported)


def test_only_cli_imports_click():
    trees = modules()
    users = sorted(n for n, t in trees.items() if "click" in imports(n, t, trees))
    assert users == ["preloaded.cli"]


def test_no_class_over_400_lines():
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                lines = node.end_lineno - node.lineno + 1
                assert lines <= MAX_CLASS_LINES, f"{name}.{node.name}: {lines} lines"


def test_claimed_pythons_are_the_tested_ones():
    """pyproject's requires-python admits exactly 3.11 (bin/test) and bin/test-versions' list."""
    import re

    from packaging.specifiers import SpecifierSet

    root = PKG.parent
    spec = SpecifierSet(re.search(r'requires-python = "([^"]+)"',
                                  (root / "pyproject.toml").read_text()).group(1))  # fmt: skip
    claimed = {f"3.{minor}" for minor in range(6, 20) if f"3.{minor}.0" in spec}
    listed = re.search(r"VERSIONS=\(([^)]*)\)", (root / "bin" / "test-versions").read_text())
    assert claimed == set(listed.group(1).split()) | {"3.11"}
