"""The pure-Python frame-buffer backend: the reference the Cython twin must match.

The frame-buffer backend interface
----------------------------------
A backend module exports two classes; ``Session`` owns one ``FrameRing`` and forwards
its methods of the same names to it.

``FrameRing(clock, created_at)``
    One session's visual input plus its activity clock.

    - ``last_active_at`` (float), ``touch(now=None)``: the session's activity instant;
      every touch goes through the ring because storing a frame touches the session.
    - ``start_visual_input(source, now=None)``, ``stop_visual_input(source="", now=None)``
    - ``store_frame(data, *, source, max_recent, min_interval=0.0, mime_type="", width=0,
      height=0, timestamp_ms=0, frame_seq=0, now=None) -> bool``
    - ``store_visual_frame(frame, max_recent, min_interval=0.0, now=None) -> bool``
    - ``latest_visual_frames(ttl, now=None) -> list[VisualFrame]``
    - ``subscribe_visual_frames(buffer=1, *, policy="drop_newest") -> Subscription``
    - ``visual_stats() -> dict``, ``subscriber_count`` (int),
      ``close_subscriptions()`` (the session ended: closes every live subscription, and
      any subscription made afterwards starts closed; used on delete/evict)

``Subscription``
    ``get(timeout=None)``, ``get_nowait()``, ``aget(timeout=None)``, ``qsize()``,
    ``maxsize``, ``policy``, ``closed``, ``dropped``, ``delivered``, ``close()``,
    ``unsubscribe()``, iteration (sync and async), context manager. Dropping the last
    reference to a subscription closes it, so a forgotten subscriber stops costing the
    producer anything.

Semantics both twins share (the Go original's, plus the documented extensions):
instants are compared as int64 ns (``_validate``); the rate limiter measures from the
last *accepted* frame; a frame from another source empties the ring (after the rate
check, like Go); frames are stored with exactly one copy of their bytes and handed to
every reader as the same read-only array; the fan-out runs under the ring lock so every
subscriber sees frames in the order they were accepted.

Lock order: ring lock, then a subscription's lock. Never the other way round.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
import weakref
from typing import Any, Callable, Optional

import numpy as np

from . import _validate as v
from ._records import VisualFrame
from .errors import SubscriptionClosed

__all__ = ["FrameRing", "Subscription"]


def _check_buffer(data: Any) -> None:
    # Only whether data has the buffer protocol at all (the compiled twin's
    # PyObject_CheckBuffer); the export is released at once so a rejected call leaves
    # the caller's buffer unexported.
    try:
        memoryview(data).release()
    except TypeError:
        raise TypeError(
            "data must support the buffer protocol (bytes, bytearray, memoryview, numpy array), "
            f"got {type(data).__name__}"
        ) from None
    except (ValueError, BufferError):
        pass  # an exporter that refuses: reported by _copy_bytes, after the rate check


def _copy_bytes(data: Any) -> np.ndarray:
    try:
        view = memoryview(data)
    except (ValueError, BufferError) as exc:
        raise TypeError(f"data cannot be read as bytes: {exc}") from None
    with view:
        # tobytes() is the one copy (C order, whatever the strides); frombuffer wraps it
        # read-only without another.
        return np.frombuffer(view.tobytes(), dtype=np.uint8)


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


def _wake_async(waiters: list) -> None:
    for loop, fut in waiters:
        try:
            loop.call_soon_threadsafe(_wake, fut)
        except RuntimeError:  # that loop is closed; its waiter is gone with it
            pass


class _Queue:
    """A subscriber's bounded queue. The ring holds this, the user holds a Subscription."""

    __slots__ = ("maxsize", "policy", "items", "cond", "closed", "dropped", "delivered", "async_waiters")

    def __init__(self, maxsize: int, policy: str) -> None:
        self.maxsize = maxsize
        self.policy = policy
        self.items: collections.deque = collections.deque()
        self.cond = threading.Condition(threading.Lock())
        self.closed = False
        self.dropped = 0
        self.delivered = 0
        self.async_waiters: list = []

    def offer(self, frame: VisualFrame) -> bool:
        """Queue frame (or count it dropped); False when this queue is closed."""
        with self.cond:
            if self.closed:
                return False
            if len(self.items) >= self.maxsize:
                self.dropped += 1
                if self.policy == "drop_newest":
                    return True
                self.items.popleft()
            self.items.append(frame)
            self.cond.notify()
            waiters = self._take_async_waiters()
        _wake_async(waiters)
        return True

    def close(self) -> None:
        with self.cond:
            if self.closed:
                return
            self.closed = True
            self.cond.notify_all()
            waiters = self._take_async_waiters()
        _wake_async(waiters)

    def _take_async_waiters(self) -> list:
        # Only parked asyncio waiters cost anything; none parked, no loop call. They are
        # woken after the queue lock is released: waking calls into the loop.
        waiters = self.async_waiters
        if waiters:
            self.async_waiters = []
        return waiters

    def take(self) -> VisualFrame:
        self.delivered += 1
        return self.items.popleft()


