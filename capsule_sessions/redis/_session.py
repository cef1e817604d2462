"""``RedisSession``: a ``Session`` whose state lives in Redis, the same on every node.

Every method has the in-process ``Session``'s semantics and results (docs/spec.md);
this module says only where a node-local object had to choose:

- ``pipeline_cancel`` and ``recording_dir`` are attributes of this object, on this node
  (a callable cannot travel); the manager hands out one object per session and node, so
  ``manager.get(id).pipeline_cancel`` is the one set here.
- ``id``, ``mode``, ``character_id`` and ``created_at`` never change and are read once;
  everything else is read from Redis on every access, so it is the cluster's value.
- A session that ended keeps its keys for ``RETENTION_SECONDS`` (docs/redis.md): its
  objects work as an ended in-process session does. After that, or once a new session
  of the same id was made, its state reads ``CLOSED`` and every other call raises
  ``SessionNotFoundError``.
- Dialog context items are stored as JSON, so their fields must be what
  ``DialogContextItem`` says (``str``, ``str``, ``int``): anything else is a TypeError
  naming the field (the in-process session keeps any objects).

``_SessionCore`` holds what the sync and asyncio twins share (everything but I/O).
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from .. import _validate as v
from .._policy import VisualInputConfig, check_frame
from .._records import (
    ChatMessage,
    ConversationSnapshot,
    DialogContextItem,
    SessionState,
    VisualFrame,
    rfc3339_from_instant,
)
from ..errors import SessionNotFoundError
from . import _codec as c
from ._context import Context, encoded, key_names
from ._errors import translated
from ._keys import SessionKeys

if TYPE_CHECKING:
    import numpy as np
    from typing_extensions import Buffer

    from .._framebuf_py import FrameLoan, Subscription


def _optional(name: str) -> Any:
    """Module ``name`` of this package, or None while this tree has no such module."""
    try:
        return importlib.import_module(f"{__package__}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__package__}.{name}":
            raise
        return None


# The frame streams (docs/redis.md, "Frames"): the sync ring and the names of its keys
# in _frames, the asyncio ring in _frames_async. Without them, sessions refuse visual
# calls (RuntimeError) and everything else works.
_frames_module = _optional("_frames")
_frames_async_module = _optional("_frames_async")
RedisFrameRing: Any = getattr(_frames_module, "RedisFrameRing", None)
AsyncRedisFrameRing: Any = getattr(_frames_async_module, "AsyncRedisFrameRing", None) \
    or getattr(_frames_module, "AsyncRedisFrameRing", None)
_frame_keys: Any = getattr(_frames_module, "frame_keys", None)

NO_FRAMES_MESSAGE = "this build of capsule_sessions.redis has no frame streams (capsule_sessions/redis/_frames.py)"
# How long the keys of an ended session are kept: its objects on other nodes still work
# (as an ended in-process session does) and their subscribers still drain.
RETENTION_SECONDS = 600.0
# How often a pipeline wait wakes up: to run signal handlers, and to read the pipeline
# again in case a notice was lost on a reconnection.
WAIT_WAKE_SECONDS = 0.1
RECHECK_SECONDS = 1.0


def ring_keys(keys: SessionKeys) -> list[str]:
    """The names of the keys the frame ring keeps for a session (CREATE deletes them, a
    claim gives them the retention TTL)."""
    return [] if _frame_keys is None else list(_frame_keys(keys))


def activity(keys: SessionKeys) -> tuple[str, str]:
    """Where the frame ring records a touch (an accepted frame, a source change): the
    session hash's ``active`` field, in the ring's own script."""
    return keys.key("session"), "active"


def wall_text(instant: float) -> str:
    """An instant of the server's clock (Unix seconds) as RFC 3339 UTC."""
    text = datetime.datetime.fromtimestamp(instant, tz=datetime.timezone.utc).isoformat()
    return text.replace("+00:00", "Z")


