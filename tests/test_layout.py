"""The layout docs/architecture.md describes, held to the code: layers import only
downward, the twins map onto each other file for file and name for name, the compiled
twin's files and functions stay small, and every file a comment names exists.
"""

from __future__ import annotations

import ast
import io
import re
import subprocess
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "capsule_sessions"
PURE = PACKAGE / "_framebuf_py"
COMPILED = ROOT / "ext" / "capsule_sessions"

# docs/architecture.md's layers, lowest first; a module may import its own layer and
# the ones before it.
LAYERS = [
    {"_records", "errors", "_limits", "_validate", "_policy", "_json"},
    {"_framebuf_py", "_framebuf", "_shm"},
    {"_backend", "shared"},
    {"session"},
    {"manager", "ingest"},
    {"__init__"},  # the public API: what `from capsule_sessions import ...` gives
    {"cli", "bench", "__main__", "redis"},
]


def layer_of(module: str) -> int:
    """The layer of a module path below the package (``_framebuf_py._ring`` -> 1)."""
    head = module.split(".")[0]
    for number, layer in enumerate(LAYERS):
        if head in layer:
            return number
    raise AssertionError(f"capsule_sessions.{module} is in no layer of docs/architecture.md")


def imported_modules(path: Path) -> set[str]:
    """Modules of the package that ``path`` imports, as paths below the package."""
    here = path.relative_to(PACKAGE).with_suffix("").parts
    package = here[:-1] if here[-1] != "__init__" else here[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[: len(package) - node.level + 1])
                target = base + (node.module.split(".") if node.module else [])
                names = [target] if node.module else [
                    base + [alias.name] if base else [submodule_or_api(alias.name)] for alias in node.names]
            elif node.module and node.module.startswith("capsule_sessions"):
                target = node.module.split(".")[1:]
                names = [target] if target else [[submodule_or_api(alias.name)] for alias in node.names]
            else:
                continue
            found.update(".".join(name) for name in names if name)
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".", 1)[1] for alias in node.names
                         if alias.name.startswith("capsule_sessions."))
    return found


def submodule_or_api(name: str) -> str:
    """What ``from capsule_sessions import name`` takes: a module, or the public API."""
    is_module = (PACKAGE / f"{name}.py").exists() or (PACKAGE / name / "__init__.py").exists()
    return name if is_module else "__init__"


def package_modules() -> list[Path]:
    return [p for p in sorted(PACKAGE.rglob("*.py")) if p.name != "__init__.py" or p.parent != PACKAGE]


@pytest.mark.parametrize("path", package_modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_import_only_downward(path: Path) -> None:
    own = layer_of(".".join(path.relative_to(PACKAGE).with_suffix("").parts))
    upward = {module: layer_of(module) for module in imported_modules(path) if layer_of(module) > own}
    assert not upward, f"{path.relative_to(ROOT)} (layer {own + 1}) imports from layers above it: {upward}"


def test_the_compiled_twin_imports_only_downward() -> None:
    sources = "\n".join(p.read_text() for p in sorted(COMPILED.glob("*.p*")))
    imported = set(re.findall(r"^\s*(?:from|import) capsule_sessions\.?(\w*)(?: c?import (\w+))?", sources, re.M))
    modules = {module or name for module, name in imported} - {"_pthread"}
    assert modules, "the pattern found no import of the package: it no longer matches the sources"
    assert {module: layer_of(module) for module in modules if layer_of(module) > 1} == {}


def test_the_layer_check_sees_an_upward_import(tmp_path: Path) -> None:
    # The checks above pass vacuously if imported_modules finds nothing.
    assert "_ring" in " ".join(imported_modules(PURE / "__init__.py"))
    assert imported_modules(PACKAGE / "session.py") >= {"_backend", "_policy"}


# -- the twins map onto each other ----------------------------------------------------

# Jobs only one twin has (docs/architecture.md says why).
COMPILED_ONLY_FILES = {"_release", "_locks", "_args", "_framebuf"}
PURE_ONLY_FILES: set[str] = set()


def test_every_job_has_a_file_of_the_same_name_in_both_twins() -> None:
    pure = {p.stem for p in PURE.glob("_*.py")} - {"__init__"}
    # The shared-memory ring (_shm.pyx and its _shm_*.pxi) is a module of its own with no
    # pure twin: the pure backend does not share (docs/shared-memory.md).
    compiled = {p.stem for p in COMPILED.glob("_*.pxi") if not p.stem.startswith("_shm")} | {"_framebuf"}
    assert pure - PURE_ONLY_FILES == compiled - COMPILED_ONLY_FILES


def pure_members() -> dict[str, set[str]]:
    members: dict[str, set[str]] = {}
    for path in PURE.glob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef):
                members[node.name] = {
                    item.name for item in node.body
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and not item.name.startswith("__")
                }
    return members


def compiled_members() -> dict[str, set[str]]:
    """Methods (def and cdef) of each class of the compiled twin's .pxi files."""
    members: dict[str, set[str]] = {}
    current = None
    for path in COMPILED.glob("*.pxi"):
        for line in path.read_text().splitlines():
            head = re.match(r"cdef class (\w+)", line)
            if head:
                current = members.setdefault(head.group(1), set())
                continue
            if line and not line[0].isspace() and not line.startswith(("@", "#")):
                current = None
            method = re.match(r"    (?:async def|def|cdef [\w\s*]*?)\s*\b(\w+)\(", line)
            if current is not None and method and not method.group(1).startswith("__"):
                current.add(method.group(1))
    return members


