"""``AsyncRedisFrameRing``: ``RedisFrameRing`` on ``redis.asyncio``, for asyncio servers.

The same keys, scripts, entries and results (``_frames.py`` holds the design); each
method is a coroutine of the same name. A subscription is the same ``Subscription`` on a
local queue; its reader (``_Reader``, the sync twin's step for step) is a task on the
event loop that subscribed (a blocking XREAD on a connection of its own), so ``await
sub.aget()`` and ``async for`` never block the loop, and a thread may still ``get()``
from it. A loan's ``commit`` is a coroutine.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, SupportsIndex

import numpy as np

from .. import _validate as v
from .._framebuf_py import FrameLoan
from .._framebuf_py._fork import _MAKE, _fork, _refuse_copy, check_not_forked
from .._limits import MAX_LOAN_BYTES
from .._records import VisualFrame
from . import _frames_codec as codec
from ._errors import RedisDataError, RedisUnavailableError, masked
from ._frames import (
    READ_BLOCK_MS,
    RECONNECT_MAX_FAILURES,
    START,
    STOP,
    STORE_REPLIES,
    Command,
    _Core,
    _no_script,
    _pack_command,
    _prepare,
    _prepare_loan,
    _Store,
    backoff,
    pack,
)
from ._frames_lua import SCRIPTS, Script
from ._frames_queue import RedisQueue, RedisSubscription
from ._keys import SessionKeys

if TYPE_CHECKING:
    from typing_extensions import Buffer

log = logging.getLogger("capsule_sessions.redis")


class AsyncFrameLoan(FrameLoan):
    """A loan of an ``AsyncRedisFrameRing``: ``await loan.commit(...)``."""

    __slots__ = ()

    async def commit(  # type: ignore[override]
        self,
        *,
        source: str,
        max_recent: int,
        min_interval: float | datetime.timedelta = 0.0,
        mime_type: str = "",
        width: int = 0,
        height: int = 0,
        timestamp_ms: int = 0,
        frame_seq: int = 0,
        now: float | None = None,
    ) -> bool:
        """Store the loan's bytes as one frame, as ``store_frame`` would store them."""
        self._check_open()
        ring: Any = self._ring
        result: bool = await ring._store_loan(self, source, max_recent, min_interval, mime_type, width, height,
                                              timestamp_ms, frame_seq, now)
        return result


async def _command(conn: Any, *args: Any) -> Any:
    # Packed by hiredis, as the sync twin's (redis-py packs a command in Python).
    await conn.send_packed_command(conn.pack_command(*args) if _pack_command is None else [_pack_command(args)])
    return await conn.read_response(disable_decoding=True)


