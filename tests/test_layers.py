"""Imports point only down: the floor table of docs/architecture.md holds for ``src/broker``.

The rules and the checker are ``scripts/layers.py`` (the picture's generator reads the same
table); these tests run it on the real package, on the real doc, and on small planted trees,
so a checker that stopped finding anything fails here too.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import layers  # noqa: E402  (scripts/ is not a package: added to the path just above)

DOC = ROOT / "docs" / "architecture.md"


def test_every_module_sits_on_a_floor_and_imports_only_downward() -> None:
    rows = layers.read_table(DOC.read_text(encoding="utf-8"))
    assert rows, "docs/architecture.md has no floor table"
    assert layers.check(ROOT / "src" / "broker", "broker", rows) == []


def test_every_row_says_what_its_module_is_for() -> None:
    rows = layers.read_table(DOC.read_text(encoding="utf-8"))
    assert [row.name for row in rows if len(row.job) < 10] == []


def test_the_picture_is_drawn_from_the_current_table() -> None:
    proc = subprocess.run([sys.executable, "scripts/gen-architecture.py", "--check"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for name, text in {"__init__.py": "", **files}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def _table(*rows: tuple[int, str]) -> list[layers.Row]:
    text = "| Floor | Module | Job |\n|---|---|---|\n" + "".join(
        f"| {floor} | `{name}` | what {name} does |\n" for floor, name in rows)
    return layers.read_table(text)


_FLOORS = ((1, "__init__.py"), (1, "low.py"), (2, "high.py"))


def test_a_clean_tree_passes(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"low.py": "import json\n", "high.py": "from pkg.low import x\n"})
    assert layers.check(root, "pkg", _table(*_FLOORS)) == []


@pytest.mark.parametrize("statement", [
    "from pkg.high import thing\n",
    "from pkg import high\n",
    "import pkg.high\n",
    "from . import high\n",
    "from .high import thing\n",
    "def lazy():\n    from pkg.high import thing\n",
    "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.high import Thing\n",
], ids=["from", "from-package", "import", "relative", "relative-from", "lazy", "type-checking"])
def test_an_upward_import_is_named_with_both_floors(tmp_path: Path, statement: str) -> None:
    root = _tree(tmp_path, {"low.py": statement, "high.py": ""})
    problems = layers.check(root, "pkg", _table(*_FLOORS))
    line = statement.count("\n")
    assert problems == [f"pkg/low.py:{line} imports pkg.high: floor 1 (`low.py`) may not "
                        "import from the higher floor 2 (`high.py`)"]


def test_an_import_cycle_inside_one_floor_fails(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"a.py": "from pkg import b\n", "b.py": "from pkg.a import x\n"})
    problems = layers.check(root, "pkg", _table((1, "__init__.py"), (1, "a.py"), (1, "b.py")))
    assert problems == ["import cycle among pkg.a, pkg.b"]


def test_a_module_without_a_row_and_a_row_without_a_module_fail(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"low.py": "", "sub/__init__.py": "", "sub/new.py": ""})
    problems = layers.check(root, "pkg", _table(*_FLOORS, (1, "sub/")))
    assert problems == [
        "the floor table names `high.py`, which is no module of pkg",
        "pkg.sub.new (`sub/new.py`) is on no floor: add its row (floor, module, job) to the "
        "floor table",
    ]