def state_of(value: Any) -> SessionState:
    try:
        return SessionState(value)
    except ValueError:
        raise ValueError(f"state must be a SessionState (0..5), got {value!r}") from None


def checked_message(msg: Any, now: Callable[[], float]) -> ChatMessage:
    """add_message's checks and copy, as the in-process Session makes them."""
    if not isinstance(msg, ChatMessage):
        raise TypeError(f"msg must be a ChatMessage, got {type(msg).__name__}")
    role = v.text(msg.role, "msg.role")
    content = v.text(msg.content, "msg.content")
    turn_seq = v.integer(msg.turn_seq, "msg.turn_seq")
    timestamp = None if msg.timestamp is None else v.instant(msg.timestamp, "msg.timestamp")[0]
    at = now()
    return dataclasses.replace(msg, role=role, content=content, turn_seq=turn_seq,
                               timestamp=at if timestamp is None else timestamp)


def checked_items(items: Any) -> list[list[str]]:
    try:
        items = iter(items)
    except TypeError:
        raise TypeError(f"items must be an iterable of DialogContextItem, got {type(items).__name__}") from None
    stored = []
    for item in items:
        if not isinstance(item, DialogContextItem):
            raise TypeError(f"items must hold DialogContextItem objects, got {type(item).__name__}")
        stored.append(c.dialog_item(item))
    return stored


class _SessionCore:
    """The state and checks both twins share; no I/O."""

    def __init__(self, ctx: Context, record: c.Record) -> None:
        self.id = record.id
        self.mode = record.mode
        self.character_id = record.character_id
        self.created_at = record.created
        self.backend = "redis"
        self.shared: str | None = None
        self.namespace = ctx.namespace
        self.pipeline_cancel: Callable[[], object] | None = None
        self.recording_dir: str | None = None
        self._ctx = ctx
        self._inc = record.inc
        self._names = key_names(ctx.namespace, record.id)
        self._key = self._names.keys.key("session")
        # True on the ending node while on_session_end runs: the callback sees the state
        # from before CLOSED, as in-process (everyone else sees CLOSED from the claim on).
        self._ending = False
        self._ring_lock = threading.Lock()
        self._ring_made: Any = None

    # The frame ring is made on first use: a session that never sees a frame (and every
    # create) does not pay for it. ``_ring`` is what the in-process Session calls it.
    _ring_class: Any = None

    @property
    def _ring(self) -> Any:
        ring = self._ring_made
        if ring is None and self._ring_class is not None:
            with self._ring_lock:
                ring = self._ring_made
                if ring is None:
                    ctx = self._ctx
                    ring = self._ring_made = self._ring_class(ctx.client_for(self._names.session),
                                                              self._names.keys, ctx.url, ctx.clock,
                                                              activity=activity(self._names.keys),
                                                              incarnation=self._inc)
        return ring

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id!r} mode={self.mode.name} namespace={self.namespace!r}>"

    # -- time ----------------------------------------------------------------------
    def _now(self) -> float:
        return v.instant(self._ctx.clock(), "clock()")[0]

    def _instant(self, now: float | None) -> str:
        return c.instant_text(self._now() if now is None else v.instant(now, "now")[0])

    def _render(self, instant: float) -> str:
        if self._ctx.server_clock is not None:
            return wall_text(instant)
        return rfc3339_from_instant(instant, self._ctx.clock)

    def _message_dict(self, msg: ChatMessage) -> dict[str, str | int]:
        out: dict[str, str | int] = {"role": msg.role, "content": msg.content}
        if msg.timestamp is not None:
            out["timestamp"] = self._render(msg.timestamp)
        if msg.turn_seq:
            out["turn_seq"] = msg.turn_seq
        return out

    # -- replies -----------------------------------------------------------------------
    def _gone(self) -> SessionNotFoundError:
        return SessionNotFoundError(f"session {self.id!r} has ended and its record is gone from Redis")

    def _done(self, reply: Any) -> None:
        """A per-session script's reply: false (nil) when the record is gone."""
        if reply is None:
            raise self._gone()

    def _fields(self, reply: list[Any]) -> list[Any]:
        """An HMGET of ('inc', *fields): the fields, or SessionNotFoundError when gone."""
        if reply[0] != self._inc.encode():
            raise self._gone()
        return reply[1:]

    def _state_of(self, reply: list[Any]) -> SessionState:
        inc, state, ended, closed = reply
        if inc != self._inc.encode():
            return SessionState.CLOSED  # gone, or another incarnation: this one ended
        if c.flag_of(ended, self._key, "ended") and not c.flag_of(closed, self._key, "closed") \
                and not self._ending:
            return SessionState.CLOSED  # claimed: CLOSED everywhere but in its callback
        return SessionState(c.integer_of(state, self._key, "state", 0, 5))

    def _count(self, reply: Any, field: str) -> int:
        self._done(reply)
        return c.integer_of(reply, self._key, field)

    def _snapshot_of(self, reply: Any) -> tuple[float, list[ChatMessage]]:
        self._done(reply)
        active, history = reply
        return c.instant_of(active, self._key, "active"), c.history_of(history, self._names.keys.key("history"))

    def _dialog_of(self, reply: Any) -> list[DialogContextItem]:
        self._done(reply)
        return c.dialog_of(reply[0], self._names.keys.key("dialog"))

    def _dict_of(self, active: float, history: list[ChatMessage]) -> dict[str, str | int | list[dict[str, str | int]]]:
        return {
            "id": self.id,
            "character_id": self.character_id,
            "mode": int(self.mode),
            "history": [self._message_dict(m) for m in history],
            "created_at": self._render(self.created_at),
            "last_active_at": self._render(active),
        }

    # -- arguments ---------------------------------------------------------------------
    def _message_args(self, msg: Any) -> list[Any]:
        msg = checked_message(msg, self._now)
        prefix = c.turn_prefix(msg.turn_seq) if msg.turn_seq > 0 and msg.role == "assistant" else ""
        # The touch is the message's own now, as in-process (a given timestamp is not a touch).
        return [self._inc, self._instant(None), prefix, c.message_text(msg)]

    def shared_stats(self) -> dict[str, int]:
        raise ValueError(f"session {self.id!r} is not shared (it was made without shared=)")


