"""The README is the front door and docs/ the manual: size, the two commands, and links that lead somewhere.

Every relative link in README.md and docs/*.md must name a file that exists and, for `page.md#anchor`
or `#anchor`, a heading of that page (GitHub's anchor for it). The checkers are also shown failing
on bad samples, so a pass means something.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]

FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text, lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading anchor of a page, repeated headings numbered as GitHub numbers them."""
    seen: dict[str, int] = {}
    found = set()
    for line in prose_lines(text):
        if match := re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line):
            base = slug(match.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(text: str) -> list[str]:
    """The targets of the Markdown links in a page's prose (code blocks and inline code skipped)."""
    targets = []
    for line in prose_lines(text):
        targets += LINK.findall(INLINE_CODE.sub("", line))
    return targets


def broken_links(page: Path) -> list[str]:
    """The relative links of a page that lead nowhere: a missing file, or a missing heading anchor."""
    errors = []
    for target in links(page.read_text()):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            errors.append(f"{page.name}: {target}: no file {path}")
        elif anchor and (file.suffix != ".md" or anchor not in anchors(file.read_text())):
            errors.append(f"{page.name}: {target}: no heading #{anchor} in {file.name}")
    return errors


def test_slug_follows_github() -> None:
    assert slug("Videos: `farm video`") == "videos-farm-video"
    assert slug("X/Y plots and contact sheets") == "xy-plots-and-contact-sheets"
    assert slug("On-prem") == "on-prem"
    assert slug("`make bench`") == "make-bench"
    assert slug("Ray token authentication") == "ray-token-authentication"
    assert anchors("# A\n## B\n```sh\n# not a heading\n```\n## B\n") == {"a", "b", "b-1"}


def test_link_checker_on_a_sample(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "other.md").write_text("# Other\n\n## Some part\n")
    page = tmp_path / "docs" / "page.md"
    page.write_text(
        "# Page\n\n## Here\n\n"
        "[ok](other.md) [ok](other.md#some-part) [ok](#here) [ok](https://docs.ray.io/x#y)\n"
        "[bad](missing.md) [bad](other.md#no-part) [bad](#nowhere) [bad](../nothing.yaml)\n"
        "`[not a link](missing.md)`\n\n```sh\n[not a link](missing.md)\n```\n"
    )
    assert broken_links(page) == [
        "page.md: missing.md: no file missing.md",
        "page.md: other.md#no-part: no heading #no-part in other.md",
        "page.md: #nowhere: no heading #nowhere in page.md",
        "page.md: ../nothing.yaml: no file ../nothing.yaml",
    ]


def test_readme_is_small() -> None:
    assert README.stat().st_size < 30_000


def test_readme_opens_with_the_two_commands() -> None:
    text = README.read_text()
    assert text.splitlines()[0] == "# farm"
    first_block = re.search(r"^```\w*\n(.*?)^```", text, re.M | re.S)
    assert first_block, "README.md has no code block"
    commands = [line.split("#")[0].strip() for line in first_block.group(1).splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_lead_somewhere(page: Path) -> None:
    assert broken_links(page) == []


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_docs_page_opens_with_a_title_a_sentence_and_the_way_back(page: Path) -> None:
    lines = page.read_text().splitlines()
    assert lines[0].startswith("# ") and lines[1] == "", "a one-line title, then a blank line"
    first_paragraph = " ".join(lines[2 : lines.index("", 2)])
    assert len(first_paragraph.split()) >= 10, "a sentence on what the page covers"
    assert "](../README.md)" in first_paragraph, "the first paragraph links back to the README"


def test_readme_links_every_docs_page() -> None:
    linked = {target.partition("#")[0] for target in links(README.read_text())}
    assert DOCS and {f"docs/{page.name}" for page in DOCS} <= linked


def test_architecture_lists_every_module() -> None:
    """docs/architecture.md's module map names every module of the package (DESIGN.md: keep the table true)."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    package = ROOT / "farm"
    modules = [p.relative_to(ROOT).as_posix() for p in sorted(package.rglob("*.py")) if p.name != "__init__.py"]
    assert modules and [m for m in modules if f"`{m}`" not in text] == []
