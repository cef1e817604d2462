"""Backend selection: BACKEND, available_backends(), backend=, CAPSULE_SESSIONS_BACKEND."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import capsule_sessions
from capsule_sessions import Session, SessionManager, VisualFrame, available_backends
from conftest import REQUIRE_CYTHON_ENV, cython_required

ROOT = Path(__file__).resolve().parent.parent

# Runs in a fresh interpreter: optionally hides the compiled extension (as if it had
# not been built), imports the package and reports what it chose as JSON.
PROBE = textwrap.dedent(
    """
    import json, sys

    class HideExtension:
        def find_spec(self, name, path=None, target=None):
            if name == "capsule_sessions._framebuf":
                raise ModuleNotFoundError("hidden by the test: extension not built", name=name)
            return None

    if sys.argv[1] == "hide":
        sys.meta_path.insert(0, HideExtension())
    try:
        import capsule_sessions as cs
    except ImportError as exc:
        print(json.dumps({"import_error": str(exc)}))
        raise SystemExit(0)
    out = {"backend": cs.BACKEND, "available": cs.available_backends(), "session": cs.Session("x").backend}
    try:
        cs.Session("y", backend="cython")
        out["explicit_cython"] = "ok"
    except ImportError as exc:
        out["explicit_cython"] = "ImportError: " + str(exc)
    print(json.dumps(out))
    """
)


def probe(env_value, hide=False):
    env = {k: v for k, v in os.environ.items() if k != "CAPSULE_SESSIONS_BACKEND"}
    if env_value is not None:
        env["CAPSULE_SESSIONS_BACKEND"] = env_value
    done = subprocess.run([sys.executable, "-c", PROBE, "hide" if hide else "keep"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


needs_cython = pytest.mark.skipif("cython" not in available_backends(),
                                  reason="the Cython extension is not built in this checkout")


def test_available_backends():
    available = available_backends()
    assert "python" in available
    assert set(available) <= {"cython", "python"}
    assert available == sorted(available)  # fastest first: cython before python
    assert available_backends() is not available_backends()  # a fresh list each call


def test_backend_is_one_of_the_available():
    assert capsule_sessions.BACKEND in available_backends()
    forced = os.environ.get("CAPSULE_SESSIONS_BACKEND", "").strip().lower()
    assert capsule_sessions.BACKEND == (forced or available_backends()[0])


def test_backend_keyword_per_object(backend):
    assert Session("a", backend=backend).backend == backend
    with SessionManager(2, cleanup_interval=None, backend=backend) as m:
        assert m.create("a").backend == backend


def test_default_session_uses_the_process_backend():
    assert Session("a").backend == capsule_sessions.BACKEND


@needs_cython
def test_both_backends_in_one_process():
    py = Session("p", backend="python", clock=lambda: 1.0)
    cy = Session("c", backend="cython", clock=lambda: 1.0)
    for s in (py, cy):
        s.store_frame(b"same", source="cam", max_recent=1, frame_seq=3)
    [a], [b] = py.latest_visual_frames(1.0), cy.latest_visual_frames(1.0)
    assert isinstance(a, VisualFrame) and isinstance(b, VisualFrame)
    assert type(a) is type(b)
    assert a == b


@pytest.mark.parametrize("bad,error", [("bogus", ValueError), ("", ValueError), ("Python", ValueError),
                                       (3, TypeError), (b"python", TypeError)])
def test_bad_backend_name(bad, error):
    with pytest.raises(error, match="backend"):
        Session("a", backend=bad)
    with pytest.raises(error, match="backend"):
        SessionManager(1, cleanup_interval=None, backend=bad)


def test_env_python_forces_the_pure_backend():
    out = probe("python")
    assert out["backend"] == "python" and out["session"] == "python"
    assert out["available"] == available_backends()


def test_env_unset_picks_the_fastest():
    out = probe(None)
    assert out["backend"] == available_backends()[0] == out["session"]


def test_missing_extension_falls_back_only_by_default():
    out = probe(None, hide=True)
    assert out["backend"] == "python" and out["available"] == ["python"]
    # asking for it explicitly is an ImportError that says why and what to do instead
    message = out["explicit_cython"]
    assert message.startswith("ImportError: ")
    assert "hidden by the test" in message and "python" in message


def test_env_cython_without_extension_is_a_clear_import_error():
    out = probe("cython", hide=True)
    message = out["import_error"]
    assert "CAPSULE_SESSIONS_BACKEND=cython" in message
    assert "hidden by the test: extension not built" in message  # the reason
    assert "python" in message  # and the way out


def test_env_python_without_extension_works():
    out = probe("python", hide=True)
    assert out["backend"] == "python" and out["available"] == ["python"]


def test_env_bogus_is_an_error():
    out = probe("bogus")
    assert "bogus" in out["import_error"] and "CAPSULE_SESSIONS_BACKEND" in out["import_error"]


@needs_cython
def test_env_cython_with_extension():
    out = probe("cython")
    assert out["backend"] == "cython" and out["session"] == "cython" and out["explicit_cython"] == "ok"


@pytest.mark.skipif(not cython_required(), reason=f"{REQUIRE_CYTHON_ENV}=1 is not set (make test sets it)")
def test_cython_backend_loaded_when_required():
    from capsule_sessions import _backend

    assert _backend._cython_import_error is None
    assert "cython" in available_backends()
    assert Session("a", backend="cython").backend == "cython"


def test_missing_cython_is_an_error_not_a_skip_when_required(tmp_path):
    """With the env var set and the extension hidden, pytest must exit with an error."""
    (tmp_path / "test_nothing.py").write_text("def test_ok():\n    pass\n")
    (tmp_path / "conftest.py").write_text(
        "import sys\n"
        "class Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'capsule_sessions._framebuf':\n"
        "            raise ModuleNotFoundError('hidden by the test', name=name)\n"
        "sys.meta_path.insert(0, Hide())\n"
        "import importlib.util\n"
        f"sys.path.insert(0, {str(ROOT / 'tests')!r})\n"
        f"spec = importlib.util.spec_from_file_location('suite_conftest', {str(ROOT / 'tests' / 'conftest.py')!r})\n"
        "suite = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(suite)\n"
        "pytest_configure = suite.pytest_configure\n"
    )
    env = dict(os.environ, **{REQUIRE_CYTHON_ENV: "1"})
    env.pop("CAPSULE_SESSIONS_BACKEND", None)
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "Cython backend did not load" in done.stdout + done.stderr
    assert "hidden by the test" in done.stdout + done.stderr
