"""The package as a user gets it: a wheel of this checkout in a fresh venv, run from a
directory that is not the checkout, so nothing can quietly come from the source tree.

Building and installing the wheel takes about 20 s, once per test session (the fixtures
are session-scoped); those tests are marked ``slow`` so they can be selected or left
out (``-m "not slow"``), and ``make test`` runs them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Build outputs and local state: a wheel must build from sources alone, and copying a
# compiled .so or a generated .c along would hide a build that no longer works.
_NOT_SOURCES = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".cache", ".pytest_cache",
    ".benchmarks", ".hypothesis", "bench-results", "crash-*", "*.so", "*.pyd", "*.o", "*.c", "*.html",
)
_BUILD_TIMEOUT = 600  # a cold compile on a loaded 2-core machine; normally ~15 s


def _run(argv: list, **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("timeout", _BUILD_TIMEOUT)
    return subprocess.run(argv, capture_output=True, text=True, **kwargs)


def _clean_env(**extra: str) -> dict:
    """The environment minus whatever would point Python back at this checkout."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "CAPSULE_SESSIONS_BACKEND")}
    env.update(extra)
    return env


@dataclass(frozen=True)
class Wheel:
    path: Path
    build_output: str  # pip's stdout and stderr


# How Python prints a warning ("...: FutureWarning: ..."), and pip a build backend's one
# ("BuildBackendWarning: ..."); pip's own "WARNING: ..." lines are about its configuration.
_PYTHON_WARNING = re.compile(r"\b\w+Warning: ")


@pytest.fixture(scope="session")
def source_copy(tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("checkout") / "src"
    shutil.copytree(ROOT, dst, ignore=_NOT_SOURCES)
    return dst


@pytest.fixture(scope="session")
def wheel(source_copy, tmp_path_factory) -> Wheel:
    out = tmp_path_factory.mktemp("wheelhouse")
    result = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), "."],
                  cwd=source_copy, env=_clean_env())
    assert result.returncode == 0, f"pip wheel failed:\n{result.stdout}\n{result.stderr}"
    (built,) = out.glob("capsule_sessions-*.whl")
    return Wheel(built, result.stdout + result.stderr)


@pytest.fixture(scope="session")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed. It sees the base interpreter's
    site-packages (numpy, if the base has it, so no download), never this checkout's."""
    where = tmp_path_factory.mktemp("venv") / "v"
    made = _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(where)],
                env=_clean_env())
    assert made.returncode == 0, made.stderr
    python = where / "bin" / "python"
    # The running pip installs into the new interpreter: no ensurepip, a few seconds saved.
    installed = _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", str(wheel.path)],
                     env=_clean_env())
    assert installed.returncode == 0, f"installing the wheel failed:\n{installed.stdout}\n{installed.stderr}"
    return where


@pytest.mark.slow
def test_bench_runs_from_an_installed_wheel(venv, tmp_path):
    elsewhere = tmp_path / "not-a-checkout"
    elsewhere.mkdir()
    env = _clean_env(PATH=f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")

    # The package that runs is the installed one, with its compiled backend.
    probe = _run([str(venv / "bin" / "python"), "-c",
                  "import capsule_sessions; "
                  "print(capsule_sessions.__file__); print(','.join(capsule_sessions.available_backends()))"],
                 cwd=elsewhere, env=env, timeout=60)
    assert probe.returncode == 0, probe.stderr
    package_file, backends = probe.stdout.split()
    assert Path(package_file).resolve().is_relative_to(venv.resolve()), f"imported {package_file}, not the venv's"
    assert backends == "cython,python"

    result = _run([str(venv / "bin" / "capsule-sessions"), "bench", "--quick", "--workloads", "W1",
                   "--targets", "cython,python"], cwd=elsewhere, env=env, timeout=120)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("| workload |"))
    assert "| python ns/op | cython ns/op |" in header
    (row,) = [line for line in lines if line.startswith("| W1_store_4k_0sub |")]
    python_ns, cython_ns = (float(cell.replace(",", "")) for cell in row.strip("|").split("|")[1:3])
    assert python_ns > 0 and cython_ns > 0


def test_setuptools_packages_list_every_package():
    """A subpackage missing from pyproject's list is left out of the wheel, and only a
    run from an installed wheel would notice."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    listed = set(config["tool"]["setuptools"]["packages"])
    found = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "capsule_sessions").rglob("__init__.py")}
    assert listed == found


def _setuptools() -> str:
    return f"setuptools {metadata.version('setuptools')} in {sys.prefix}"


def test_make_build_prints_no_warnings(source_copy):
    """What ``make build`` runs, on the interpreter of the venv ``make`` set up: with the
    setuptools a 3.11 venv starts with, every run printed a "beta" warning for
    [tool.setuptools] and the wheel package's FutureWarning. The pure backend is built
    so that no compile runs; the warnings come from reading the configuration."""
    result = _run([sys.executable, "setup.py", "--quiet", "build_ext", "--inplace"], cwd=source_copy,
                  env=_clean_env(CAPSULE_SESSIONS_BACKEND="python"), timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", f"{_setuptools()} (make upgrades it):\n{result.stderr}"


@pytest.mark.slow
def test_building_the_wheel_prints_no_warnings(wheel):
    warnings = [line for line in wheel.build_output.splitlines() if _PYTHON_WARNING.search(line)]
    assert warnings == [], f"{_setuptools()}:\n{wheel.build_output}"


@pytest.mark.slow
def test_the_wheel_carries_the_license(wheel):
    with zipfile.ZipFile(wheel.path) as archive:
        names = archive.namelist()
        (license_file,) = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
        assert archive.read(license_file) == (ROOT / "LICENSE").read_bytes()
        (metadata_file,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        fields = archive.read(metadata_file).decode()
    assert "\nLicense-Expression: MIT\n" in fields
