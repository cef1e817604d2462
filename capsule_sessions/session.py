"""``Session``: one conversation's state, sequencing, history, dialog context and visual input."""

from __future__ import annotations

import dataclasses
import datetime
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from . import _backend
from . import _validate as v
from ._framebuf_py import FrameLoan, FrameRing, Subscription
from ._policy import VisualInputConfig, check_frame
from ._records import (
    ChatMessage,
    ConversationSnapshot,
    DialogContextItem,
    PipelineMode,
    SessionState,
    VisualFrame,
    rfc3339_from_instant,
)

if TYPE_CHECKING:
    import numpy as np
    from typing_extensions import Buffer


def _mode(value: Any) -> PipelineMode:
    try:
        return PipelineMode(value)
    except ValueError:
        raise ValueError(f"mode must be a PipelineMode (0 or 1), got {value!r}") from None


class Session:
    """A voice/vision session. Every method is safe to call from many threads at once."""

    # _ring is a slot so the compiled forwarders (_backend.ring_forward) find it at a
    # fixed offset; __dict__ keeps sessions open to attributes of their users.
    __slots__ = ("_ring", "__dict__", "__weakref__")

    def __init__(
        self,
        id: str,
        mode: PipelineMode = PipelineMode.OMNI,
        character_id: str = "",
        *,
        clock: Callable[[], float] | None = None,
        backend: str | None = None,
        shared: str | None = None,
    ) -> None:
        self.id = v.text(id, "id")
        self.mode = _mode(mode)
        self.character_id = v.text(character_id, "character_id")
        self._clock = time.monotonic if clock is None else v.clock(clock)
        self.created_at, _ = v.instant(self._clock(), "clock()")
        module = _backend.module_for(backend)
        self.backend = _backend.name_of(module)
        # Either twin's ring, or the shared-memory one; the pure twin's class stands for
        # all (they match).
        self.shared = shared
        self._ring: FrameRing
        if shared is None:
            self._ring = module.FrameRing(self._clock, self.created_at)
        else:
            from . import shared as _shared  # imported on use: most programs never share

            self._ring = _shared.make_ring(self.backend, shared, self.id, self._clock, self.created_at)
        self.pipeline_cancel: Callable[[], object] | None = None
        self.recording_dir: str | None = None
        self._lock = threading.Lock()
        self._state = SessionState.INIT
        self._owner_id = ""
        self._pipeline_seq = 0
        self._pipeline_done: threading.Event | None = None
        self._turn_seq = 0
        self._greeting_started = False
        self._history: list[ChatMessage] = []
        self._dialog_context: list[DialogContextItem] = []

    def __repr__(self) -> str:
        return f"<Session {self.id!r} state={self.state} mode={self.mode.name} backend={self.backend}>"

    # -- clock and state ---------------------------------------------------------
    def _now(self) -> float:
        return v.instant(self._clock(), "clock()")[0]

    @property
    def last_active_at(self) -> float:
        return self._ring.last_active_at

    @property
    def state(self) -> SessionState:
        return self._state

    def set_state(self, state: SessionState) -> None:
        try:
            state = SessionState(state)
        except ValueError:
            raise ValueError(f"state must be a SessionState (0..5), got {state!r}") from None
        with self._lock:
            self._state = state
        self._ring.touch()

    def touch(self, now: float | None = None) -> None:
        """Mark the session active at ``now`` (default: the clock)."""
        self._ring.touch(now)

    @property
    def owner_id(self) -> str:
        return self._owner_id

    def set_owner_id(self, owner_id: str) -> None:
        owner_id = v.text(owner_id, "owner_id")
        with self._lock:
            self._owner_id = owner_id

    # -- pipeline and turn sequencing -------------------------------------------
    def mark_pipeline_running(self) -> int:
        """Start a new pipeline generation; returns its sequence number."""
        with self._lock:
            self._pipeline_seq += 1
            self._pipeline_done = threading.Event()
            return self._pipeline_seq

    def mark_pipeline_finished(self, seq: int) -> None:
        """Signal that pipeline ``seq`` ended; a stale (older) ``seq`` is ignored."""
        seq = v.integer(seq, "seq")
        with self._lock:
            if seq != self._pipeline_seq or self._pipeline_done is None:
                return
            done = self._pipeline_done
        done.set()

    def is_current_pipeline(self, seq: int) -> bool:
        with self._lock:
            return self._pipeline_seq == seq

    def wait_pipeline_done(self, timeout: float | datetime.timedelta | None) -> bool:
        """Wait for the current pipeline; True when it is done or none was started."""
        seconds = v.timeout_seconds(timeout)
        with self._lock:
            done = self._pipeline_done
        return True if done is None else done.wait(seconds)

    def mark_turn_started(self) -> int:
        with self._lock:
            self._turn_seq += 1
            seq = self._turn_seq
        self._ring.touch()
        return seq

    @property
    def current_turn_seq(self) -> int:
        return self._turn_seq

    def is_current_turn(self, seq: int) -> bool:
        with self._lock:
            return self._turn_seq == seq

    def try_start_voice_startup_greeting(self) -> bool:
        """True exactly once per session: the startup greeting is never replayed."""
        with self._lock:
            if self._greeting_started:
                return False
            self._greeting_started = True
        self._ring.touch()
        return True

    # -- history and dialog context ---------------------------------------------
    def add_message(self, msg: ChatMessage) -> None:
        """Append ``msg`` (a copy). An assistant message of turn N > 0 goes right after
        the last message of turn N, so a late reply lands in its own turn. A timestamp of
        None is filled with now; otherwise it must be a valid instant (ValueError/TypeError
        naming ``msg.timestamp``, and nothing is stored)."""
        if not isinstance(msg, ChatMessage):
            raise TypeError(f"msg must be a ChatMessage, got {type(msg).__name__}")
        # Checked here because the record itself checks nothing: a NaN or far-off
        # timestamp stored now would make every later to_dict() fail.
        role = v.text(msg.role, "msg.role")
        content = v.text(msg.content, "msg.content")
        turn_seq = v.integer(msg.turn_seq, "msg.turn_seq")
        timestamp = None if msg.timestamp is None else v.instant(msg.timestamp, "msg.timestamp")[0]
        now = self._now()
        msg = dataclasses.replace(msg, role=role, content=content, turn_seq=turn_seq,
                                  timestamp=now if timestamp is None else timestamp)
        with self._lock:
            history = self._history
            index = len(history)
            if msg.turn_seq > 0 and msg.role == "assistant":
                for i in range(len(history) - 1, -1, -1):
                    if history[i].turn_seq == msg.turn_seq:
                        index = i + 1
                        break
            history.insert(index, msg)
        self._ring.touch(now)

    def history_snapshot(self) -> list[ChatMessage]:
        with self._lock:
            return [dataclasses.replace(m) for m in self._history]

    def conversation_snapshot(self) -> ConversationSnapshot:
        with self._lock:
            history = [dataclasses.replace(m) for m in self._history]
        return ConversationSnapshot(self.id, self.character_id, self.created_at, self.last_active_at, history)

    def set_dialog_context(self, items: Iterable[DialogContextItem]) -> None:
        try:
            items = iter(items)
        except TypeError:
            raise TypeError(f"items must be an iterable of DialogContextItem, got {type(items).__name__}") from None
        copied: list[DialogContextItem] = []
        for item in items:
            if not isinstance(item, DialogContextItem):
                raise TypeError(f"items must hold DialogContextItem objects, got {type(item).__name__}")
            copied.append(dataclasses.replace(item))
        with self._lock:
            self._dialog_context = copied

    def dialog_context_snapshot(self) -> list[DialogContextItem]:
        with self._lock:
            return [dataclasses.replace(item) for item in self._dialog_context]

    def to_dict(self) -> dict[str, str | int | list[dict[str, str | int]]]:
        """JSON-ready, like Go's json.Marshal of the session: instants in RFC 3339 UTC."""
        snapshot = self.conversation_snapshot()
        return {
            "id": self.id,
            "character_id": self.character_id,
            "mode": int(self.mode),
            "history": [m.to_dict(self._clock) for m in snapshot.history],
            "created_at": rfc3339_from_instant(snapshot.created_at, self._clock),
            "last_active_at": rfc3339_from_instant(snapshot.last_active_at, self._clock),
        }

    # -- visual input (delegated to the backend's ring) ---------------------------
    def start_visual_input(self, source: str, now: float | None = None) -> None:
        """Make ``source`` active; a different source clears the ring and the rate limiter."""
        self._ring.start_visual_input(source, now)

    def stop_visual_input(self, source: str = "", now: float | None = None) -> None:
        """Clear everything when ``source`` is empty, none is active, or it is the active one."""
        self._ring.stop_visual_input(source, now)

    def store_frame(self, data: Buffer | np.ndarray[Any, Any], *, source: str, max_recent: int,
                    min_interval: float | datetime.timedelta = 0.0, mime_type: str = "", width: int = 0,
                    height: int = 0, timestamp_ms: int = 0, frame_seq: int = 0, now: float | None = None) -> bool:
        """Store one frame's bytes (one copy); False when rate-limited. See docs/spec.md."""
        return self._ring.store_frame(data, source=source, max_recent=max_recent, min_interval=min_interval,
                                      mime_type=mime_type, width=width, height=height,
                                      timestamp_ms=timestamp_ms, frame_seq=frame_seq, now=now)

    def store_visual_frame(self, frame: VisualFrame, max_recent: int, min_interval: float | datetime.timedelta = 0.0,
                           now: float | None = None) -> bool:
        """Go's StoreVisualFrame: store a copy of ``frame`` unless rate-limited."""
        return self._ring.store_visual_frame(frame, max_recent, min_interval, now)

    def loan_frame(self, nbytes: int) -> FrameLoan:
        """Writable memory for one frame of ``nbytes`` bytes, to fill in place and then
        commit() as store_frame would store it (without a copy on the compiled backend)."""
        return self._ring.loan_frame(nbytes)

    def ingest_visual_frame(self, frame: VisualFrame, config: VisualInputConfig, now: float | None = None) -> bool:
        """Validate ``frame`` against a ``VisualInputConfig``, then store it."""
        check_frame(frame, config)
        return self._ring.store_visual_frame(frame, config.max_recent_frames, config.frame_interval, now)

    def latest_visual_frames(self, ttl: float | datetime.timedelta, now: float | None = None) -> list[VisualFrame]:
        """Frames no older than ``ttl`` (inclusive), oldest first; [] when ttl <= 0."""
        return self._ring.latest_visual_frames(ttl, now)

    def subscribe_visual_frames(self, buffer: int = 1, *, policy: str = "drop_newest") -> Subscription:
        """A bounded queue of every frame accepted from now on."""
        return self._ring.subscribe_visual_frames(buffer, policy=policy)

    def visual_stats(self) -> dict[str, int]:
        """accepted, rate_limited, source_resets (since creation); frames, bytes (held now)."""
        return self._ring.visual_stats()

    def shared_stats(self) -> dict[str, int]:
        """A shared session's costs: ``copied_out`` (frames copied past a reader's lease
        budget), ``readers``, ``subscriptions`` (in every process), ``buffers`` and
        ``buffer_bytes`` (its data segments). ValueError for a session not shared."""
        if self.shared is None:
            raise ValueError(f"session {self.id!r} is not shared (it was made without shared=)")
        ring: Any = self._ring
        stats: dict[str, int] = ring.shared_stats()
        return stats

    def _close(self) -> None:
        """Called by the manager on delete/evict: CLOSED, and every subscriber woken."""
        with self._lock:
            self._state = SessionState.CLOSED
        self._ring.close_subscriptions()


# The visual-input methods above forward to the ring unchanged. Where the compiled
# backend is built they are replaced by method descriptors that do the forwarding in C
# (a Python method costs more than a rate-limited store); on the class, each still is
# the Python method above (help, inspect.signature, mock.patch.object, overrides).
_FORWARDED = (
    "touch",
    "start_visual_input",
    "stop_visual_input",
    "store_frame",
    "store_visual_frame",
    "loan_frame",
    "latest_visual_frames",
    "subscribe_visual_frames",
    "visual_stats",
)
if _backend.ring_forward is not None:
    for _name in _FORWARDED:
        setattr(Session, _name, _backend.ring_forward(vars(Session)[_name], _name, Session, vars(Session)["_ring"]))
    del _name