# Members only one twin has, each for a reason docs/architecture.md gives.
PURE_ONLY_MEMBERS = {
    "FrameRing": {"_claim"},  # re-entry refused with RuntimeError
    "_FanOut": {"offer_oldest"},  # the compiled offer_to + next_pending in one step
}
COMPILED_ONLY_MEMBERS = {
    # Buffer reuse; and what the pure _commit writes out so that no Python call (where an
    # interrupt lands) comes between counting a frame and queueing it.
    "FrameRing": {"_copy_frame", "_take_evicted_buffer", "_replace_subscribers", "_queue_for_fan_out"},
    "_FanOut": {"push", "pop", "claim", "release", "wait_for_runner", "next_pending"},  # C runner state
    "_Queue": {"wants", "grow", "wake_parked", "wait_take"},  # lazy frames, C ring, GIL-free waits
    "_FrameBuffer": set(),
}


@pytest.mark.parametrize("cls", ["FrameRing", "FrameLoan", "Subscription", "_Queue", "_FanOut"])
def test_the_twins_classes_have_the_same_members(cls: str) -> None:
    pure = pure_members()[cls] - PURE_ONLY_MEMBERS.get(cls, set())
    compiled = compiled_members()[cls] - COMPILED_ONLY_MEMBERS.get(cls, set())
    assert pure == compiled, f"{cls}: pure only {sorted(pure - compiled)}, compiled only {sorted(compiled - pure)}"


def test_the_member_scan_finds_members() -> None:
    assert {"_commit", "_store", "store_frame"} <= compiled_members()["FrameRing"]
    assert {"_commit", "_store", "store_frame"} <= pure_members()["FrameRing"]


# -- small files, small functions -------------------------------------------------------

MAX_FILE_LINES = 450
MAX_FUNCTION_LINES = 60


@pytest.mark.parametrize("path", sorted(COMPILED.glob("*.p*")), ids=lambda p: p.name)
def test_the_compiled_twins_files_and_functions_are_small(path: Path) -> None:
    lines = path.read_text().splitlines()
    assert len(lines) <= MAX_FILE_LINES
    starts = [(i, len(line) - len(line.lstrip())) for i, line in enumerate(lines)
              if re.match(r"\s*(?:async def|def|cdef|cpdef)\s[^=]*\(.*", line) and not line.rstrip().endswith(",")
              or re.match(r"\s*(?:async def|def|cdef|cpdef)\s[^=]*\($", line)]
    for i, indent in starts:
        end = i + 1
        while end < len(lines) and (not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) > indent
                                    or lines[end].lstrip().startswith(")")):
            end += 1
        while not lines[end - 1].strip():
            end -= 1
        assert end - i <= MAX_FUNCTION_LINES, f"{path.name}:{i + 1} is {end - i} lines long"


# -- comments that resolve ----------------------------------------------------------------

# Headers of the C library and CPython, which no comment expects in the repository.
SYSTEM_FILES = {"Python.h", "structmember.h", "time.h", "errno.h", "pthread.h"}
FILE_REFERENCE = re.compile(r"(?<![\w./-])((?:[\w-]+/)*[\w.-]*\w\.(?:py|pyx|pxi|pxd|pyi|h|md|sh|toml|supp))\b")


def repository_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split()
    return [name for name in listed if (ROOT / name).exists()]


def commentary(path: Path) -> str:
    """What a file says about itself: comments and docstrings (all of it for Markdown)."""
    text = path.read_text(errors="replace")
    if path.suffix == ".md":
        return text
    if path.suffix == ".py":
        said = [tok.string for tok in tokenize.generate_tokens(io.StringIO(text).readline)
                if tok.type == tokenize.COMMENT]
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                said.append(ast.get_docstring(node) or "")
        return "\n".join(said)
    said = re.findall(r'"""(.*?)"""', text, re.S)
    said += [line.split("#", 1)[1] for line in text.splitlines()
             if "#" in line and not line.lstrip().startswith("#include")]
    said += re.findall(r"/\*(.*?)\*/", text, re.S)
    return "\n".join(said)


def test_every_file_a_comment_names_exists() -> None:
    files = repository_files()
    names = {Path(name).name for name in files}
    missing = []
    for name in files:
        path = ROOT / name
        if path.suffix not in {".py", ".pyx", ".pxi", ".pxd", ".pyi", ".h", ".md", ".sh"}:
            continue
        if name.startswith("CHANGELOG"):
            continue  # history names files as they were
        for reference in FILE_REFERENCE.findall(commentary(path)):
            if "/" in reference:
                found = (ROOT / reference).exists() or any(f.endswith("/" + reference) for f in files)
            else:
                found = reference in names or reference in SYSTEM_FILES
            if not found:
                missing.append(f"{name}: {reference}")
    assert missing == []


def test_the_reference_check_sees_a_missing_file(tmp_path: Path) -> None:
    stray = tmp_path / "note.py"
    stray.write_text('"""See ext/no_such_file.pyx and tests/test_layout.py."""\n# and docs/nowhere.md\n')
    found = set(FILE_REFERENCE.findall(commentary(stray)))
    assert found == {"ext/no_such_file.pyx", "tests/test_layout.py", "docs/nowhere.md"}
