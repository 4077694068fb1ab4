"""Print the import structure of the fcconv package as Markdown, for docs/architecture.md.

Read from the code with ast, so the section can be regenerated after the modules change:
``python docs/import_structure.py`` from the repository root.  For each module it lists the
fcconv modules imported at module level (what loading it loads) and those imported inside
function bodies (loaded only when that function runs), then any import cycle among the
module-level imports and among all of them.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = "fcconv"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def resolve(node: ast.ImportFrom, current: str, is_package: bool) -> list[str]:
    """The fcconv modules an ``import``/``from`` statement names (a ``from fcconv import x`` names fcconv.x if it is one)."""
    if node.level:
        base = current.split(".") if is_package else current.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    return [target] + [f"{target}.{alias.name}" for alias in node.names]


def imports_of(path: Path, name: str, modules: set[str]) -> tuple[set[str], set[str], set[str]]:
    """(module-level, in-function) fcconv imports of one file, and the third-party packages it imports at module level.

    ``if TYPE_CHECKING`` blocks are left out: they never run.
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    top: set[str] = set()
    lazy: set[str] = set()
    external: set[str] = set()

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return
        if isinstance(node, ast.Import | ast.ImportFrom):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                names = resolve(node, name, path.name == "__init__.py")
            found = {candidate for candidate in names if candidate in modules and candidate != name}
            (lazy if in_function else top).update(found)
            if not in_function and not (isinstance(node, ast.ImportFrom) and node.level):
                roots = {candidate.split(".")[0] for candidate in names if candidate}
                external.update(roots - set(sys.stdlib_module_names) - {PACKAGE, "__future__"})
        for child in ast.iter_child_nodes(node):
            visit(child, in_function or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda))

    visit(tree, False)
    return top, lazy - top, external


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def loads_on_import(name: str, top: dict[str, set[str]], external: dict[str, set[str]]) -> set[str]:
    """The third-party packages that importing ``name`` loads, through its module-level imports and theirs."""
    seen, todo = set(), [name]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(top[module])
            todo.extend(m for m in top if module.startswith(f"{m}."))  # a submodule loads its package first
    return set().union(*(external[module] for module in seen))


def short(name: str) -> str:
    return name.removeprefix(f"{PACKAGE}.") if name != PACKAGE else PACKAGE


def main() -> None:
    sys.setrecursionlimit(10_000)
    root = Path(__file__).resolve().parent.parent
    files = sorted((root / PACKAGE).rglob("*.py"))
    names = {module_name(path, root): path for path in files}
    top: dict[str, set[str]] = {}
    lazy: dict[str, set[str]] = {}
    external: dict[str, set[str]] = {}
    for name, path in names.items():
        top[name], lazy[name], external[name] = imports_of(path, name, set(names))

    header = "| module | imports at module level | imports inside functions | third-party, at module level | torch on import |"
    print(header)
    print("|---|---|---|---|---|")
    for name in sorted(names):
        groups = (top[name], lazy[name])
        listed = [", ".join(sorted(short(m) for m in group)) or "–" for group in groups]
        packages = ", ".join(sorted(external[name])) or "–"
        torch = "yes" if "torch" in loads_on_import(name, top, external) else "no"
        print(f"| `{short(name)}` | {listed[0]} | {listed[1]} | {packages} | {torch} |")
    print()
    every = {name: top[name] | lazy[name] for name in names}
    for label, graph in (("module-level imports", top), ("all imports, in-function ones included", every)):
        found = cycles(graph)
        text = "; ".join(" ↔ ".join(short(m) for m in component) for component in found) or "none"
        print(f"Cycles among {label}: {text}.")


if __name__ == "__main__":
    main()
