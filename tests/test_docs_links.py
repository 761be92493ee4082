"""The README and docs/ link to each other: every relative link resolves, and docs/README.md indexes every page."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown page (lower case, punctuation dropped, spaces to dashes)."""
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    heads = re.findall(r"(?m)^#{1,6}\s+(.*)$", text)
    return {"".join(c for c in h.strip().lower().replace(" ", "-") if c.isalnum() or c in "-_") for h in heads}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked here (no network in tests)
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor}")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {broken}"


def test_docs_index_lists_every_page():
    index = ROOT / "docs" / "README.md"
    text = index.read_text(encoding="utf-8")
    linked = {(index.parent / t.partition("#")[0]).resolve() for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)}
    pages = {p.resolve() for p in (ROOT / "docs").rglob("*.md") if p != index and "schemas" not in p.parts}
    missing = sorted(str(p.relative_to(ROOT)) for p in pages - linked)
    assert not missing, f"docs/README.md does not link {missing}"
