"""``AsyncRedisSession``: ``RedisSession`` on ``redis.asyncio``, for asyncio servers.

The same names with the same semantics, as coroutines. What the sync twin reads as a
property (``state``, ``last_active_at``, ``owner_id``, ``current_turn_seq``) is an
awaitable property here: ``await session.state``. The fixed attributes (``id``,
``mode``, ``character_id``, ``created_at``) are plain ones.
"""

from __future__ import annotations

import datetime
import inspect
import time
from collections.abc import Awaitable, Iterable
from typing import TYPE_CHECKING, Any

from .. import _validate as v
from .._policy import VisualInputConfig, check_frame
from .._records import ChatMessage, ConversationSnapshot, DialogContextItem, SessionState, VisualFrame
from . import _codec as c
from ._context import encoded
from ._errors import translated
from ._session import (
    NO_FRAMES_MESSAGE,
    RECHECK_SECONDS,
    WAIT_WAKE_SECONDS,
    AsyncRedisFrameRing,
    _SessionCore,
    checked_items,
    state_of,
)

if TYPE_CHECKING:
    import numpy as np
    from typing_extensions import Buffer


async def _result(value: Any) -> Any:
    """A ring method's result, awaited when it is awaitable (the ring's reads and writes
    are coroutines; what needs no I/O may be plain)."""
    return await value if inspect.isawaitable(value) else value


