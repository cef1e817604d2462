"""Types that catch mistakes: one public Subscription for both twins, a stub of the compiled
twin that matches the pure twin, and ``mypy --strict`` clean on the package and on a
program that uses all of it, while a misspelt field or a wrong argument is reported."""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import re
import subprocess
import sys
import textwrap
import types
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest

import capsule_sessions
from capsule_sessions import Session, Subscription, _framebuf_py, available_backends
from support import FakeClock

ROOT = Path(__file__).resolve().parents[1]
STUB = ROOT / "capsule_sessions" / "_framebuf.pyi"
USER_PROGRAM = ROOT / "tests" / "typing" / "user_program.py"
CLASSES = ("Subscription", "FrameLoan", "FrameRing")
# The protocol methods a user's code reaches through syntax (with, for, async for): they
# must agree too, though their names start with an underscore.
PROTOCOL = {"__init__", "__enter__", "__exit__", "__iter__", "__aiter__", "__anext__"}
needs_cython = pytest.mark.skipif("cython" not in available_backends(), reason="the Cython backend is not built")


# -- one public Subscription ------------------------------------------------------------


def test_a_subscription_is_a_capsule_sessions_subscription_on_every_backend(backend):
    session = Session("s", clock=FakeClock(), backend=backend)
    with session.subscribe_visual_frames() as sub:
        assert isinstance(sub, Subscription)
        assert isinstance(sub, capsule_sessions.Subscription)
        assert issubclass(type(sub), Subscription)
    assert Subscription is _framebuf_py.Subscription
    assert "Subscription" in capsule_sessions.__all__


def test_the_public_subscription_is_still_made_only_by_a_session():
    with pytest.raises(TypeError, match="subscribe_visual_frames"):
        Subscription()
    assert not isinstance(object(), Subscription)


# -- the stub and the twins agree -------------------------------------------------------


def _annotation(node: ast.expr | None) -> str | None:
    return None if node is None else ast.unparse(node)


def _normalized(annotation: object) -> str | None:
    """An annotation as source text, spelled as ast.unparse spells it."""
    if annotation is inspect.Parameter.empty:
        return None
    assert isinstance(annotation, str), f"{annotation!r}: the pure twin's annotations are strings (__future__)"
    return ast.unparse(ast.parse(annotation, mode="eval").body)


def _default(node: ast.expr) -> object:
    """A default's value: a literal, or a name of numpy's (``np.uint8``)."""
    try:
        return ast.literal_eval(node)
    except ValueError:
        module, _, name = ast.unparse(node).partition(".")
        assert module == "np", ast.unparse(node)
        return getattr(np, name)


def _stub_params(args: ast.arguments) -> list[tuple[str, str, object, str | None]]:
    """(name, kind, default, annotation) of each parameter, the default as its value."""
    out: list[tuple[str, str, object, str | None]] = []
    positional = args.posonlyargs + args.args
    defaults: list[object] = [inspect.Parameter.empty] * (len(positional) - len(args.defaults))
    defaults += [_default(d) for d in args.defaults]
    for i, (arg, default) in enumerate(zip(positional, defaults, strict=True)):
        kind = "POSITIONAL_ONLY" if i < len(args.posonlyargs) else "POSITIONAL_OR_KEYWORD"
        out.append((arg.arg, kind, default, _annotation(arg.annotation)))
    if args.vararg is not None:
        out.append((args.vararg.arg, "VAR_POSITIONAL", inspect.Parameter.empty, _annotation(args.vararg.annotation)))
    for arg, kw_default in zip(args.kwonlyargs, args.kw_defaults, strict=True):
        default = inspect.Parameter.empty if kw_default is None else _default(kw_default)
        out.append((arg.arg, "KEYWORD_ONLY", default, _annotation(arg.annotation)))
    if args.kwarg is not None:
        out.append((args.kwarg.arg, "VAR_KEYWORD", inspect.Parameter.empty, _annotation(args.kwarg.annotation)))
    return out


