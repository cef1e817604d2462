"""Optional extras: import them on demand, and say in one line how to get a missing one."""

from __future__ import annotations

import importlib
from types import ModuleType

# Which optional extra (pyproject.toml) brings each importable module.
EXTRA_OF = {
    "rich": "cli",
    "matplotlib": "plot",
    "av": "video",
    "simplejpeg": "video",
    "pytest": "test",
    "pytest_benchmark": "test",
    "faster_fifo": "bench",
    "iceoryx2": "bench",
    "redis": "redis",
    "hiredis": "redis",
}


class MissingExtra(Exception):
    """An optional dependency is not installed; str() is the one-line message for the user."""


def missing_message(module: str, purpose: str) -> str:
    top = module.split(".")[0]
    extra = EXTRA_OF.get(top)
    hint = f"pip install 'capsule_sessions[{extra}]'" if extra else f"pip install {top}"
    return f"{purpose} needs {top}, which is not installed ({hint})"


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise MissingExtra naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtra(missing_message(module, purpose)) from exc


def available(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True