class AsyncRedisSession(_SessionCore):
    """A voice/vision session stored in Redis, for asyncio; made by
    ``AsyncRedisSessionManager``."""

    _ring_class = AsyncRedisFrameRing

    async def _hmget(self, *fields: str) -> list[Any]:
        with translated(self._ctx.url):
            return list(await self._ctx.client.hmget(self._names.session, ["inc", *fields]))

    async def _set(self, *pairs: str | bytes) -> None:
        with translated(self._ctx.url):
            self._done(await self._ctx.scripts.set(keys=[self._names.session], args=[self._inc, *pairs]))

    # -- clock and state -----------------------------------------------------------
    async def _last_active_at(self) -> float:
        (active,) = self._fields(await self._hmget("active"))
        return c.instant_of(active, self._key, "active")

    @property
    def last_active_at(self) -> Awaitable[float]:
        return self._last_active_at()

    async def _state(self) -> SessionState:
        return self._state_of(await self._hmget("state", "ended", "closed"))

    @property
    def state(self) -> Awaitable[SessionState]:
        return self._state()

    async def set_state(self, state: SessionState) -> None:
        state = state_of(state)
        await self._set("state", str(int(state)), "active", self._instant(None))

    async def touch(self, now: float | None = None) -> None:
        await self._set("active", self._instant(now))

    async def _owner_id(self) -> str:
        (owner,) = self._fields(await self._hmget("owner"))
        return c.text_of(owner, self._key, "owner")

    @property
    def owner_id(self) -> Awaitable[str]:
        return self._owner_id()

    async def set_owner_id(self, owner_id: str) -> None:
        await self._set("owner", encoded(v.text(owner_id, "owner_id")))

    # -- pipeline and turn sequencing -------------------------------------------
    async def _increment(self, field: str, now: str) -> int:
        with translated(self._ctx.url):
            reply = await self._ctx.scripts.increment(keys=[self._names.session], args=[self._inc, field, now])
        return self._count(reply, field)

    async def mark_pipeline_running(self) -> int:
        return await self._increment("pseq", "")

    async def mark_pipeline_finished(self, seq: int) -> None:
        seq = v.integer(seq, "seq")
        with translated(self._ctx.url):
            self._done(await self._ctx.scripts.finish(keys=[self._names.session],
                                                      args=[self._inc, str(seq), self._names.channel]))

    async def _pipeline(self) -> tuple[int, int]:
        pseq, pfin = self._fields(await self._hmget("pseq", "pfin"))
        return c.integer_of(pseq, self._key, "pseq"), c.integer_of(pfin, self._key, "pfin")

    async def is_current_pipeline(self, seq: int) -> bool:
        return (await self._pipeline())[0] == seq

    async def wait_pipeline_done(self, timeout: float | datetime.timedelta | None) -> bool:
        """Wait for the current pipeline, wherever it runs, without blocking the event
        loop; True when it is done or none was started."""
        seconds = v.timeout_seconds(timeout)
        deadline = None if seconds is None else time.monotonic() + seconds
        target, finished = await self._pipeline()
        if target == 0 or finished == target:
            return True
        if seconds == 0:
            return False
        with translated(self._ctx.url):
            pubsub = self._ctx.client.pubsub()
            try:
                await pubsub.subscribe(self._names.channel)
                while await pubsub.get_message(timeout=WAIT_WAKE_SECONDS) is None:
                    if deadline is not None and time.monotonic() >= deadline:
                        return False
                wanted = str(target).encode()
                while True:
                    if (await self._pipeline())[1] == target:
                        return True
                    recheck_at = time.monotonic() + RECHECK_SECONDS
                    while (now := time.monotonic()) < recheck_at:
                        if deadline is not None and now >= deadline:
                            return False
                        wait = min(WAIT_WAKE_SECONDS, recheck_at - now,
                                   WAIT_WAKE_SECONDS if deadline is None else deadline - now)
                        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=wait)
                        if message is not None and message.get("data") == wanted:
                            return True
            finally:
                await pubsub.aclose()

    async def mark_turn_started(self) -> int:
        return await self._increment("tseq", self._instant(None))

    async def _current_turn_seq(self) -> int:
        (tseq,) = self._fields(await self._hmget("tseq"))
        return c.integer_of(tseq, self._key, "tseq")

    @property
    def current_turn_seq(self) -> Awaitable[int]:
        return self._current_turn_seq()

    async def is_current_turn(self, seq: int) -> bool:
        return await self._current_turn_seq() == seq

    async def try_start_voice_startup_greeting(self) -> bool:
        with translated(self._ctx.url):
            reply = await self._ctx.scripts.greet(keys=[self._names.session], args=[self._inc, self._instant(None)])
        self._done(reply)
        return bool(reply)

    # -- history and dialog context ---------------------------------------------
    async def add_message(self, msg: ChatMessage) -> None:
        args = self._message_args(msg)
        with translated(self._ctx.url):
            self._done(await self._ctx.scripts.add_message(keys=[self._names.session, self._names.history],
                                                           args=args))

    async def _snapshot(self) -> tuple[float, list[ChatMessage]]:
        with translated(self._ctx.url):
            reply = await self._ctx.scripts.snapshot(keys=[self._names.session, self._names.history],
                                                     args=[self._inc])
        return self._snapshot_of(reply)

    async def history_snapshot(self) -> list[ChatMessage]:
        return (await self._snapshot())[1]

    async def conversation_snapshot(self) -> ConversationSnapshot:
        active, history = await self._snapshot()
        return ConversationSnapshot(self.id, self.character_id, self.created_at, active, history)

    async def set_dialog_context(self, items: Iterable[DialogContextItem]) -> None:
        stored = checked_items(items)
        with translated(self._ctx.url):
            self._done(await self._ctx.scripts.set_dialog(keys=[self._names.session, self._names.dialog],
                                                          args=[self._inc, c.dialog_text(stored)]))

    async def dialog_context_snapshot(self) -> list[DialogContextItem]:
        with translated(self._ctx.url):
            reply = await self._ctx.scripts.dialog(keys=[self._names.session, self._names.dialog], args=[self._inc])
        return self._dialog_of(reply)

    async def to_dict(self) -> dict[str, str | int | list[dict[str, str | int]]]:
        return self._dict_of(*await self._snapshot())

    # -- visual input (the frame streams, _frames.py) ----------------------------------
    def _frames(self) -> Any:
        if self._ring is None:
            raise RuntimeError(NO_FRAMES_MESSAGE)
        return self._ring

    async def start_visual_input(self, source: str, now: float | None = None) -> None:
        await _result(self._frames().start_visual_input(source, now))

    async def stop_visual_input(self, source: str = "", now: float | None = None) -> None:
        await _result(self._frames().stop_visual_input(source, now))

    async def store_frame(self, data: Buffer | np.ndarray[Any, Any], *, source: str, max_recent: int,
                          min_interval: float | datetime.timedelta = 0.0, mime_type: str = "", width: int = 0,
                          height: int = 0, timestamp_ms: int = 0, frame_seq: int = 0,
                          now: float | None = None) -> bool:
        result: bool = await _result(self._frames().store_frame(
            data, source=source, max_recent=max_recent, min_interval=min_interval, mime_type=mime_type,
            width=width, height=height, timestamp_ms=timestamp_ms, frame_seq=frame_seq, now=now))
        return result

    async def store_visual_frame(self, frame: VisualFrame, max_recent: int,
                                 min_interval: float | datetime.timedelta = 0.0, now: float | None = None) -> bool:
        result: bool = await _result(self._frames().store_visual_frame(frame, max_recent, min_interval, now))
        return result

    async def loan_frame(self, nbytes: int) -> Any:
        return await _result(self._frames().loan_frame(nbytes))

    async def ingest_visual_frame(self, frame: VisualFrame, config: VisualInputConfig,
                                  now: float | None = None) -> bool:
        check_frame(frame, config)
        result: bool = await _result(
            self._frames().store_visual_frame(frame, config.max_recent_frames, config.frame_interval, now))
        return result

    async def latest_visual_frames(self, ttl: float | datetime.timedelta,
                                   now: float | None = None) -> list[VisualFrame]:
        frames: list[VisualFrame] = await _result(self._frames().latest_visual_frames(ttl, now))
        return frames

    async def subscribe_visual_frames(self, buffer: int = 1, *, policy: str = "drop_newest") -> Any:
        return await _result(self._frames().subscribe_visual_frames(buffer, policy=policy))

    async def visual_stats(self) -> dict[str, int]:
        stats: dict[str, int] = await _result(self._frames().visual_stats())
        return stats

    async def shared_stats(self) -> dict[str, int]:  # type: ignore[override]
        """A Redis session is not a shared-memory one: ValueError, as the sync twin."""
        return _SessionCore.shared_stats(self)

    async def _close(self) -> None:
        try:
            with translated(self._ctx.url):
                await self._ctx.scripts.set(keys=[self._names.session], args=[self._inc, "state", "5", "closed", "1"])
        finally:
            if self._ring is not None:
                await _result(self._ring.close_subscriptions())