async def _sleep(q: RedisQueue, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not q.closed:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        await asyncio.sleep(min(left, 0.05))


def _raise_if_cancelled(task: asyncio.Task[Any] | None) -> None:
    """Python 3.11's asyncio.wait_for (redis-py's send, on a connection with a timeout)
    returns when a cancellation lands as the send completes: the reader would read on,
    and a loop's shutdown (asyncio.run cancels the tasks left) would wait for it forever."""
    cancelling = getattr(task, "cancelling", None)  # Python 3.11+
    if cancelling is not None and cancelling():
        raise asyncio.CancelledError


def _no_retry() -> Any:
    """A reader connection's retry: none (the reader retries itself, with backoff)."""
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    return Retry(NoBackoff(), 0)


class _Reader:
    """A subscription's reader task: the stream into the queue until it is closed (the
    sync twin's ``_Reader``, step for step). No ``try_step`` and no ``lock``: asyncio
    waiters do not read themselves, so the task is the connection's only user."""

    __slots__ = ("core", "q", "conn", "failures", "check", "looked_at", "lost", "refused", "__weakref__")

    def __init__(self, core: _Core, q: RedisQueue) -> None:
        import redis.exceptions as rx

        # What a step catches, looked up once (as the sync twin's).
        self.lost: tuple[type[BaseException], ...] = (rx.ConnectionError, rx.TimeoutError, OSError,
                                                      asyncio.TimeoutError)
        self.refused: tuple[type[BaseException], ...] = (rx.RedisError, RedisDataError)
        self.core = core
        self.q = q
        self.conn: Any = None
        self.failures = 0
        self.check = False
        self.looked_at = time.monotonic()

    async def run(self) -> None:
        """The task: steps until the queue ends, with backoff after a failure."""
        task = asyncio.current_task()
        try:
            while not self.q.closed:
                if not await self.step(READ_BLOCK_MS):
                    return
                _raise_if_cancelled(task)
                pause = self.pause()
                if pause:
                    await _sleep(self.q, pause)
        finally:
            await self._drop()

    def pause(self) -> float:
        """How long to wait before the next step (backoff after failures)."""
        if self.failures:
            return backoff(self.failures)
        return 0.0

    async def step(self, block_ms: int) -> bool:
        """One blocking read and what it brings; False once the queue ended."""
        core, q = self.core, self.q
        try:
            if self.conn is None:
                self.conn = core.reader_connection(_no_retry())
            conn = self.conn
            if self.check:
                if not core.checked(q, await _command(conn, *core.look_command())):
                    return False
                self.check = False
                self.looked_at = time.monotonic()
            reply = await _command(conn, *core.xread_args(q, block_ms))
            if core.new_epoch_in(q, reply) and not core.checked(q, await _command(conn, *core.look_command())):
                return False
            end = core.deliver(q, reply)
            if end is not None:
                rest = core.rest_args(q, *end)
                if rest is not None:
                    core.book(q, await _command(conn, *rest))
                q.end(*end)
                return False
            self.failures = 0
            # Idle: a look at the session (a new epoch; an incarnation gone without its
            # end) once per READ_BLOCK_MS.
            self.check = reply is None and time.monotonic() - self.looked_at >= READ_BLOCK_MS / 1000
        except self.lost as exc:
            await self._drop()
            self.failures += 1
            self.check = True
            if self.failures == 1:
                log.info("subscription to %r lost Redis at %s (%s); reconnecting", core.stream,
                         masked(core.url), exc)
        except self.refused as exc:
            log.warning("subscription to %r: %s", core.stream, exc)
            self.check = True
            self.failures = max(self.failures, RECONNECT_MAX_FAILURES)
        except BaseException:
            await self._drop()  # cut off mid-conversation (the task cancelled): not reused
            self.check = True
            raise
        return True

    async def _drop(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                await conn.disconnect(nowait=True)
            except RuntimeError:  # the task was dropped with its loop (closed, not stopped)
                pass


class AsyncRedisFrameRing:
    """``RedisFrameRing`` on a ``redis.asyncio`` client: coroutines of the same names."""

    def __init__(self, client: Any, keys: SessionKeys, url: str, clock: Callable[[], float], *,
                 activity: tuple[str, str] | None = None, incarnation: str | None = None) -> None:
        self._core = _Core(client, keys, url, clock, activity, incarnation)
        self._lock = asyncio.Lock()
        self._subscribers: list[RedisQueue] = []
        self._ended = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._fork_gen = _fork.generation

    def __reduce_ex__(self, protocol: SupportsIndex) -> NoReturn:
        _refuse_copy(self, protocol)

    def __repr__(self) -> str:
        return f"<AsyncRedisFrameRing {self._core.stream!r} at {masked(self._core.url)}>"

    # -- plumbing ----------------------------------------------------------------------
    async def _exchange(self, commands: Sequence[Command], packed: list[bytes | memoryview] | None = None,
                        replies: int | None = None) -> list[Any]:
        """RedisFrameRing._exchange on an asyncio connection."""
        import redis.exceptions as rx

        core = self._core
        check_not_forked(self._fork_gen)
        pool = core.client.connection_pool
        try:
            conn = await pool.get_connection()
        except core.async_errors as exc:
            raise core.failure(exc) from exc
        try:
            if packed is None:
                whole = pack(commands)
                await conn.send_packed_command(conn.pack_commands(commands) if whole is None else [whole])
            else:
                # Joined, one copy: asyncio's writelines may keep a buffer it could not
                # send yet past the call (3.12+), and these may be the caller's bytes.
                await conn.send_packed_command([b"".join(packed)])
            read = []
            for _ in range(len(commands) if replies is None else replies):
                try:
                    read.append(await conn.read_response(disable_decoding=True))
                except rx.ResponseError as exc:
                    read.append(exc)
            return read
        except BaseException as exc:
            await conn.disconnect(nowait=True)
            if isinstance(exc, core.async_errors):
                raise core.failure(exc) from exc
            raise
        finally:
            await pool.release(conn)

    async def _load(self) -> None:
        for reply in await self._exchange([("SCRIPT", "LOAD", script.text) for script in SCRIPTS.values()]):
            self._core.reply(reply)

    async def _call(self, command: Command) -> Any:
        (reply,) = await self._exchange([command])
        if _no_script(reply):
            await self._load()
            (reply,) = await self._exchange([command])
        return self._core.reply(reply)

    # -- visual input ------------------------------------------------------------------
    async def start_visual_input(self, source: str, now: float | None = None) -> None:
        source = v.text(source, "source")
        seconds, _ = self._core.read_now(now)
        await self._change(START, source, seconds)

    async def stop_visual_input(self, source: str = "", now: float | None = None) -> None:
        source = v.text(source, "source")
        seconds, _ = self._core.read_now(now)
        await self._change(STOP, source, seconds)

    async def _change(self, script: Script, source: str, seconds: float) -> None:
        async with self._lock:
            self._core.changed(await self._call(self._core.change_command(script, source, seconds)))

    async def store_frame(
        self,
        data: Buffer | np.ndarray[Any, Any],
        *,
        source: str,
        max_recent: int,
        min_interval: float | datetime.timedelta = 0.0,
        mime_type: str = "",
        width: int = 0,
        height: int = 0,
        timestamp_ms: int = 0,
        frame_seq: int = 0,
        now: float | None = None,
    ) -> bool:
        """Store one frame's bytes (one copy, sent to Redis); False when rate-limited."""
        return await self._store(data, source, max_recent, min_interval, mime_type, width, height, timestamp_ms,
                                 frame_seq, now)

    async def store_visual_frame(self, frame: VisualFrame, max_recent: int,
                                 min_interval: float | datetime.timedelta = 0.0, now: float | None = None) -> bool:
        if not isinstance(frame, VisualFrame):
            raise TypeError(f"frame must be a VisualFrame, got {type(frame).__name__}")
        return await self._store(frame.data, frame.source, max_recent, min_interval, frame.mime_type, frame.width,
                                 frame.height, frame.timestamp_ms, frame.frame_seq, now)

    async def _store(self, data: Any, source: Any, max_recent: Any, min_interval: Any, mime_type: Any, width: Any,
                     height: Any, timestamp_ms: Any, frame_seq: Any, now: Any) -> bool:
        # Without a local subscriber, the frame's own copy is not made: the command
        # carries the caller's bytes (one that comes while the store waits for the lock
        # gets the copy made then).
        store = _prepare(self._core, data, source, max_recent, min_interval, mime_type, width, height, timestamp_ms,
                         frame_seq, now, copy=bool(self._subscribers))
        if store.error is not None:
            if store.min_ns > 0:
                async with self._lock:
                    reply = await self._call(self._core.check_command(store))
                if self._core.decided(reply) == 0:
                    return False
            raise store.error
        try:
            return await self._send(store)
        finally:
            store.release()  # a failed store's traceback must not keep the caller's buffer

    async def _store_loan(self, loan: FrameLoan, source: Any, max_recent: Any, min_interval: Any, mime_type: Any,
                          width: Any, height: Any, timestamp_ms: Any, frame_seq: Any, now: Any) -> bool:
        return await self._send(_prepare_loan(self._core, loan, source, max_recent, min_interval, mime_type, width,
                                              height, timestamp_ms, frame_seq, now))

    async def _send(self, store: _Store) -> bool:
        core = self._core
        async with self._lock:
            outcome = core.stored(await self._exchange((), store.packed, STORE_REPLIES))
            if outcome is None:
                await self._load()
                outcome = core.stored(await self._exchange((), store.packed, STORE_REPLIES))
                if outcome is None:
                    raise RedisUnavailableError(f"Redis at {masked(core.url)} keeps losing its scripts")
            subscribers = self._subscribers
            accepted = core.accepted(store, *outcome, subscribers)
            if any(q.closed for q in subscribers):
                self._subscribers = [q for q in subscribers if not q.closed]
            return accepted

    async def loan_frame(self, nbytes: int) -> AsyncFrameLoan:
        """Writable memory for one frame of ``nbytes`` bytes (in this process); ``await
        loan.commit(...)`` stores it as store_frame would."""
        size = v.integer(nbytes, "nbytes", 0, MAX_LOAN_BYTES)
        check_not_forked(self._fork_gen)
        return AsyncFrameLoan(_MAKE, self, size)

    # -- reads -------------------------------------------------------------------------
    async def latest_visual_frames(self, ttl: float | datetime.timedelta,
                                   now: float | None = None) -> list[VisualFrame]:
        ttl_ns = v.duration_ns(ttl, "ttl")
        _, now_ns = self._core.read_now(now)
        if ttl_ns <= 0:
            return []
        core = self._core
        entries = core.latest_entries(await self._exchange(core.latest_commands()))
        return codec.latest(core.stream, entries, ttl_ns, now_ns, core.cache)

    async def visual_stats(self) -> dict[str, int]:
        core = self._core
        return core.stats(await self._call(core.stats_command()))

    # -- subscribers -------------------------------------------------------------------
    async def subscribe_visual_frames(self, buffer: int = 1, *, policy: str = "drop_newest") -> RedisSubscription:
        maxsize = v.count(buffer, "buffer")
        policy = v.policy(policy)
        core = self._core
        async with self._lock:
            accepted, epoch, ended = core.subscribed(await self._call(core.subscribe_command()))
            q = RedisQueue(maxsize, policy, accepted, epoch)
            if self._ended or ended:
                q.closed = True
            else:
                self._subscribers = self._subscribers + [q]
                task = asyncio.get_running_loop().create_task(_Reader(core, q).run(),
                                                              name=f"capsule-redis-sub {core.stream}")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        return RedisSubscription(_MAKE, self, q)

    @property
    def subscriber_count(self) -> int:
        return sum(1 for q in self._subscribers if not q.closed)

    def _remove_queue(self, q: Any) -> None:
        self._subscribers = [other for other in self._subscribers if other is not q]

    async def close_subscriptions(self) -> None:
        """End the session's frames on every node (RedisFrameRing.close_subscriptions)."""
        core = self._core
        end: tuple[int, bytes | None] = (0, None)
        error: BaseException | None = None
        async with self._lock:
            try:
                end = core.ended(await self._call(core.end_command()))
            except BaseException as exc:
                error = exc
            finally:
                self._ended = True
                subscribers, self._subscribers = self._subscribers, []
        for q in subscribers:
            q.end(*end)
        if error is not None:
            raise error


__all__ = ["AsyncFrameLoan", "AsyncRedisFrameRing"]
