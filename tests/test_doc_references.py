"""Every Markdown file that the code, the tests or the docs point to is in the repository.

A reference to a file that only some engineers have (a design note outside the repository) leaves
someone who clones the project unable to follow it; the facts belong in ``docs/``.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: A path-like token ending in .md inside Python sources (docstrings and comments).
_PY_REF = re.compile(r"(?<![\w/.-])((?:[\w-]+/)*[\w-]+\.md)\b")
#: A relative Markdown link target, with or without an #anchor.
_MD_LINK = re.compile(r"\]\(((?!https?:)[^)#\s]+\.md)(?:#[^)]*)?\)")


def _exists(ref: str, base: Path) -> bool:
    return any((where / ref).is_file() for where in (base, ROOT, ROOT / "docs"))


def test_python_sources_cite_only_files_in_the_repository() -> None:
    missing = []
    for path in [*ROOT.glob("src/**/*.py"), *ROOT.glob("tests/**/*.py"), *ROOT.glob("bench/*.py")]:
        if "node_modules" in path.parts:
            continue
        for ref in _PY_REF.findall(path.read_text(encoding="utf-8")):
            if not _exists(ref, path.parent):
                missing.append(f"{path.relative_to(ROOT)}: {ref}")
    assert missing == []


def test_markdown_links_point_at_files_in_the_repository() -> None:
    missing = []
    for path in [ROOT / "README.md", *ROOT.glob("docs/*.md")]:
        for ref in _MD_LINK.findall(path.read_text(encoding="utf-8")):
            if not _exists(ref, path.parent):
                missing.append(f"{path.relative_to(ROOT)}: {ref}")
    assert missing == []
