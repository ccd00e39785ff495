"""The documentation holds together: README.md is a short front door that links every page of docs/, and every
relative link in README.md, docs/*.md and runtime/kontext_toy/README.md reaches an existing file (and, with a
#anchor into a Markdown file, one of its headings)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_README_LINES = 250


def pages() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "runtime" / "kontext_toy" / "README.md"]


def prose(text: str) -> str:
    """The text outside fenced code blocks and inline code spans, where a link is a link."""
    text = re.sub(r"^ *```.*?^ *```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def links(text: str) -> list[str]:
    """The targets of the inline Markdown links (and images) in text."""
    return re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", prose(text))  # a link's text may run over lines


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: its rendered text lowercased, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
    text = text.replace("`", "").replace("*", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor in a Markdown file, with GitHub's -1, -2, ... for repeated ones."""
    seen: dict[str, int] = {}
    out = set()
    for line in re.sub(r"^ *```.*?^ *```", "", path.read_text(), flags=re.S | re.M).splitlines():
        m = re.match(r"#{1,6} +(.+?) *#* *$", line)
        if m:
            a = anchor(m.group(1))
            out.add(a if a not in seen else f"{a}-{seen[a]}")
            seen[a] = seen.get(a, 0) + 1
    return out


def shown(path: Path) -> str:
    return str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


def broken_links(page: Path) -> list[str]:
    """Each relative link of page that reaches no file, or no heading of the Markdown file it names."""
    broken = []
    for target in links(page.read_text()):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto: ...: not a file here
            continue
        path, _, frag = target.partition("#")
        dest = (page.parent / path).resolve() if path else page.resolve()
        if not dest.exists():
            broken.append(f"{target}: no file {shown(dest)}")
        elif frag and dest.suffix == ".md" and frag not in anchors(dest):
            broken.append(f"{target}: no heading with the anchor #{frag} in {shown(dest)}")
    return broken


def test_every_relative_link_reaches_a_file_and_a_heading():
    assert (ROOT / "docs").is_dir() and len(pages()) > 3
    broken = {str(p.relative_to(ROOT)): b for p in pages() if (b := broken_links(p))}
    assert not broken, broken


def test_the_link_check_sees_a_broken_link_and_a_wrong_anchor(tmp_path):
    (tmp_path / "there.md").write_text("# A heading: with `code` (and more)\n\n## A heading: with `code` (and more)\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](there.md#a-heading-with-code-and-more) [ok](there.md#a-heading-with-code-and-more-1) "
        "[web](https://example.com/x.md) `[code](nowhere.md)`\n\n[gone](nowhere.md) [bad](there.md#no-such)\n"
        "```\n[fenced](nowhere-either.md)\n```\n"
    )
    found = broken_links(page)
    assert len(found) == 2 and found[0].startswith("nowhere.md") and found[1].startswith("there.md#no-such"), found


def test_the_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines: move the depth into docs/"


def test_the_readme_links_every_docs_page():
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in links(README.read_text())}
    unlinked = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p.resolve() not in linked]
    assert not unlinked, f"README.md does not link docs/{unlinked}"


def test_the_readme_tables_are_rows_of_the_docs():
    """A figure on the front page is copied from a page in docs/, row for row, so the two cannot drift apart."""
    docs_rows = {line.strip() for p in (ROOT / "docs").glob("*.md") for line in p.read_text().splitlines()}
    rows = [line for line in README.read_text().splitlines() if line.startswith("| ")]
    assert rows, "the README has no table"
    drifted = [row for row in rows if row.strip() not in docs_rows]
    assert not drifted, drifted
