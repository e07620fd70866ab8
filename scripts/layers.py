"""The layer order of ``src/broker``: the floor table of docs/architecture.md, and its check.

The table is the one statement of which module sits on which floor; ``tests/test_layers.py``
checks the import graph against it and ``scripts/gen-architecture.py`` draws the picture from
it, so the doc, the picture and the check cannot drift apart.

A table row is ``| floor | `module` | job |``. A module is named by its path under
``src/broker``: ``sessions.py``, ``store/redis.py``; a package's ``__init__.py`` is named by the
package (``store/``), the root one as ``__init__.py``.

The rules (:func:`check`):

* every module has exactly one row, and every row names a module that exists;
* a module imports only from its own floor or lower ones;
* no import cycle, not even inside one floor (a cycle is two modules that are one).

Every ``import`` statement counts: at module level, inside functions (a lazy import is still a
dependency) and under ``if TYPE_CHECKING:`` (a type-only import upward still makes the reader
climb a floor to understand the lower one). A module that needs something of a higher floor
says what it needs as a ``Protocol`` or a callback of its own floor instead.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

#: A floor-table row: | 3 | `backends/base.py` | job in one line |
_ROW = re.compile(r"^\|\s*(\d+)\s*\|\s*`([^`]+)`\s*\|\s*(.+?)\s*\|\s*$")


@dataclass(frozen=True)
class Row:
    """One module's floor and job, as docs/architecture.md states them."""

    floor: int
    name: str
    job: str


@dataclass(frozen=True)
class Import:
    """One import of one application module by another."""

    source: str
    target: str
    line: int


def read_table(markdown: str) -> list[Row]:
    """The floor table's rows, in document order (every ``| n | `x` | ... |`` line)."""
    return [Row(int(m[1]), m[2], m[3]) for m in map(_ROW.match, markdown.splitlines()) if m]


def module_name(package: str, path: Path, root: Path) -> str:
    """``broker.store.redis`` for ``store/redis.py``; ``broker.store`` for its ``__init__``."""
    parts = [package, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path, package: str) -> dict[str, Path]:
    """Every module of the package under ``root`` (the package directory), by dotted name."""
    return {module_name(package, p, root): p for p in sorted(root.rglob("*.py"))}


def _table_key(package: str, module: str, path: Path) -> str:
    parts = module.split(".")[1:]
    if path.name == "__init__.py":
        return "/".join(parts) + "/" if parts else "__init__.py"
    return "/".join(parts) + ".py"


def imports(module: str, path: Path, known: set[str]) -> list[Import]:
    """The application modules ``module`` imports, wherever the statement stands.

    ``from a.b import c`` is an import of ``a.b.c`` when that is a module, else of ``a.b``;
    relative imports are resolved against ``module``. A package's ``__init__`` that Python
    runs on the way to a submodule is not counted: only what the statement names.
    """
    package_parts = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found: list[Import] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_parts[:len(package_parts) - (node.level - 1)]
                origin = ".".join([*base, node.module] if node.module else base)
            else:
                origin = node.module or ""
            targets = [f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in known else origin
                       for alias in node.names]
        for target in targets:
            while target and target not in known:  # import a.b.c of a module a.b: a.b
                target = target.rpartition(".")[0]
            if target and target != module:
                found.append(Import(module, target, node.lineno))
    return found


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def check(root: Path, package: str, rows: list[Row]) -> list[str]:
    """Every breach of the rules (module docstring) by the package under ``root``; [] if none."""
    problems: list[str] = []
    mods = modules(root, package)
    keys = {_table_key(package, name, path): name for name, path in mods.items()}
    floor: dict[str, int] = {}
    seen: set[str] = set()
    for row in rows:
        if row.name in seen:
            problems.append(f"`{row.name}` has two rows in the floor table")
        seen.add(row.name)
        if row.name not in keys:
            problems.append(f"the floor table names `{row.name}`, which is no module of "
                            f"{package}")
            continue
        floor[keys[row.name]] = row.floor
    for key, name in sorted(keys.items()):
        if name not in floor:
            problems.append(f"{name} (`{key}`) is on no floor: add its row (floor, module, job) "
                            "to the floor table")
    names = {name: key for key, name in keys.items()}
    edges: dict[str, set[str]] = {}
    for name, path in mods.items():
        for imp in imports(name, path, set(mods)):
            edges.setdefault(imp.source, set()).add(imp.target)
            src, dst = floor.get(imp.source), floor.get(imp.target)
            if src is not None and dst is not None and dst > src:
                problems.append(
                    f"{path.relative_to(root.parent)}:{imp.line} imports {imp.target}: "
                    f"floor {src} (`{names[imp.source]}`) may not import from the higher "
                    f"floor {dst} (`{names[imp.target]}`)")
    for cycle in _cycles(edges):
        problems.append("import cycle among " + ", ".join(cycle))
    return problems
