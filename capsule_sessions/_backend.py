"""The one place that chooses a frame-buffer backend (the pure or the compiled twin).

``CAPSULE_SESSIONS_BACKEND=python|cython`` forces the process default; ``backend=`` on
``Session``/``SessionManager`` picks one per object. Asking for ``cython`` when the
extension is missing is an ``ImportError`` that says why, never a silent fallback.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from types import ModuleType

from . import _framebuf_py

_cython_import_error: str | None
try:
    _framebuf_c: ModuleType | None = importlib.import_module("capsule_sessions._framebuf")
except ModuleNotFoundError as exc:
    _framebuf_c = None
    _cython_import_error = f"the extension was not built ({exc})"
except ImportError as exc:  # built, but for another interpreter or numpy
    _framebuf_c = None
    _cython_import_error = f"importing capsule_sessions._framebuf failed: {exc}"
else:
    _cython_import_error = None

ENV_VAR = "CAPSULE_SESSIONS_BACKEND"
_MODULES: dict[str, ModuleType] = {"python": _framebuf_py}
if _framebuf_c is not None:
    _MODULES["cython"] = _framebuf_c
    # One public Subscription and FrameLoan class for both twins (capsule_sessions.
    # Subscription and .FrameLoan, the pure ones): isinstance() holds for a compiled
    # object too, without the compiled class deriving from a Python class.
    _framebuf_py.Subscription.register(_framebuf_c.Subscription)
    _framebuf_py.FrameLoan.register(_framebuf_c.FrameLoan)


def _missing_cython_message() -> str:
    return (
        "the Cython backend of capsule_sessions is not available: "
        f"{_cython_import_error}. "
        "Reinstall with a C compiler present (`pip install .` builds it), or choose the "
        f"pure backend with {ENV_VAR}=python or backend='python'."
    )


def available_backends() -> list[str]:
    """The backends this installation can run, fastest first."""
    return [name for name in ("cython", "python") if name in _MODULES]


def module_for(backend: str | None = None) -> ModuleType:
    """The frame-buffer module for ``backend`` (None: the process default)."""
    name = BACKEND if backend is None else backend
    if not isinstance(name, str):
        raise TypeError(f"backend must be 'python', 'cython' or None, got {type(name).__name__}")
    if name == "cython" and _framebuf_c is None:
        raise ImportError(_missing_cython_message())
    try:
        return _MODULES[name]
    except KeyError:
        raise ValueError(f"backend must be 'python', 'cython' or None, got {name!r}") from None


def _default_backend() -> str:
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    if forced == "cython" and _framebuf_c is None:
        raise ImportError(f"{ENV_VAR}=cython, but " + _missing_cython_message())
    if forced in ("python", "cython"):
        return forced
    if forced:
        raise ImportError(f"{ENV_VAR} must be 'python' or 'cython', got {forced!r}")
    return "cython" if _framebuf_c is not None else "python"


BACKEND: str = _default_backend()


# Session's C forwarders (see ext/capsule_sessions/_forward.h), or None without the extension.
ring_forward: Callable[[Callable[..., object], str, type, object], object] | None = (
    None if _framebuf_c is None else _framebuf_c.ring_forward
)


def name_of(module: ModuleType) -> str:
    return "cython" if module is _framebuf_c else "python"
