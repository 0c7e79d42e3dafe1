"""Relative links in README.md and docs/*.md point to files that exist, and their #anchors to
headings that exist (GitHub's rule for heading anchors), so moving a section cannot leave a
dead link behind; the files the documents name (and every path on the architecture map)
exist, so moving a module cannot leave a stale map."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
#: a path in the repository as the documents write it (placeholders like tools/NAME, globs
#: and brace lists excepted below)
PATH = re.compile(r"(?<![\w/.~$-])((?:shards|pipelines|stcn|tools|jobs|tests|docs|\.ci)/[\w./-]*[\w/])"
                  r"(?![\w{*<%-])")


def anchors(path):
    """GitHub's heading anchors: lower case, punctuation but '-' and '_' dropped, spaces to
    '-', a repeated anchor numbered -1, -2, ..."""
    seen, out = {}, set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        m = re.match(r"#{1,6}\s+(.*)", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links(path):
    text = FENCE.sub("", path.read_text())
    return [t for t in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def test_documents_have_relative_links():
    # the check below must have something to check: the README links into docs/
    assert len(DOCUMENTS) >= 3
    assert any("docs/" in t for t in links(ROOT / "README.md"))


@pytest.mark.parametrize("doc", DOCUMENTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(doc):
    broken = []
    for target in links(doc):
        file, _, anchor = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        if not dest.exists():
            broken.append(f"{target}: no file {dest.relative_to(ROOT)}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor} in {dest.name}")
    assert not broken, f"{doc.name}: " + "; ".join(broken)


@pytest.mark.parametrize("doc", DOCUMENTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_named_files_exist(doc):
    """Every file path with an extension exists; on the architecture map, every path (folders
    too). Command examples name output folders (shards/davis/skip5) that are not files here."""
    every = doc.name == "ARCHITECTURE.md"
    named = {m.group(1) for m in PATH.finditer(doc.read_text())}
    checked = [p for p in named if "NAME" not in p and (every or re.search(r"\.\w+$", p))]
    assert checked, f"{doc.name} names no file: the pattern is broken"
    missing = sorted(p for p in checked if not (ROOT / p).exists())
    assert not missing, f"{doc.name} names files that do not exist: {missing}"
