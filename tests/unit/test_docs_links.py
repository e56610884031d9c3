"""The repository stands alone: README.md and docs/*.md link only to files inside it.

Every markdown link `[text](target)` that is not an http(s) or mailto link must resolve,
once its #fragment is stripped, to a file or directory that exists inside the repository.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXTERNAL = ("http://", "https://", "mailto:")
# [text](target) or [text](target "title"); text may hold `code` and nested brackets one deep
LINK = re.compile(r"\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(`{3,}|~{3,})")


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def links(text: str) -> list[tuple[int, str]]:
    """(line number, target) of every inline link outside fenced code blocks."""
    out: list[tuple[int, str]] = []
    fence: str | None = None
    for number, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line.lstrip())
        if m:
            mark = m.group(1)[0]
            if fence is None:
                fence = mark
            elif fence == mark:
                fence = None
            continue
        if fence is None:
            out.extend((number, t) for t in LINK.findall(line))
    return out


def problem(doc: Path, target: str, root: Path = ROOT) -> str | None:
    """Why `target`, linked from `doc`, breaks the rule; None when it is fine."""
    if target.lower().startswith(EXTERNAL):
        return None
    path = target.split("#", 1)[0]
    if not path:
        return None if target.startswith("#") else "empty link"
    if "://" in path or path.startswith(("/", "\\")):
        return "not a relative link to a file in the repository"
    resolved = (doc.parent / path).resolve()
    if not resolved.is_relative_to(root.resolve()):
        return "points outside the repository"
    if not resolved.exists():
        return "no such file in the repository"
    return None


def test_documents_exist() -> None:
    for doc in documents():
        assert doc.is_file(), doc
    assert (ROOT / "docs" / "protocol.md").is_file()
    assert (ROOT / "docs" / "design.md").is_file()


@pytest.mark.parametrize("doc", documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_links_stay_inside_the_repository(doc: Path) -> None:
    bad = [
        f"{doc.relative_to(ROOT)}:{line}: {target}: {why}"
        for line, target in links(doc.read_text(encoding="utf-8"))
        if (why := problem(doc, target)) is not None
    ]
    assert not bad, "\n".join(bad)


def test_readme_links_the_docs() -> None:
    targets = {t for _, t in links((ROOT / "README.md").read_text(encoding="utf-8"))}
    assert "docs/protocol.md" in targets
    assert "docs/design.md" in targets


def test_the_check_catches_what_it_must(tmp_path: Path) -> None:
    """The old README's link to ../shared/PROTOCOL.md, and the other ways to break the rule."""
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    (root / "docs" / "design.md").write_text("x", encoding="utf-8")
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "PROTOCOL.md").write_text("x", encoding="utf-8")
    readme = root / "README.md"
    readme.write_text("x", encoding="utf-8")
    old = "The wire protocol, in our words: [`../shared/PROTOCOL.md`](../shared/PROTOCOL.md)."
    assert links(old) == [(1, "../shared/PROTOCOL.md")]
    assert problem(readme, "../shared/PROTOCOL.md", root) == "points outside the repository"
    assert problem(readme, "docs/missing.md", root) == "no such file in the repository"
    assert problem(readme, "/etc/passwd", root) is not None
    assert problem(readme, "file:///etc/passwd", root) is not None
    assert problem(readme, "docs/design.md#tests", root) is None
    assert problem(root / "docs" / "design.md", "../README.md", root) is None
    assert problem(readme, "#how-it-works", root) is None
    assert problem(readme, "https://example.org/", root) is None
    fenced = "```\n[a](../outside.md)\n```\n[b](docs/design.md)\n"
    assert links(fenced) == [(4, "docs/design.md")]
