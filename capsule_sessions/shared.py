"""Shared sessions across processes: names, start-up sweep, ``attach`` and ``list_shared``.

A session made with ``shared="NAME"`` keeps its frame ring in POSIX shared memory under
the namespace ``NAME`` (``/dev/shm/capsule.NAME.<session>`` and one data segment per
frame buffer); any process of the same user can ``attach`` to it and read and
subscribe, zero-copy. docs/shared-memory.md holds the design and the guarantees.
Linux only (POSIX shared memory and futexes), and the compiled backend only.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import _validate as v
from .errors import SessionNotFoundError, SharedMemoryError

if TYPE_CHECKING:
    from ._framebuf_py import FrameRing
    from ._shm import AttachedSession

_shm: Any
try:
    _shm = importlib.import_module("capsule_sessions._shm")
except ImportError as exc:  # not Linux, or built without it
    _shm = None
    _shm_missing = str(exc)
else:
    _shm_missing = ""
    from ._framebuf_py import FrameLoan, Subscription

    # capsule_sessions.Subscription and FrameLoan cover shared sessions' too.
    Subscription.register(_shm.SharedSubscription)
    FrameLoan.register(_shm.SharedLoan)

SHM_DIR = "/dev/shm"
PREFIX = "capsule"
_NAMESPACE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_PLAIN_ID = re.compile(r"[A-Za-z0-9_-]{1,100}")
# A segment this young without a valid header may be one being made: a sweep leaves it.
_YOUNG_SECONDS = 10.0

__all__ = ["attach", "list_shared", "sweep"]


def _require_shm(what: str) -> Any:
    if _shm is None:
        raise ImportError(
            f"{what} needs the compiled backend's shared-memory module (capsule_sessions._shm), "
            f"which is not available here: {_shm_missing or 'not built'}. It is built on Linux "
            "by `pip install .` with a C compiler present.")
    return _shm


def check_namespace(namespace: object) -> str:
    """A namespace: 1-64 characters of A-Z, a-z, 0-9, '_' and '-' (so no '/' or '..')."""
    if not isinstance(namespace, str):
        raise TypeError(f"namespace must be a str, got {type(namespace).__name__}")
    if not _NAMESPACE.fullmatch(namespace):
        raise ValueError(f"namespace must be 1-64 characters of A-Z a-z 0-9 _ -, got {namespace!r}")
    return str.__str__(namespace)


def _stem(session_id: str) -> str:
    # Plain ids name their segment as they are, for `ls /dev/shm`; any other id (a path,
    # spaces, non-ASCII) by a hash, as '~' and hex, which no plain id can be.
    if _PLAIN_ID.fullmatch(session_id):
        return session_id
    digest = hashlib.blake2b(session_id.encode("utf-8", "surrogatepass"), digest_size=12).hexdigest()
    return "~" + digest


def control_name(namespace: str, session_id: str) -> str:
    return f"/{PREFIX}.{namespace}.{_stem(session_id)}"


def check_shared(namespace: object, backend: str) -> str:
    """``shared=`` of a Session or SessionManager on ``backend``: a valid namespace, and
    a backend that can share (ImportError otherwise)."""
    namespace = check_namespace(namespace)
    if backend != "cython":
        raise ImportError("shared= needs the compiled backend (backend='cython'); the pure backend "
                          "keeps frames in process memory only")
    _require_shm("shared=")
    return namespace


def make_ring(backend: str, namespace: object, session_id: str, clock: Callable[[], float],
              created_at: float) -> FrameRing:
    """The ring of a session made with ``shared=namespace`` (Session calls this)."""
    namespace = check_shared(namespace, backend)
    shm = _require_shm("shared=")
    sweep(namespace)
    name = control_name(namespace, session_id)
    nonce = secrets.randbits(64) or 1
    ring: FrameRing = shm.SharedRing(clock, created_at, namespace=namespace, session_id=session_id,
                                     control_name=name, data_prefix=f"{name}.{nonce:016x}")
    return ring


def _entries(namespace: str) -> tuple[dict[str, str], list[str]]:
    """Control segments (by stem) and data segments of ``namespace`` in /dev/shm."""
    controls: dict[str, str] = {}
    data: list[str] = []
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return controls, data
    start = f"{PREFIX}.{namespace}."
    for entry in names:
        if not entry.startswith(start):
            continue
        parts = entry.split(".")
        if len(parts) == 3:
            controls[parts[2]] = entry
        elif len(parts) == 5:
            data.append(entry)
    return controls, data


def _age_seconds(entry: str) -> float:
    try:
        return time.time() - os.stat(os.path.join(SHM_DIR, entry)).st_mtime
    except FileNotFoundError:
        return 0.0


def sweep(namespace: str) -> list[str]:
    """Unlink the segments of ``namespace`` that no live owner uses (left by a process
    that was killed); returns their names. Runs when a shared session is made."""
    namespace = check_namespace(namespace)
    shm = _require_shm("sweep()")
    controls, data = _entries(namespace)
    live: set[tuple[str, str]] = set()
    removed: list[str] = []
    for stem, entry in controls.items():
        try:
            _, pid, start, nonce, closed = shm.read_owner("/" + entry)
        except FileNotFoundError:
            continue
        except SharedMemoryError:
            if _age_seconds(entry) < _YOUNG_SECONDS:
                live.add((stem, "*"))
                continue
        else:
            if not closed and shm.process_alive(pid, start):
                live.add((stem, f"{nonce:016x}"))
                continue
        shm.unlink("/" + entry)
        removed.append(entry)
    for entry in data:
        _, _, stem, nonce, _ = entry.split(".")
        if (stem, nonce) in live or (stem, "*") in live:
            continue
        shm.unlink("/" + entry)
        removed.append(entry)
    return removed


def list_shared(namespace: str) -> list[str]:
    """The ids of the live shared sessions of ``namespace``, sorted."""
    namespace = check_namespace(namespace)
    shm = _require_shm("list_shared()")
    ids = []
    for entry in _entries(namespace)[0].values():
        try:
            session_id, pid, start, _, closed = shm.read_owner("/" + entry)
        except (FileNotFoundError, SharedMemoryError):
            continue
        if not closed and shm.process_alive(pid, start):
            ids.append(session_id)
    return sorted(ids)


def attach(session_id: str, *, namespace: str, timeout: float | None = None) -> AttachedSession:
    """The read side of shared session ``session_id`` of ``namespace``, in any process of
    the same user: ``latest_visual_frames``, ``subscribe_visual_frames``,
    ``visual_stats``, ``closed``, ``close()``. ``timeout`` waits that long for the
    session to appear (None: not at all); then ``SessionNotFoundError``. A segment that
    is not a valid session of this build is a ``SharedMemoryError``."""
    session_id = v.text(session_id, "session_id")
    namespace = check_namespace(namespace)
    seconds = v.timeout_seconds(timeout)
    shm = _require_shm("attach()")
    name = control_name(namespace, session_id)
    deadline = None if seconds is None else time.monotonic() + seconds
    while True:
        problem: SharedMemoryError | None = None
        try:
            _, pid, start, _, closed = shm.read_owner(name)
            if not closed and shm.process_alive(pid, start):
                attached: AttachedSession = shm.AttachedSession._attach(name, session_id, namespace)
                return attached
        except FileNotFoundError:
            pass
        except SharedMemoryError as exc:  # possibly one being made: retried until the deadline
            problem = exc
        if deadline is None or time.monotonic() >= deadline:
            if problem is not None:
                raise problem
            raise SessionNotFoundError(f"no live shared session {session_id!r} in namespace {namespace!r}")
        time.sleep(min(0.01, max(0.0, deadline - time.monotonic())))
