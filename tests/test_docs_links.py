"""The README is a short front page and docs/ holds one topic per file, every link between them resolving.

Checks, for README.md and every docs/*.md: the README's size; every relative Markdown link (outside fenced
code blocks) points at a file that exists and, with a ``#anchor``, at a heading of that Markdown file whose
GitHub slug is the anchor; every docs page is linked from the README; every docs page says under its title
whom it is for (a line starting with ``For ``).
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_BYTES = 10_000

# [text](target) and ![alt](target); the target ends at whitespace (an optional "title") or the closing paren.
_LINK = re.compile(r"!?\[(?P<text>[^\]]*)\]\((?P<target><[^>]*>|[^)\s]*)(?:\s+\"[^\"]*\")?\)")
_FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})")
_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(?P<title>.*?)\s*#*\s*$")
_EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, ...


def _pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def _doc_pages() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _prose_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, line) of a Markdown file, leaving out fenced code blocks."""
    lines: list[tuple[int, str]] = []
    fence: str | None = None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        match = _FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)
        elif fence is not None:
            if match and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence):
                fence = None
        else:
            lines.append((number, line))
    return lines


def slug(title: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation other than - and _ removed, spaces to -."""
    text = re.sub(r"<[^>]+>", "", title)  # inline HTML
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link keeps its text
    text = unicodedata.normalize("NFC", text).strip().lower()
    text = "".join(ch for ch in text if ch in "-_ " or unicodedata.category(ch)[0] in "LNM")
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor GitHub makes for the headings of ``path`` (repeated slugs get -1, -2, ...)."""
    seen: dict[str, int] = {}
    result: set[str] = set()
    for _, line in _prose_lines(path):
        match = _HEADING.match(line)
        if not match:
            continue
        base = slug(match.group("title"))
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every Markdown link in ``path`` outside fenced code and inline code."""
    found: list[tuple[int, str]] = []
    for number, line in _prose_lines(path):
        without_code = re.sub(r"(`+).*?\1", "", line)
        for match in _LINK.finditer(without_code):
            found.append((number, match.group("target").strip("<>")))
    return found


def link_problems(path: Path) -> list[str]:
    """What is wrong with the relative links of one Markdown file, one message per broken link."""
    problems: list[str] = []
    for number, target in links(path):
        where = f"{_rel(path)}:{number}: link ({target})"
        if not target:
            problems.append(f"{where} has an empty target")
            continue
        if _EXTERNAL.match(target) or target.startswith("//"):
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            problems.append(f"{where}: {_rel(linked) if linked.is_relative_to(ROOT) else linked} does not exist")
            continue
        if anchor:
            if linked.suffix != ".md":
                problems.append(f"{where}: has an anchor but {linked.name} is not a Markdown file")
            elif anchor not in anchors(linked):
                problems.append(
                    f"{where}: {_rel(linked)} has no heading whose anchor is #{anchor} "
                    f"(its anchors: {', '.join(sorted(anchors(linked)))})"
                )
    return problems


def test_readme_is_a_short_front_page() -> None:
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, (
        f"README.md is {size} bytes, over the {README_MAX_BYTES} a front page may take; "
        "move the detail into a page under docs/ and link it"
    )


def test_there_are_docs_pages() -> None:
    assert _doc_pages(), "docs/ holds no *.md page"


@pytest.mark.parametrize("page", _pages(), ids=_rel)
def test_relative_links_resolve(page: Path) -> None:
    problems = link_problems(page)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_every_docs_page_is_linked_from_the_readme() -> None:
    linked = {
        (README.parent / target.partition("#")[0]).resolve()
        for _, target in links(README)
        if not _EXTERNAL.match(target) and target.partition("#")[0]
    }
    missing = [_rel(page) for page in _doc_pages() if page.resolve() not in linked]
    assert not missing, f"README.md does not link these docs pages: {', '.join(missing)}"


@pytest.mark.parametrize("page", _doc_pages(), ids=_rel)
def test_docs_page_says_whom_it_is_for(page: Path) -> None:
    prose = [(number, line) for number, line in _prose_lines(page) if line.strip()]
    assert prose and prose[0][1].startswith("# "), f"{_rel(page)}: the first line must be its title ('# ...')"
    assert len(prose) > 1, f"{_rel(page)}: nothing follows the title"
    number, line = prose[1]
    assert line.startswith("For "), (
        f"{_rel(page)}:{number}: the line under the title must say whom the page is for, starting with 'For ' "
        f"(found {line[:60]!r})"
    )


@pytest.mark.parametrize(
    ("title", "anchor"),
    [
        ("Trying it by hand, and how it is tested", "trying-it-by-hand-and-how-it-is-tested"),
        ("Checking a source: `fedcrm data check`", "checking-a-source-fedcrm-data-check"),
        ("report.json", "reportjson"),
        ("Secure aggregation: ours against Flower's SecAgg+ (`make bench-secagg`)",
         "secure-aggregation-ours-against-flowers-secagg-make-bench-secagg"),
        ("snake_case and hy-phen", "snake_case-and-hy-phen"),
    ],
)
def test_slugs_follow_github(title: str, anchor: str) -> None:
    assert slug(title) == anchor
