"""The documentation runs as written: every Python block of README.md, CONTRIBUTING.md and
docs/*.md executes (complete imports, small shapes, CPU), and every relative link resolves.

A block that cannot run by nature (it needs torchrun or a GPU) is marked by an HTML comment on
the line right before its fence, ``<!-- no-run: the reason -->``; it is skipped with that
reason, and only such blocks are (CONTRIBUTING.md documents the marker).
"""

from __future__ import annotations

import glob
import os
import re

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = sorted(
    os.path.relpath(p, ROOT)
    for p in [os.path.join(ROOT, "README.md"), os.path.join(ROOT, "CONTRIBUTING.md")]
    + glob.glob(os.path.join(ROOT, "docs", "*.md"))
    if os.path.exists(p)
)
FENCE = re.compile(r"^(`{3,})([^`\s]*)\s*$")
NO_RUN = re.compile(r"^<!--\s*no-run:\s*(.+?)\s*-->\s*$")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def blocks(path: str) -> list[tuple[int, str, str, str | None]]:
    """``(line, language, code, no-run reason)`` of each fenced block of a markdown file."""
    lines = open(os.path.join(ROOT, path), encoding="utf-8").read().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        start, ticks, lang = i, m.group(1), m.group(2)
        j = i + 1
        while j < len(lines) and lines[j].rstrip() != ticks:  # a fence closes with its own backticks
            j += 1
        reason = NO_RUN.match(lines[start - 1]) if start > 0 else None
        out.append((start + 1, lang, "\n".join(lines[start + 1 : j]) + "\n", reason and reason.group(1)))
        i = j + 1
    return out


PYTHON_BLOCKS = [(path, line, code, why) for path in DOCS for line, lang, code, why in blocks(path) if lang == "python"]


def test_docs_have_python_blocks():
    # The collection itself: the README's quick start alone has four.
    assert sum(p == "README.md" for p, *_ in PYTHON_BLOCKS) >= 4


@pytest.mark.parametrize("path,line,code,why", PYTHON_BLOCKS, ids=[f"{p}:{n}" for p, n, *_ in PYTHON_BLOCKS])
def test_python_block_runs(path, line, code, why, monkeypatch, tmp_path):
    if why is not None:
        pytest.skip(f"marked no-run: {why}")
    # From the repository root (models/ and bench/ run from a checkout), in a fresh namespace,
    # on one thread (small shapes), with torch's state restored afterwards.
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    try:
        exec(compile(code, f"{path}:{line}", "exec"), {"__name__": "__doc_block__"})
    finally:
        torch.set_num_threads(threads)


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: str) -> set[str]:
    text = open(path, encoding="utf-8").read()
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return {_slug(m.group(1)) for m in re.finditer(r"^#+\s+(.+)$", text, flags=re.M)}


LINKS = [(path, target) for path in DOCS for target in LINK.findall(open(os.path.join(ROOT, path)).read())]


@pytest.mark.parametrize("path,target", LINKS, ids=[f"{p}->{t}" for p, t in LINKS])
def test_relative_link_resolves(path, target):
    if re.match(r"^[a-z][a-z0-9+.-]*:", target):
        pytest.skip("absolute URL (not fetched: no network)")
    file, _, anchor = target.partition("#")
    dest = os.path.normpath(os.path.join(ROOT, os.path.dirname(path), file)) if file else os.path.join(ROOT, path)
    assert os.path.exists(dest), f"{path}: link {target!r} -> {os.path.relpath(dest, ROOT)} does not exist"
    if anchor and dest.endswith(".md"):
        assert anchor in _anchors(dest), f"{path}: link {target!r}: no heading with anchor #{anchor}"


def test_readme_is_a_front_page():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert len(text.splitlines()) <= 250
    # Exactly the two set-up-and-run commands, in one block.
    bash = [code for _, lang, code, _ in blocks("README.md") if lang == "bash"]
    two = [c for c in bash if "make bench" in c and "make test" in c]
    assert len(two) == 1 and [ln.split("#")[0].strip() for ln in two[0].splitlines()] == ["make bench", "make test"]
    for section in ("## Install", "## Quick start", "## The two commands", "## Backends", "## GPU check",
                    "## Benchmarks", "## Guarantees", "## Repository map", "## License", "## Citation"):
        assert section in text, section
    assert "pretrained=False" in text and "PYTHONPATH" not in text
