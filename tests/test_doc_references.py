"""Every Markdown file that the code, the tests or the docs point to is in the repository.

A reference to a file that only some engineers have (a design note outside the repository) leaves
someone who clones the project unable to follow it; the facts belong in ``docs/``. A cited section
(``docs/protocols.md#jupyterhub-rest-api``) must exist, and every section of docs/protocols.md must
be cited by the code, the tests or the docs: a fact nobody relies on is stale, and code relying on
an unwritten fact is what that page exists to prevent.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: A path-like token ending in .md inside Python sources (docstrings and comments).
_PY_REF = re.compile(r"(?<![\w/.-])((?:[\w-]+/)*[\w-]+\.md)\b")
#: A relative Markdown link target, with or without an #anchor.
_MD_LINK = re.compile(r"\]\(((?!https?:)[^)#\s]+\.md)(?:#[^)]*)?\)")
#: A cited section, in a source or a Markdown link: ``<file>.md#<anchor>``.
_SECTION_REF = re.compile(r"(?<![\w/.-])((?:[\w-]+/)*[\w-]+\.md)#([\w-]+)")
#: Where the protocol facts live.
PROTOCOLS = ROOT / "docs" / "protocols.md"


def _exists(ref: str, base: Path) -> bool:
    return any((where / ref).is_file() for where in (base, ROOT, ROOT / "docs"))


def _target(ref: str, base: Path) -> Path | None:
    return next((where / ref for where in (base, ROOT, ROOT / "docs")
                 if (where / ref).is_file()), None)


def anchors(markdown: str) -> list[str]:
    """The anchors of a Markdown text's headings, as GitHub makes them (lower case, punctuation
    dropped, spaces to hyphens); headings inside fenced code blocks are not headings."""
    found, fenced = [], False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            title = line.lstrip("#").strip().lower()
            found.append(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return found


def _citing_files() -> list[Path]:
    """Every file that may cite a section: Python sources, tests, benchmarks, README and docs."""
    paths = [*ROOT.glob("src/**/*.py"), *ROOT.glob("tests/**/*.py"), *ROOT.glob("bench/*.py"),
             ROOT / "README.md", *ROOT.glob("docs/*.md")]
    return [p for p in paths if "node_modules" not in p.parts]


def test_anchors_are_made_as_github_makes_them() -> None:
    text = "# Top\n## Jupyter Server behind `/s/{id}/`\n```\n# not a heading\n```\n### A (b, c)"
    assert anchors(text) == ["top", "jupyter-server-behind-sid", "a-b-c"]


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


def test_cited_sections_exist() -> None:
    missing = []
    for path in _citing_files():
        for ref, anchor in _SECTION_REF.findall(path.read_text(encoding="utf-8")):
            target = _target(ref, path.parent)
            if target is not None and anchor not in anchors(target.read_text(encoding="utf-8")):
                missing.append(f"{path.relative_to(ROOT)}: {ref}#{anchor}")
    assert missing == []


def test_every_protocol_section_is_cited() -> None:
    cited = {anchor for path in _citing_files() if path != PROTOCOLS
             for ref, anchor in _SECTION_REF.findall(path.read_text(encoding="utf-8"))
             if ref.endswith("protocols.md")}
    text = PROTOCOLS.read_text(encoding="utf-8")
    # The page's title and the heading that only groups subsections are not facts.
    sections = set(anchors(text)[1:]) - {"other-facts"}
    assert sorted(sections - cited) == []