class Subscription:
    """A subscriber's handle: a bounded queue of the frames a session accepted."""

    __slots__ = ("_queue", "_ring", "__weakref__")

    def __init__(self, ring: "FrameRing", q: _Queue) -> None:
        self._queue = q
        self._ring = ring

    @property
    def maxsize(self) -> int:
        return self._queue.maxsize

    @property
    def policy(self) -> str:
        return self._queue.policy

    @property
    def closed(self) -> bool:
        return self._queue.closed

    @property
    def dropped(self) -> int:
        return self._queue.dropped

    @property
    def delivered(self) -> int:
        return self._queue.delivered

    def qsize(self) -> int:
        return len(self._queue.items)

    def get(self, timeout: Any = None) -> VisualFrame:
        seconds = v.timeout_seconds(timeout)
        q = self._queue
        with q.cond:
            if seconds is None:
                while not q.items:
                    if q.closed:
                        raise SubscriptionClosed("subscription is closed")
                    q.cond.wait()
            elif not q.items:
                if q.closed:
                    raise SubscriptionClosed("subscription is closed")
                q.cond.wait_for(lambda: q.items or q.closed, seconds)
                if not q.items:
                    if q.closed:
                        raise SubscriptionClosed("subscription is closed")
                    raise queue.Empty
            return q.take()

    def get_nowait(self) -> VisualFrame:
        q = self._queue
        with q.cond:
            if q.items:
                return q.take()
            if q.closed:
                raise SubscriptionClosed("subscription is closed")
            raise queue.Empty

    async def aget(self, timeout: Any = None) -> VisualFrame:
        seconds = v.timeout_seconds(timeout)
        loop = asyncio.get_running_loop()
        deadline = None if seconds is None else loop.time() + seconds
        q = self._queue
        while True:
            with q.cond:
                if q.items:
                    return q.take()
                if q.closed:
                    raise SubscriptionClosed("subscription is closed")
                fut = loop.create_future()
                waiter = (loop, fut)
                q.async_waiters.append(waiter)
            try:
                if deadline is None:
                    await fut
                else:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        raise queue.Empty
                    try:
                        await asyncio.wait_for(fut, remaining)
                    except asyncio.TimeoutError:
                        raise queue.Empty from None
            finally:
                with q.cond:
                    if waiter in q.async_waiters:
                        q.async_waiters.remove(waiter)

    def close(self) -> None:
        self._ring._remove(self._queue)
        self._queue.close()

    unsubscribe = close

    def __del__(self) -> None:
        # No lock here: a garbage collection may run this while the same thread holds the
        # ring's or this queue's lock. Nobody can read this queue any more (a reader would
        # hold this handle), so marking it closed is enough; the ring forgets closed
        # queues on its next fan-out.
        self._queue.closed = True

    def __enter__(self) -> "Subscription":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self):
        while True:
            try:
                yield self.get()
            except SubscriptionClosed:
                return

    def __aiter__(self) -> "Subscription":
        return self

    async def __anext__(self) -> VisualFrame:
        try:
            return await self.aget()
        except SubscriptionClosed:
            raise StopAsyncIteration from None

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<Subscription {state} policy={self.policy} maxsize={self.maxsize} queued={self.qsize()} dropped={self.dropped} delivered={self.delivered}>"


