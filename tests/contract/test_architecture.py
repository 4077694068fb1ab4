"""The module structure fcconv promises: no import cycle, a head vocabulary free of both front ends, and a
checker that runs without torch.

The import graph is read from the source with ``ast``: an edge for every import a module makes when it is
imported (at module level, outside ``if TYPE_CHECKING:``), not for the lazy imports inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fcconv"
TORCH_SIDE = ("torch", "torchvision", "safetensors", "matplotlib")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _module_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """The import statements that run when the module is imported: module level, in if/try blocks too."""
    found, pending = [], list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If) and not _is_type_checking(node):
            pending += node.body + node.orelse
        elif isinstance(node, ast.Try):
            pending += node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body]
    return found


def _all_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    return [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]


def imported_names(name: str, nodes: list[ast.Import | ast.ImportFrom]) -> set[str]:
    """Every module the statements import, absolute (``from fcconv import memory`` gives ``fcconv.memory``)."""
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
            continue
        base = node.module or ""
        if node.level:
            anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join([*anchor, *([base] if base else [])])
        names.add(base)
        names.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES)
    return names


def import_graph() -> dict[str, set[str]]:
    """fcconv module -> the fcconv modules it imports at module level (its own package's ``__init__`` left out)."""
    graph = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        imported = imported_names(name, _module_level_imports(tree))
        graph[name] = {m for m in imported if m in MODULES and m != name and m != "fcconv"}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for child in sorted(graph[node]):
            if state.get(child) == "open":
                return [*stack[stack.index(child) :], child]
            if child not in state and (cycle := visit(child)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_there_is_no_import_cycle_among_fcconv_modules():
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_head_vocabulary_imports_neither_torch_fx_nor_onnx():
    head = {name: path for name, path in MODULES.items() if name == "fcconv.head" or name.startswith("fcconv.head.")}
    for name, path in head.items():
        imported = imported_names(name, _all_imports(ast.parse(path.read_text(), str(path))))
        front_ends = sorted(m for m in imported if m in ("torch", "onnx") or m.startswith(("torch.fx", "onnx.")))
        assert not front_ends, f"{name} imports {', '.join(front_ends)}"


def test_fcconv_check_and_the_cli_import_nothing_from_the_torch_side_when_loaded():
    graph = import_graph()
    external = {}
    for name, path in MODULES.items():
        external[name] = imported_names(name, _module_level_imports(ast.parse(path.read_text(), str(path))))
    for start in ("fcconv", "fcconv.check", "fcconv.cli", "fcconv.render", "fcconv.report"):
        if start not in MODULES:  # the CLI may be a package: its modules are listed on their own
            continue
        seen, pending = set(), [start]
        while pending:
            name = pending.pop()
            if name in seen:
                continue
            seen.add(name)
            torch_side = sorted(m for m in external[name] if m.partition(".")[0] in TORCH_SIDE)
            assert not torch_side, f"importing {start} imports {name}, which imports {', '.join(torch_side)}"
            pending += graph[name]