class RedisSession(_SessionCore):
    """A voice/vision session stored in Redis; made by ``RedisSessionManager``. Every
    method is safe to call from many threads at once, and from many nodes."""

    _ring_class = RedisFrameRing

    def _hmget(self, *fields: str) -> list[Any]:
        with translated(self._ctx.url):
            return list(self._ctx.client.hmget(self._names.session, ["inc", *fields]))

    def _set(self, *pairs: str | bytes) -> None:
        with translated(self._ctx.url):
            self._done(self._ctx.scripts.set(keys=[self._names.session], args=[self._inc, *pairs]))

    # -- clock and state -----------------------------------------------------------
    @property
    def last_active_at(self) -> float:
        (active,) = self._fields(self._hmget("active"))
        return c.instant_of(active, self._key, "active")

    @property
    def state(self) -> SessionState:
        return self._state_of(self._hmget("state", "ended", "closed"))

    def set_state(self, state: SessionState) -> None:
        state = state_of(state)
        self._set("state", str(int(state)), "active", self._instant(None))

    def touch(self, now: float | None = None) -> None:
        """Mark the session active at ``now`` (default: the clock)."""
        self._set("active", self._instant(now))

    @property
    def owner_id(self) -> str:
        (owner,) = self._fields(self._hmget("owner"))
        return c.text_of(owner, self._key, "owner")

    def set_owner_id(self, owner_id: str) -> None:
        self._set("owner", encoded(v.text(owner_id, "owner_id")))

    # -- pipeline and turn sequencing -------------------------------------------
    def _increment(self, field: str, now: str) -> int:
        with translated(self._ctx.url):
            reply = self._ctx.scripts.increment(keys=[self._names.session], args=[self._inc, field, now])
        return self._count(reply, field)

    def mark_pipeline_running(self) -> int:
        """Start a new pipeline generation; returns its sequence number."""
        return self._increment("pseq", "")

    def mark_pipeline_finished(self, seq: int) -> None:
        """Signal that pipeline ``seq`` ended; a stale (older) ``seq`` is ignored."""
        seq = v.integer(seq, "seq")
        with translated(self._ctx.url):
            self._done(self._ctx.scripts.finish(keys=[self._names.session],
                                                args=[self._inc, str(seq), self._names.channel]))

    def _pipeline(self) -> tuple[int, int]:
        pseq, pfin = self._fields(self._hmget("pseq", "pfin"))
        return c.integer_of(pseq, self._key, "pseq"), c.integer_of(pfin, self._key, "pfin")

    def is_current_pipeline(self, seq: int) -> bool:
        return self._pipeline()[0] == seq

    def wait_pipeline_done(self, timeout: float | datetime.timedelta | None) -> bool:
        """Wait for the current pipeline, wherever it runs; True when it is done or none
        was started."""
        seconds = v.timeout_seconds(timeout)
        deadline = None if seconds is None else time.monotonic() + seconds
        target, finished = self._pipeline()
        if target == 0 or finished == target:
            return True
        if seconds == 0:
            return False
        with translated(self._ctx.url):
            pubsub = self._ctx.client.pubsub()
            try:
                # Subscribed (confirmed) before the pipeline is read again: a finish after
                # that read is published to us.
                pubsub.subscribe(self._names.channel)
                while pubsub.get_message(timeout=WAIT_WAKE_SECONDS) is None:
                    if deadline is not None and time.monotonic() >= deadline:
                        return False
                wanted = str(target).encode()
                while True:
                    if self._pipeline()[1] == target:
                        return True
                    recheck_at = time.monotonic() + RECHECK_SECONDS
                    while (now := time.monotonic()) < recheck_at:
                        if deadline is not None and now >= deadline:
                            return False
                        wait = min(WAIT_WAKE_SECONDS, recheck_at - now,
                                   WAIT_WAKE_SECONDS if deadline is None else deadline - now)
                        message = pubsub.get_message(ignore_subscribe_messages=True, timeout=wait)
                        if message is not None and message.get("data") == wanted:
                            return True
            finally:
                pubsub.close()

    def mark_turn_started(self) -> int:
        return self._increment("tseq", self._instant(None))

    @property
    def current_turn_seq(self) -> int:
        (tseq,) = self._fields(self._hmget("tseq"))
        return c.integer_of(tseq, self._key, "tseq")

    def is_current_turn(self, seq: int) -> bool:
        return self.current_turn_seq == seq

    def try_start_voice_startup_greeting(self) -> bool:
        """True exactly once per session, across every node: the startup greeting is
        never replayed."""
        with translated(self._ctx.url):
            reply = self._ctx.scripts.greet(keys=[self._names.session], args=[self._inc, self._instant(None)])
        self._done(reply)
        return bool(reply)

    # -- history and dialog context ---------------------------------------------
    def add_message(self, msg: ChatMessage) -> None:
        """Append ``msg`` (a copy); an assistant message of turn N > 0 goes right after
        the last message of turn N, atomically (docs/spec.md)."""
        args = self._message_args(msg)
        with translated(self._ctx.url):
            self._done(self._ctx.scripts.add_message(keys=[self._names.session, self._names.history], args=args))

    def _snapshot(self) -> tuple[float, list[ChatMessage]]:
        with translated(self._ctx.url):
            reply = self._ctx.scripts.snapshot(keys=[self._names.session, self._names.history], args=[self._inc])
        return self._snapshot_of(reply)

    def history_snapshot(self) -> list[ChatMessage]:
        return self._snapshot()[1]

    def conversation_snapshot(self) -> ConversationSnapshot:
        active, history = self._snapshot()
        return ConversationSnapshot(self.id, self.character_id, self.created_at, active, history)

    def set_dialog_context(self, items: Iterable[DialogContextItem]) -> None:
        stored = checked_items(items)
        with translated(self._ctx.url):
            self._done(self._ctx.scripts.set_dialog(keys=[self._names.session, self._names.dialog],
                                                    args=[self._inc, c.dialog_text(stored)]))

    def dialog_context_snapshot(self) -> list[DialogContextItem]:
        with translated(self._ctx.url):
            reply = self._ctx.scripts.dialog(keys=[self._names.session, self._names.dialog], args=[self._inc])
        return self._dialog_of(reply)

    def to_dict(self) -> dict[str, str | int | list[dict[str, str | int]]]:
        """JSON-ready, like Go's json.Marshal of the session: instants in RFC 3339 UTC
        (the server's wall time with the default clock, so every node renders alike)."""
        return self._dict_of(*self._snapshot())

    # -- visual input (the frame streams, _frames.py) ----------------------------------
    def _frames(self) -> Any:
        if self._ring is None:
            raise RuntimeError(NO_FRAMES_MESSAGE)
        return self._ring

    def start_visual_input(self, source: str, now: float | None = None) -> None:
        """Make ``source`` active; a different source clears the frames and the rate limiter."""
        self._frames().start_visual_input(source, now)

    def stop_visual_input(self, source: str = "", now: float | None = None) -> None:
        """Clear everything when ``source`` is empty, none is active, or it is the active one."""
        self._frames().stop_visual_input(source, now)

    def store_frame(self, data: Buffer | np.ndarray[Any, Any], *, source: str, max_recent: int,
                    min_interval: float | datetime.timedelta = 0.0, mime_type: str = "", width: int = 0,
                    height: int = 0, timestamp_ms: int = 0, frame_seq: int = 0, now: float | None = None) -> bool:
        """Store one frame's bytes in the session's stream; False when rate-limited."""
        result: bool = self._frames().store_frame(
            data, source=source, max_recent=max_recent, min_interval=min_interval, mime_type=mime_type,
            width=width, height=height, timestamp_ms=timestamp_ms, frame_seq=frame_seq, now=now)
        return result

    def store_visual_frame(self, frame: VisualFrame, max_recent: int, min_interval: float | datetime.timedelta = 0.0,
                           now: float | None = None) -> bool:
        result: bool = self._frames().store_visual_frame(frame, max_recent, min_interval, now)
        return result

    def loan_frame(self, nbytes: int) -> FrameLoan:
        loan: FrameLoan = self._frames().loan_frame(nbytes)
        return loan

    def ingest_visual_frame(self, frame: VisualFrame, config: VisualInputConfig, now: float | None = None) -> bool:
        """Validate ``frame`` against a ``VisualInputConfig``, then store it."""
        check_frame(frame, config)
        result: bool = self._frames().store_visual_frame(frame, config.max_recent_frames, config.frame_interval, now)
        return result

    def latest_visual_frames(self, ttl: float | datetime.timedelta, now: float | None = None) -> list[VisualFrame]:
        """Frames no older than ``ttl`` (inclusive), oldest first, whichever node stored them."""
        frames: list[VisualFrame] = self._frames().latest_visual_frames(ttl, now)
        return frames

    def subscribe_visual_frames(self, buffer: int = 1, *, policy: str = "drop_newest") -> Subscription:
        sub: Subscription = self._frames().subscribe_visual_frames(buffer, policy=policy)
        return sub

    def visual_stats(self) -> dict[str, int]:
        stats: dict[str, int] = self._frames().visual_stats()
        return stats

    def _close(self) -> None:
        """Called by the ending node after on_session_end: CLOSED, subscriptions closed."""
        try:
            with translated(self._ctx.url):
                self._ctx.scripts.set(keys=[self._names.session], args=[self._inc, "state", "5", "closed", "1"])
        finally:
            if self._ring is not None:
                self._ring.close_subscriptions()
