#!/usr/bin/env python3
"""Draw docs/architecture.md's picture of the floors from its floor table (scripts/layers.py).

    .venv/bin/python scripts/gen-architecture.py          # write
    .venv/bin/python scripts/gen-architecture.py --check  # exit 1 when stale (tests)

The picture is a Mermaid flowchart (GitHub renders it): one box per floor, top floor first,
listing the floor's modules by package; each floor may import only from the boxes below it.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from pathlib import Path

from generated import write_or_check
from layers import Row, read_table

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "architecture.md"
BEGIN = "<!-- picture: drawn by scripts/gen-architecture.py from the table; do not edit -->"
END = "<!-- end of picture -->"


def _floor_label(number: int, rows: list[Row]) -> str:
    """``3 · backends/ base · local · ...``: the floor's modules, grouped by package."""
    groups: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        package, _, module = row.name.rpartition("/")
        if row.name.endswith("/"):  # a package itself: its group, listed first
            groups.setdefault(row.name, [])
        elif package:
            groups[package + "/"].append(module.removesuffix(".py"))
        else:
            groups[""].append(row.name)
    parts = [f"{name} {' · '.join(members)}".strip() for name, members in groups.items() if name]
    if groups.get(""):
        parts.append(" · ".join(groups[""]))
    return f"{number} · " + "<br/>".join(parts)


def render_picture(rows: list[Row]) -> str:
    """The Mermaid block for the table's floors."""
    floors: dict[int, list[Row]] = defaultdict(list)
    for row in rows:
        floors[row.floor].append(row)
    lines = ["```mermaid", "flowchart TB"]
    order = sorted(floors, reverse=True)
    for number in order:
        lines.append(f'  F{number}["{_floor_label(number, floors[number])}"]')
    lines.append("  " + " --> ".join(f"F{number}" for number in order))
    lines.append("```")
    return "\n".join(lines)


def render(doc: str) -> str:
    """``doc`` with the picture between its markers redrawn from its own table."""
    picture = render_picture(read_table(doc))
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if not pattern.search(doc):
        raise SystemExit(f"{DOC} lacks the picture markers {BEGIN!r} ... {END!r}")
    return pattern.sub(lambda _: f"{BEGIN}\n{picture}\n{END}", doc)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the picture is stale")
    args = parser.parse_args()
    return write_or_check(DOC, render(DOC.read_text()), args.check,
                          ".venv/bin/python scripts/gen-architecture.py")


if __name__ == "__main__":
    raise SystemExit(main())