class FrameRing:
    """A session's newest frames, rate limiter, source tracking, subscribers and counters."""

    def __init__(self, clock: Callable[[], float], created_at: float) -> None:
        self._clock = v.clock(clock)
        self._lock = threading.Lock()
        self._last_active_s, _ = v.instant(created_at, "created_at")
        self._frames: collections.deque = collections.deque()
        self._bytes = 0
        self._source = ""
        self._last_accepted_ns: Optional[int] = None
        self._subscribers: list[_Queue] = []
        self._ended = False
        self._accepted = 0
        self._rate_limited = 0
        self._source_resets = 0

    # -- time ------------------------------------------------------------------
    def _now(self, now: Any) -> tuple[float, int]:
        if now is None:
            return v.instant(self._clock(), "clock()")
        return v.instant(now, "now")

    @property
    def last_active_at(self) -> float:
        return self._last_active_s

    def touch(self, now: Any = None) -> None:
        seconds, _ = self._now(now)
        with self._lock:
            self._last_active_s = seconds

    # -- visual input ----------------------------------------------------------
    def _clear_frames(self) -> None:
        self._frames.clear()
        self._bytes = 0

    def start_visual_input(self, source: str, now: Any = None) -> None:
        source = v.text(source, "source")
        seconds, _ = self._now(now)
        with self._lock:
            if self._source != source:
                if self._source:
                    self._source_resets += 1
                self._clear_frames()
                self._last_accepted_ns = None
            self._source = source
            self._last_active_s = seconds

    def stop_visual_input(self, source: str = "", now: Any = None) -> None:
        source = v.text(source, "source")
        seconds, _ = self._now(now)
        with self._lock:
            if not source or not self._source or self._source == source:
                self._clear_frames()
                self._source = ""
                self._last_accepted_ns = None
            self._last_active_s = seconds

    def store_frame(
        self,
        data: Any,
        *,
        source: str,
        max_recent: int,
        min_interval: Any = 0.0,
        mime_type: str = "",
        width: int = 0,
        height: int = 0,
        timestamp_ms: int = 0,
        frame_seq: int = 0,
        now: Any = None,
    ) -> bool:
        _check_buffer(data)
        source = v.text(source, "source")
        keep = v.count(max_recent, "max_recent")
        min_ns = v.duration_ns(min_interval, "min_interval")
        mime_type = v.text(mime_type, "mime_type")
        width = v.integer(width, "width", v.INT32_MIN, v.INT32_MAX)
        height = v.integer(height, "height", v.INT32_MIN, v.INT32_MAX)
        timestamp_ms = v.integer(timestamp_ms, "timestamp_ms")
        frame_seq = v.integer(frame_seq, "frame_seq")
        seconds, now_ns = self._now(now)
        with self._lock:
            if self._rate_limited_at(now_ns, min_ns):
                self._rate_limited += 1
                return False
        # The copy runs outside the lock; the decision is taken again under it below,
        # because another producer may have stored meanwhile.
        payload = _copy_bytes(data)
        frame = VisualFrame(payload, mime_type, width, height, source, timestamp_ms, frame_seq, seconds)
        with self._lock:
            if self._rate_limited_at(now_ns, min_ns):
                self._rate_limited += 1
                return False
            if self._source != source:
                if self._source:
                    self._source_resets += 1
                self._source = source
                self._clear_frames()
            self._frames.append(frame)
            self._bytes += payload.nbytes
            while len(self._frames) > keep:
                self._bytes -= self._frames.popleft().data.nbytes
            self._last_accepted_ns = now_ns
            self._last_active_s = seconds
            self._accepted += 1
            stale = False
            for sub in self._subscribers:
                stale |= not sub.offer(frame)
            if stale:
                self._subscribers = [q for q in self._subscribers if not q.closed]
        return True

    def _rate_limited_at(self, now_ns: int, min_ns: int) -> bool:
        last = self._last_accepted_ns
        return last is not None and min_ns > 0 and now_ns - last < min_ns

    def store_visual_frame(self, frame: VisualFrame, max_recent: int, min_interval: Any = 0.0, now: Any = None) -> bool:
        if not isinstance(frame, VisualFrame):
            raise TypeError(f"frame must be a VisualFrame, got {type(frame).__name__}")
        return self.store_frame(
            frame.data,
            source=frame.source,
            max_recent=max_recent,
            min_interval=min_interval,
            mime_type=frame.mime_type,
            width=frame.width,
            height=frame.height,
            timestamp_ms=frame.timestamp_ms,
            frame_seq=frame.frame_seq,
            now=now,
        )

    def latest_visual_frames(self, ttl: Any, now: Any = None) -> list:
        ttl_ns = v.duration_ns(ttl, "ttl")
        _, now_ns = self._now(now)
        if ttl_ns <= 0:
            return []
        with self._lock:
            return [f for f in self._frames if now_ns - int(f.received_at * 1e9) <= ttl_ns]

    def visual_stats(self) -> dict:
        with self._lock:
            return {
                "accepted": self._accepted,
                "rate_limited": self._rate_limited,
                "source_resets": self._source_resets,
                "frames": len(self._frames),
                "bytes": self._bytes,
            }

    # -- subscribers -----------------------------------------------------------
    def subscribe_visual_frames(self, buffer: int = 1, *, policy: str = "drop_newest") -> Subscription:
        q = _Queue(v.count(buffer, "buffer"), v.policy(policy))
        with self._lock:
            # The session has ended: nothing will ever close this one, so it starts closed
            # and a reader finishes at once instead of waiting forever.
            if self._ended:
                q.closed = True
            else:
                self._subscribers.append(q)
        return Subscription(self, q)

    @property
    def subscriber_count(self) -> int:
        with self._lock:
            self._subscribers = [q for q in self._subscribers if not q.closed]
            return len(self._subscribers)

    def _remove(self, q: _Queue) -> None:
        with self._lock:
            try:
                self._subscribers.remove(q)
            except ValueError:
                pass

    def close_subscriptions(self) -> None:
        with self._lock:
            self._ended = True
            subscribers, self._subscribers = self._subscribers, []
        for q in subscribers:
            q.close()