def _stub() -> ast.Module:
    return ast.parse(STUB.read_text(encoding="utf-8"))


def _stub_members(class_name: str) -> dict[str, tuple[str, list[tuple[str, str, object, str | None]], str | None]]:
    """{name: (kind, parameters, return annotation)} of one class of the stub; kind is
    'property', 'method' or 'async'."""
    (cls,) = [n for n in _stub().body if isinstance(n, ast.ClassDef) and n.name == class_name]
    members = {}
    for node in cls.body:
        assert isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef), ast.dump(node)
        decorators = [ast.unparse(d) for d in node.decorator_list]
        assert decorators in ([], ["property"]), decorators
        if decorators:
            kind = "property"
        else:
            kind = "async" if isinstance(node, ast.AsyncFunctionDef) else "method"
        members[node.name] = (kind, _stub_params(node.args), _annotation(node.returns))
    return members


def _pure_member(cls: type, name: str) -> tuple[str, list[tuple[str, str, object, str | None]], str | None]:
    attr = inspect.getattr_static(cls, name)
    kind = "property" if isinstance(attr, property) else "async" if inspect.iscoroutinefunction(attr) else "method"
    function = attr.fget if isinstance(attr, property) else attr
    signature = inspect.signature(function)
    params = [(p.name, p.kind.name, p.default, _normalized(p.annotation)) for p in signature.parameters.values()]
    return kind, params, _normalized(signature.return_annotation)


def _public(names: Iterable[str]) -> set[str]:
    return {name for name in names if not name.startswith("_")}


@pytest.mark.parametrize("class_name", CLASSES)
def test_the_stub_has_the_pure_twins_members_with_the_same_signatures(class_name):
    pure = getattr(_framebuf_py, class_name)
    stub = _stub_members(class_name)
    assert _public(stub) == _public(dir(pure))
    assert set(stub) - _public(stub) <= PROTOCOL
    for name in PROTOCOL:
        assert (name in stub) == (name in vars(pure)), f"{class_name}.{name}: in one of the stub and the pure twin only"
    for name, (kind, params, returns) in stub.items():
        assert (kind, params, returns) == _pure_member(pure, name), f"{class_name}.{name}"


@needs_cython
@pytest.mark.parametrize("class_name", CLASSES)
def test_the_compiled_twin_has_the_stubs_members(class_name):
    compiled = getattr(importlib.import_module("capsule_sessions._framebuf"), class_name)
    stub = _stub_members(class_name)
    assert _public(dir(compiled)) == _public(stub)
    for name, (kind, params, _) in stub.items():
        attr = inspect.getattr_static(compiled, name) if name != "__init__" else compiled
        assert (kind == "property") == inspect.isdatadescriptor(attr), f"{class_name}.{name}"
        if kind == "property" or name == "__init__":
            continue
        try:
            signature = inspect.signature(attr)
        except ValueError:  # a slot wrapper (__iter__, __aiter__, ...) has none to read
            continue
        # Without self, which Cython makes positional-only in some methods.
        got = [(p.name, p.kind.name, p.default) for p in list(signature.parameters.values())[1:]]
        if [kind for _, kind, _ in got] == ["VAR_POSITIONAL", "VAR_KEYWORD"]:
            continue  # unpacked by hand, so that a wrong call gets the pure twin's own TypeError
        assert got == [(n, k, d) for n, k, d, _ in params[1:]], f"{class_name}.{name}"


@needs_cython
def test_the_stub_declares_what_the_compiled_module_defines():
    compiled = importlib.import_module("capsule_sessions._framebuf")
    others = [importlib.import_module(f"capsule_sessions.{name}") for name in ("errors", "_records")]
    defined = {name for name in _public(vars(compiled))
               if not isinstance(getattr(compiled, name), types.ModuleType)
               and not any(getattr(other, name, None) is getattr(compiled, name) for other in others)}
    stub = _stub()
    declared = {node.name for node in stub.body if isinstance(node, ast.ClassDef | ast.FunctionDef)}
    constants = {node.target.id for node in stub.body
                 if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)}
    assert defined == _public(declared | constants)
    for name in constants - {"__all__"}:
        assert isinstance(getattr(compiled, name), int), name
    (all_,) = [node for node in stub.body if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "__all__"]
    assert ast.literal_eval(all_.value) == compiled.__all__ == _framebuf_py.__all__


