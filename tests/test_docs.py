"""The documentation is self-contained: what the package, its help texts and its docs
point to ships with the project, and the README opens the way a new user needs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import capsule_sessions
from capsule_sessions import cli

ROOT = Path(__file__).resolve().parents[1]

# Files of the project's own that a user reads: package code (docstrings and help texts),
# the docs, and the benchmark suite.
DOCUMENTS = sorted(
    [ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "RELIABILITY.md", ROOT / "bench" / "README.md"]
    + list((ROOT / "docs").glob("*.md"))
)
SOURCES = sorted(
    list((ROOT / "capsule_sessions").rglob("*.py")) + list((ROOT / "capsule_sessions").rglob("*.pyi"))
    + list((ROOT / "bench").glob("*.py")) + list((ROOT / "ext").glob("*.pyx"))
)
# The contract, the benchmark definitions and the Go source lived outside the project
# (in a directory beside the checkout), so a user of the package could not open them.
OUTSIDE = re.compile(r"\bSPEC\b|BENCH\.md|session\.go|\bshared/")
KNOWN: set = set()  # (file, text) pairs allowed to name what is outside; none are


def test_nothing_points_outside_the_project():
    found = []
    for path in DOCUMENTS + SOURCES:
        rel = path.relative_to(ROOT).as_posix()
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            match = OUTSIDE.search(line)
            if match and not any(rel == known_file and text in line for known_file, text in KNOWN):
                found.append(f"{rel}:{number}: {line.strip()}")
    assert found == [], "point to docs/spec.md or docs/bench.md instead:\n" + "\n".join(found)


_LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(document):
    broken = []
    for target in _LINK.findall(document.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a URL, or an anchor in the same page
        if not (document.parent / target.split("#", 1)[0]).exists():
            broken.append(target)
    assert broken == []


def test_help_texts_point_to_the_docs(capsys):
    for argv in (["--help"], ["bench", "--help"]):
        assert cli.main(argv) == 0
        assert "docs/bench.md" in capsys.readouterr().out, argv


def test_license_is_the_mit_text_pyproject_names():
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License\n\nCopyright (c) 2026 the capsule_sessions authors\n")
    assert "THE SOFTWARE IS PROVIDED \"AS IS\", WITHOUT WARRANTY OF ANY KIND" in text
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(r'^license = "MIT"$', pyproject, re.MULTILINE)
    assert re.search(r'^license-files = \["LICENSE"\]$', pyproject, re.MULTILINE)


def test_changelog_has_the_version_and_an_unreleased_section():
    headings = re.findall(r"^## (\S+)", (ROOT / "CHANGELOG.md").read_text(encoding="utf-8"), re.MULTILINE)
    assert headings[0] == "Unreleased"
    assert capsule_sessions.__version__ in headings


def _sections(text: str) -> list:
    return re.split(r"^## ", text, flags=re.MULTILINE)


def test_readme_opens_with_the_camera_loop_and_a_two_command_quick_start():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    intro, *sections = _sections(text)
    first = re.search(r"```python\n(.*?)```", intro, re.DOTALL)
    assert first, "the first python block belongs before the first section"
    camera_loop = first.group(1)
    for needed in ("threading.Thread", 'store_frame(pixels, source="camera", max_recent=2)', "async for frame in sub"):
        assert needed in camera_loop
    # The fake-clock tour starts later, in its own section.
    assert "FakeClock" not in intro

    (quick_start,) = [s for s in sections if s.startswith("Quick start")]
    (commands,) = re.findall(r"```sh\n(.*?)```", quick_start, re.DOTALL)
    assert [line.split("#")[0].strip() for line in commands.strip().splitlines()] == ["make demo", "make test"]
