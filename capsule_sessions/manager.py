"""``SessionManager``: the set of live sessions, their limit, and idle eviction."""

from __future__ import annotations

import builtins
import datetime
import logging
import threading
import time
import weakref
from collections.abc import Callable

from . import _backend
from . import _validate as v
from ._records import PipelineMode
from .errors import MaxSessionsError, SessionError, SessionExistsError, SessionNotFoundError
from .session import Session

log = logging.getLogger(__name__)


def _cleanup_loop(manager_ref: weakref.ref[SessionManager], stopped: threading.Event, interval: float) -> None:
    # A weak reference, so a manager dropped without stop() is still collected; its
    # thread then ends at the next tick.
    while not stopped.wait(interval):
        manager = manager_ref()
        if manager is None:
            return
        # A BaseException from a callback is not caught: it ends this thread, as it would
        # any thread, once evict_idle has ended every session of the round.
        try:
            manager.evict_idle()
        except Exception:
            log.exception("capsule_sessions: idle eviction failed")
        del manager


class SessionManager:
    """Thread-safe registry of sessions with a concurrency limit and idle eviction.

    Unlike the Go original, ``on_session_end`` runs outside the manager's lock (it may
    call the manager), ``stop()`` is idempotent, and ending a session closes its
    subscriptions so their readers wake up and finish. A callback that raises, even
    ``KeyboardInterrupt``, does not keep the other sessions from being ended (``_end``).
    """

    def __init__(
        self,
        max_concurrent: int,
        idle_timeout: float | datetime.timedelta = 300.0,
        *,
        cleanup_interval: float | datetime.timedelta | None = 30.0,
        on_session_end: Callable[[Session], object] | None = None,
        clock: Callable[[], float] | None = None,
        backend: str | None = None,
        shared: str | None = None,
    ) -> None:
        self.max_concurrent = v.integer(max_concurrent, "max_concurrent", 0)
        # Any two instants are less than 2**63 ns apart, so a timeout clamped to the int64
        # range would never evict: inf (what 10**400 becomes) says the same directly.
        self.idle_timeout = v.duration_seconds(idle_timeout, "idle_timeout")
        if cleanup_interval is not None:
            cleanup_interval = v.timeout_seconds(cleanup_interval, "cleanup_interval")
            if cleanup_interval == 0:
                raise ValueError("cleanup_interval must be > 0 seconds, or None for no background eviction")
        if on_session_end is not None and not callable(on_session_end):
            raise TypeError(f"on_session_end must be callable or None, got {type(on_session_end).__name__}")
        self.on_session_end = on_session_end
        self._clock = time.monotonic if clock is None else v.clock(clock)
        self.backend = _backend.name_of(_backend.module_for(backend))
        if shared is not None:
            from .shared import check_shared

            shared = check_shared(shared, self.backend)
        # Every session this manager makes puts its frame ring in shared memory under it.
        self.shared = shared
        self._sessions: dict[str, Session] = {}
        self._closed = False
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        if cleanup_interval is not None:
            self._thread = threading.Thread(
                target=_cleanup_loop,
                args=(weakref.ref(self), self._stopped, cleanup_interval),
                name="capsule-sessions-cleanup",
                daemon=True,
            )
            self._thread.start()

    def __repr__(self) -> str:
        return f"<SessionManager {self.count()}/{self.max_concurrent} sessions backend={self.backend}>"

    def create(self, id: str, mode: PipelineMode = PipelineMode.OMNI, character_id: str = "") -> Session:
        id = v.text(id, "id")
        with self._lock:
            if self._closed:
                raise SessionError("the session manager is closed")
            if len(self._sessions) >= self.max_concurrent:
                raise MaxSessionsError(f"max concurrent sessions reached ({self.max_concurrent})")
            if id in self._sessions:
                raise SessionExistsError(f"session {id!r} already exists")
            session = Session(id, mode, character_id, clock=self._clock, backend=self.backend, shared=self.shared)
            self._sessions[id] = session
            return session

    def get(self, id: str) -> Session:
        with self._lock:
            try:
                return self._sessions[id]
            except (KeyError, TypeError):
                raise SessionNotFoundError(f"session {id!r} not found") from None

    def touch(self, id: str) -> None:
        self.get(id).touch()

    def delete(self, id: str) -> None:
        """End session ``id``: on_session_end, CLOSED, subscriptions closed. Unknown id: no-op."""
        with self._lock:
            try:
                session = self._sessions.pop(id, None)
            except TypeError:  # unhashable: never the id of a session, so unknown: no-op
                session = None
        if session is not None:
            self._end([session])

    # In this class body `list` is the method below, so annotations name the builtin in full.
    def list(self) -> builtins.list[Session]:
        with self._lock:
            return list(self._sessions.values())

    def count(self) -> int:
        with self._lock:
            return len(self._sessions)

    def __len__(self) -> int:
        return self.count()

    def __contains__(self, id: object) -> bool:
        with self._lock:
            try:
                return id in self._sessions
            except TypeError:
                return False

    def evict_idle(self, now: float | None = None) -> builtins.list[Session]:
        """End every session idle for longer than ``idle_timeout``; returns them.

        As in Go, idle means ``now - last_active_at > idle_timeout``: an infinite (or
        huge) timeout never evicts, 0 evicts every session not active at ``now``
        itself, and a negative one evicts every session.
        """
        now_s = v.instant(self._clock() if now is None else now, "now")[0]
        with self._lock:
            idle = [s for s in self._sessions.values() if now_s - s.last_active_at > self.idle_timeout]
            for session in idle:
                del self._sessions[session.id]
        self._end(idle)
        return idle

    def _end(self, sessions: builtins.list[Session]) -> None:
        """on_session_end, then close, for every session even when a callback raises;
        then re-raise.

        The sessions are already out of the registry, so one skipped here would stay
        half-ended for good (state INIT, its readers blocked forever). That holds for a
        ``BaseException`` too (``KeyboardInterrupt``, ``SystemExit``,
        ``asyncio.CancelledError``). When several callbacks raise, the first
        ``BaseException`` that is not an ``Exception`` is re-raised, since it asks the
        caller to stop; otherwise the first error.
        """
        # Outside the manager lock: the callback may call back into the manager.
        raised: BaseException | None = None
        for session in sessions:
            try:
                if self.on_session_end is not None:
                    self.on_session_end(session)
            except BaseException as exc:
                if raised is None or (isinstance(raised, Exception) and not isinstance(exc, Exception)):
                    raised = exc
            finally:
                session._close()
        if raised is not None:
            try:
                raise raised
            finally:
                raised = None  # the traceback references this frame: break the cycle

    def close(self) -> None:
        """Shut down: end every session once, as ``delete`` does (``on_session_end``,
        state CLOSED, subscriptions closed so blocked readers finish), then stop the
        cleanup thread. Idempotent; leaving ``with SessionManager(...)`` calls it, and
        ``create`` afterwards raises ``SessionError``. A callback's error is re-raised
        after every session was ended and the thread stopped."""
        with self._lock:
            self._closed = True
            sessions = list(self._sessions.values())
            self._sessions.clear()
        try:
            self._end(sessions)
        finally:
            self.stop()

    def stop(self) -> None:
        """Stop the background eviction thread (idempotent; returns once it has ended).
        Go's Stop: the sessions live on (``close()`` ends them)."""
        self._stopped.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def __enter__(self) -> SessionManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        stopped = getattr(self, "_stopped", None)
        if stopped is not None:
            stopped.set()