def test_the_public_subscription_is_what_session_returns():
    signature = inspect.signature(Session.subscribe_visual_frames)
    assert signature.return_annotation == "Subscription"
    assert inspect.signature(Session.loan_frame).return_annotation == "FrameLoan"
    assert inspect.signature(Session.latest_visual_frames).return_annotation == "list[VisualFrame]"


# -- mypy --strict ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def mypy_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("mypy", reason="mypy (the 'lint' extra) is not installed")
    # One cache for the module's runs: the first one checks numpy's stubs and the
    # package, the next ones reuse that (well under a second each).
    return tmp_path_factory.mktemp("mypy-cache")


def _mypy(cache: Path, *paths: str | Path) -> subprocess.CompletedProcess[str]:
    # The package is always among the sources, so the checkout's copy is checked (not an
    # installed one) and its cached result serves every run.
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(cache), "--no-color-output",
         "--show-error-codes", "--no-error-summary", *map(str, paths)],
        cwd=ROOT, capture_output=True, text=True, timeout=150,
    )


@pytest.mark.mypy
@pytest.mark.timeout(180)
def test_mypy_strict_is_clean_on_the_package_and_a_program_using_all_of_it(mypy_cache):
    result = _mypy(mypy_cache, "capsule_sessions", USER_PROGRAM.relative_to(ROOT))
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_the_user_program_uses_every_public_name():
    tree = ast.parse(USER_PROGRAM.read_text(encoding="utf-8"))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                and node.module == "capsule_sessions" for alias in node.names}
    used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    assert set(capsule_sessions.__all__) <= imported & used


@pytest.mark.parametrize("backend_name", available_backends())
def test_the_user_program_runs(backend_name):
    result = subprocess.run([sys.executable, str(USER_PROGRAM)], cwd=ROOT, capture_output=True, text=True,
                            env=dict(os.environ, CAPSULE_SESSIONS_BACKEND=backend_name), timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip().endswith(f"on {backend_name}: done")


# Each line that ends in "# error: CODE" must get that error, and no other line any.
MISTAKES = '''
from capsule_sessions import Session

session = Session("s")
sub = session.subscribe_visual_frames(buffer=2)
frame = sub.get(timeout=1.0)
print(frame.frame_sq)  # error: attr-defined
session.store_frame("pixels", source="camera", max_recent=2)  # error: arg-type
session.subscribe_visual_frames(buffer="2")  # error: arg-type
for later in session.latest_visual_frames(10.0):
    print(later.widht)  # error: attr-defined
session.loan_frame(4).commit(source="camera")  # error: call-arg
session.loan_frame(4.0)  # error: arg-type
'''


@pytest.mark.mypy
@pytest.mark.timeout(180)
def test_mypy_reports_a_misspelt_field_and_a_wrong_argument(mypy_cache, tmp_path):
    source = textwrap.dedent(MISTAKES).lstrip()
    expected = {(number, match.group(1)) for number, line in enumerate(source.splitlines(), 1)
                if (match := re.search(r"# error: ([a-z-]+)$", line))}
    program = tmp_path / "mistakes.py"
    program.write_text(source, encoding="utf-8")
    result = _mypy(mypy_cache, "capsule_sessions", program)
    errors = [line for line in result.stdout.splitlines() if ": error: " in line]
    assert result.returncode == 1, result.stdout + result.stderr
    assert all(line.startswith(str(program)) for line in errors), errors  # none in the package
    found = {(int(m.group(1)), m.group(2)) for m in (re.search(r":(\d+): error: .*\[([a-z-]+)\]$", e) for e in errors)
             if m}
    assert found == expected, errors
    assert '"VisualFrame" has no attribute "frame_sq"' in result.stdout
