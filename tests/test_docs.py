"""The documentation: README.md stays short and keeps its set-up commands, every
relative link in README.md and docs/ points at a file of the repository, and
the MkDocs site (docs/, mkdocs.yml) builds in strict mode. Nothing here needs
the compiled extension: the API reference is read from the sources."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"

# The two commands CI and new users run, kept verbatim in README.md.
INSTALL_AND_GENERATE = (
    'python -m pip install ".[model]" && python -m slot_cpp generate "Question: Natalia sold clips to 48'
    " of her friends in April, and then she sold half as many clips in May. How many clips did Natalia"
    ' sell altogether in April and May?\nAnswer:" --steps 5 --lr 0.1 --max-tokens 64'
)
TEST_COMMAND = 'python -m pip install ".[test]" && python -m pytest'

_FENCE = re.compile(r"^[ \t]*(```|~~~)")
_INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1", re.DOTALL)
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def _markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def _prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def _links(path: Path) -> list[str]:
    prose = "\n".join(_prose_lines(path.read_text(encoding="utf-8")))
    prose = _INLINE_CODE.sub("", prose)
    return _LINK.findall(prose)


def _is_relative(target: str) -> bool:
    return not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) and not target.startswith(("/", "#"))


def _anchors(path: Path) -> set[str]:
    """The heading ids MkDocs gives a page (Python-Markdown's toc slugify)."""
    from markdown.extensions.toc import slugify  # Python-Markdown, which MkDocs brings

    anchors = set()
    for line in _prose_lines(path.read_text(encoding="utf-8")):
        m = _HEADING.match(line)
        if m:
            title = _INLINE_CODE.sub(lambda c: c.group(0).strip("`"), m.group(2))
            anchors.add(slugify(title, "-"))
    return anchors


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n < 250, f"README.md has {n} lines; the manual belongs in docs/"


def test_readme_keeps_its_setup_commands():
    text = README.read_text(encoding="utf-8")
    assert INSTALL_AND_GENERATE in text
    assert f"```bash\n{TEST_COMMAND}\n```" in text
    # CI runs exactly the README's test command.
    assert TEST_COMMAND in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_the_link_checker_sees_links(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "See [a](a.md#x), ![b](img/b.png) and [c\nd](https://example.org).\n"
        "`[not](code.md)`\n```\n[not](fenced.md)\n```\n",
        encoding="utf-8",
    )
    assert _links(page) == ["a.md#x", "img/b.png", "https://example.org"]


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_files(path: Path):
    broken = []
    for target in _links(path):
        if not _is_relative(target):
            continue
        file_part, _, fragment = target.partition("#")
        resolved = (path.parent / file_part).resolve()
        if ROOT not in resolved.parents and resolved != ROOT:
            broken.append(f"{target} (outside the repository)")
        elif not resolved.exists():
            broken.append(f"{target} (no such file)")
        elif fragment and resolved.suffix == ".md" and fragment not in _anchors(resolved):
            broken.append(f"{target} (no heading #{fragment})")
    assert not broken, f"{path.relative_to(ROOT)}: " + "; ".join(broken)


def test_mkdocs_build_strict(tmp_path):
    site = tmp_path / "site"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (site / "index.html").is_file()
    # The API reference was generated from the docstrings.
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    for name in ("slot_cpp.Model", "slot_cpp.qalign", "slot_cpp.rtd", "slot_cpp.lmcor",
                 "slot_cpp.chat", "slot_cpp.server", "slot_cpp.options"):
        assert f'id="{name}' in api, name
    # The measurements the pages link to ship with the site, where the same
    # relative links resolve.
    assert (site / "benchmarks" / "results" / "bench_slot.md").is_file()
