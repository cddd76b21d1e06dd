"""The import graph of the package has no cycle (issue 9 Part A, issue 12).

The graph is read from the source (AST): module-level AND function-level imports of
qcow2 modules, since a function-level import only hides a cycle from the interpreter,
not from the design. Imports under `if TYPE_CHECKING:` are left out (never executed,
annotations only). The CLI's and the package's lazy imports by name (cli.COMMANDS,
qcow2._LAZY) are edges too. `from . import name` where name is no module is an import of
the package's __init__ (node "qcow2").
"""

from __future__ import annotations

import ast
from pathlib import Path

import qcow2
from qcow2 import cli

SRC = Path(qcow2.__file__).resolve().parent
MODULES = {p.stem for p in SRC.glob("*.py") if p.stem != "__init__"}

# Edges left out of the check, each for a cycle that cannot go; every entry must name
# its reason. None is left: check asks the image for its mode's checker and live weight
# (the registry in modes.py pairs OwnerRefcounts with OwnerChecker), so check imports
# no mode and owner does not import its checker.
EXCEPTIONS: set[tuple[str, str]] = set()


def _module_of(node: ast.ImportFrom | ast.Import, alias: ast.alias | None, here: str) -> str | None:
    """The qcow2 module (or "qcow2" for the package) an import statement reaches."""
    if isinstance(node, ast.Import):
        assert alias is not None
        parts = alias.name.split(".")
        if parts[0] != "qcow2":
            return None
        return parts[1] if len(parts) > 1 else "qcow2"
    if node.level == 0:
        if not node.module or node.module.split(".")[0] != "qcow2":
            return None
        parts = node.module.split(".")
    elif node.level == 1:
        parts = ["qcow2", *(node.module.split(".") if node.module else [])]
    else:
        raise AssertionError(f"{here}: relative import beyond the package")
    if len(parts) > 1:
        return parts[1]
    assert alias is not None  # from . import NAME: a module, or a name of __init__
    return alias.name if alias.name in MODULES else "qcow2"


def _type_checking_only(tree: ast.Module) -> set[int]:
    """ids of the import nodes inside `if TYPE_CHECKING:` blocks."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) \
                and node.test.id == "TYPE_CHECKING":
            for sub in node.body:
                out.update(id(n) for n in ast.walk(sub))
    return out


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported module: line of the first such import}."""
    graph: dict[str, dict[str, int]] = {}
    for path in sorted(SRC.glob("*.py")):
        here = "qcow2" if path.stem == "__init__" else path.stem
        tree = ast.parse(path.read_text(), str(path))
        skip = _type_checking_only(tree)
        edges = graph.setdefault(here, {})
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in skip:
                continue
            for alias in node.names:
                target = _module_of(node, alias, here)
                if target is not None and target != here:
                    edges.setdefault(target, node.lineno)
    for module, _names in cli.COMMANDS:  # importlib.import_module(f".{module}")
        graph["cli"].setdefault(module, 0)
    for module in qcow2._LAZY.values():  # the package's __getattr__
        graph["qcow2"].setdefault(module, 0)
    return graph


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One cycle of the graph (as a path a -> ... -> a), or None."""
    state: dict[str, int] = {}  # 1: on the DFS stack, 2: done
    stack: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        stack.append(v)
        for w in sorted(graph.get(v, {})):
            if state.get(w) == 1:
                return [*stack[stack.index(w):], w]
            if w not in state:
                found = visit(w)
                if found:
                    return found
        stack.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state:
            found = visit(v)
            if found:
                return found
    return None


def test_the_graph_sees_function_level_imports() -> None:
    """The reader itself: a cycle hidden in a function is found (so the next test can fail)."""
    graph = import_graph()
    assert "image" in graph["snapshotcmd"]  # `from .image import open_image` in a function
    assert "numpy" not in graph["format"]  # only qcow2 modules
    assert "image" not in graph["snapshot"]  # ImageFile's import is TYPE_CHECKING only
    looped = {k: dict(v) for k, v in graph.items()}
    looped["format"]["image"] = 1
    assert find_cycle(looped) is not None


def test_import_graph_is_acyclic() -> None:
    graph = import_graph()
    for a, b in EXCEPTIONS:
        assert b in graph.get(a, {}), f"exception {a} -> {b} no longer exists: drop it"
    pruned = {a: {b: ln for b, ln in edges.items() if (a, b) not in EXCEPTIONS}
              for a, edges in graph.items()}
    cycle = find_cycle(pruned)
    where = [f"{a} (line {pruned[a][b]}) -> {b}" for a, b in zip(cycle, cycle[1:])] if cycle else []
    assert cycle is None, "import cycle: " + ", ".join(where)


def test_library_modules_do_not_import_the_package() -> None:
    """The package's __init__ imports its modules; none imports it back (`from . import
    open` would: modules use image.open_image). The CLI, which the package does not
    import, reads __version__ from it."""
    graph = import_graph()
    assert [m for m, edges in graph.items() if "qcow2" in edges] == ["cli"]
