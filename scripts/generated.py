"""Shared by the generator scripts: write a generated file, or check it is current."""

from __future__ import annotations

import sys
from pathlib import Path


def write_or_check(path: Path, text: str, check: bool, command: str) -> int:
    """Write ``text`` to ``path``; with ``check``, write nothing and return 1 if stale."""
    if check:
        if not path.exists() or path.read_text() != text:
            print(f"{path} is stale: run {command}", file=sys.stderr)
            return 1
        return 0
    path.write_text(text)
    return 0
