"""The README and docs/ stay true to the tree: the code map names every module, and every relative link (and image)
points at a file, and at a heading of it where the link names one."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CODE_MAP = DOCS / "code-map.md"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
# [text](target) and ![alt](target); the target up to a space (a title may follow) or the closing parenthesis.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def modules() -> list[str]:
    """Every Python module of the engine and the nodes, and every script of the web extension, as repository paths."""
    found = [path for folder in ("lora_core", "nodes") for path in (ROOT / folder).rglob("*.py")
             if "__pycache__" not in path.parts]
    found += list((ROOT / "web").glob("*.js"))
    return sorted(path.relative_to(ROOT).as_posix() for path in found)


def links(page: Path) -> list[str]:
    """The link targets of a Markdown page, outside code blocks and code spans."""
    text = CODE_SPAN.sub("", FENCE.sub("", page.read_text(encoding="utf-8")))
    return LINK.findall(text)


def anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    found = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", text, re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        found.add(slug)
    return found


def test_the_code_map_lists_every_module() -> None:
    listed = set(re.findall(r"`([\w./-]+\.(?:py|js))`", CODE_MAP.read_text(encoding="utf-8")))
    missing = [module for module in modules() if module not in listed]
    assert missing == [], f"add these to docs/code-map.md, one line each: {missing}"


def test_the_readme_links_the_code_map() -> None:
    assert "docs/code-map.md" in links(ROOT / "README.md")


@pytest.mark.parametrize("page", PAGES, ids=[page.relative_to(ROOT).as_posix() for page in PAGES])
def test_every_relative_link_points_at_a_file(page: Path) -> None:
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: and the like
            continue
        path_part, _, anchor = target.partition("#")
        destination = (page.parent / path_part).resolve() if path_part else page
        if not destination.exists():
            broken.append(f"{target}: no such file")
        elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            broken.append(f"{target}: no heading with that anchor")
    assert broken == [], f"{page.relative_to(ROOT)}: {broken}"
