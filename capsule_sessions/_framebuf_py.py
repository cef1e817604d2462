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
    - ``visual_stats() -> dict[str, int]``, ``subscriber_count`` (int),
      ``close_subscriptions()`` (the session ended: closes every live subscription, and
      any subscription made afterwards starts closed; used on delete/evict)

``Subscription``
    ``get(block=True, timeout=None)``, ``get_nowait()``, ``aget(timeout=None)``,
    ``qsize()``, ``empty()``, ``full()``, ``maxsize``, ``policy``, ``closed``,
    ``dropped``, ``delivered``, ``close()``, ``unsubscribe()``, iteration (sync and
    async), context manager. Dropping the last reference to a subscription closes it, so
    a forgotten subscriber stops costing the producer anything. Made only by the ring:
    never by hand, copied or pickled.

What callers see, on both twins (the Go original's semantics plus the documented
extensions): instants are compared as int64 ns (``_validate``); the rate limiter
measures from the last *accepted* frame; a frame from another source empties the ring
(after the rate check, like Go); frames are stored with exactly one copy of their bytes
and handed to every reader as the same read-only array, which never changes; each
subscriber receives frames in accept order, and has been offered a frame (queued, or
counted in ``dropped``, exactly once) when the store that accepted it returns, unless
that store was made from inside another store's fan-out; an error raised during a
fan-out (KeyboardInterrupt) reaches the storing caller after the books are settled; a
call that interrupts another on the same thread (finalizer, signal handler) completes
or raises RuntimeError, never hangs; a ring inherited through fork() refuses use.

Lock order: ring lock, then a subscription's lock. Never the other way round. No thread
waits for a fan-out while it runs one (``_FanRuns``).
"""

from __future__ import annotations

import abc
import asyncio
import collections
import datetime
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, NoReturn, SupportsIndex

import numpy as np

from . import _validate as v
from ._records import VisualFrame
from .errors import FORKED_MESSAGE, NOT_BY_HAND_MESSAGE, REENTERED_MESSAGE, SubscriptionClosed

if TYPE_CHECKING:
    from typing_extensions import Buffer

# An asyncio reader parked on a queue: its loop and the future a producer resolves.
_Waiter = tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]

__all__ = ["FrameRing", "Subscription"]

# The ring's private key for making a Subscription (a handle made by hand is refused).
_MAKE = object()

class _Fork:
    """Counts fork()s into this process: every ring and queue remembers the count it was
    made under and refuses use in a child (see FORKED_MESSAGE)."""

    generation = 0


_fork = _Fork()


def _after_fork_in_child() -> None:
    _fork.generation += 1


os.register_at_fork(after_in_child=_after_fork_in_child)


# Blocking waits wake this often, so a signal handler (Ctrl-C) runs promptly.
WAIT_SLICE_S = 0.1


class _FanRuns(threading.local):
    """How many fan-outs this thread is running (it is their runner): such a thread never
    waits for another thread's fan-out, which is what rules out two waiting on each other."""

    depth = 0


_fan_runs = _FanRuns()


def _check_not_forked(generation: int) -> None:
    if generation != _fork.generation:
        raise RuntimeError(FORKED_MESSAGE)


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


def _copy_bytes(data: Any) -> np.ndarray[tuple[int], np.dtype[np.uint8]]:
    try:
        view = memoryview(data)
    except (ValueError, BufferError) as exc:
        raise TypeError(f"data cannot be read as bytes: {exc}") from None
    with view:
        # tobytes() is the one copy (C order, whatever the strides); frombuffer wraps it
        # read-only without another.
        return np.frombuffer(view.tobytes(), dtype=np.uint8)


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _wake_async(waiters: list[_Waiter]) -> None:
    """Wake every parked asyncio waiter not woken yet. Each wake runs the loop's Python
    code (where a signal handler may raise): the first error is raised after all were
    tried, so one broken loop or one Ctrl-C never leaves another waiter asleep."""
    error: BaseException | None = None
    for loop, fut in list(waiters):
        if fut.done():
            continue
        try:
            loop.call_soon_threadsafe(_wake, fut)
        except RuntimeError:  # that loop is closed; its waiter is gone with it
            pass
        except BaseException as exc:
            error = error or exc
    if error is not None:
        raise error


class _Queue:
    """A subscriber's bounded queue. The ring holds this, the user holds a Subscription.

    ``offer`` books each accepted frame once, by its accept number: queued, or counted in
    ``dropped``. Booking is a pair of statements with no call between them, so no signal
    handler can run half-way; an offer cut short by one (KeyboardInterrupt) is simply
    made again and books nothing twice. The lock is reentrant: a finalizer the garbage
    collector runs while this thread holds it may still close the queue.
    """

    __slots__ = ("maxsize", "policy", "items", "lock", "cond", "closed", "dropped", "delivered", "async_waiters",
                 "booked_seq", "fork_gen")

    def __init__(self, maxsize: int, policy: str, booked_seq: int) -> None:
        self.maxsize = maxsize
        self.policy = policy
        # drop_oldest: a bounded deque evicts the oldest within the one append call.
        self.items: collections.deque[VisualFrame] = collections.deque(
            maxlen=maxsize if policy == "drop_oldest" else None)
        # Entered as `with self.lock` (the C lock), never `with self.cond`: Condition's
        # __enter__ is Python code, where a signal handler raising KeyboardInterrupt
        # would leave the lock held with no __exit__ to come.
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        self.closed = False
        self.dropped = 0
        self.delivered = 0
        self.async_waiters: list[_Waiter] = []
        self.booked_seq = booked_seq
        self.fork_gen = _fork.generation

    def offer(self, frame: VisualFrame, seq: int) -> bool:
        """Book accepted frame ``seq`` (once) and wake readers; False when closed."""
        with self.lock:
            if self.closed:
                return False
            if seq > self.booked_seq:
                if len(self.items) < self.maxsize:
                    self.booked_seq = seq
                    self.items.append(frame)
                elif self.policy == "drop_newest":
                    self.booked_seq = seq
                    self.dropped += 1
                else:
                    self.booked_seq = seq
                    self.dropped += 1
                    self.items.append(frame)
            self.cond.notify()
            waiters = self.async_waiters
        _wake_async(waiters)
        return True

    def settle(self, seq: int) -> None:
        """An offer of ``seq`` failed twice: count it dropped unless it was booked."""
        with self.lock:
            if not self.closed and seq > self.booked_seq:
                self.booked_seq = seq
                self.dropped += 1

    def close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
            self.cond.notify_all()
            waiters = self.async_waiters
        _wake_async(waiters)

    def take(self) -> VisualFrame:
        self.delivered += 1
        return self.items.popleft()


class Subscription(metaclass=abc.ABCMeta):
    """A subscriber's handle: a bounded queue of the frames a session accepted.

    This is ``capsule_sessions.Subscription`` on both backends: the compiled twin's
    class is registered as a virtual subclass (``_backend``), so ``isinstance`` holds
    for either, and type checkers read the signatures here.
    """

    __slots__ = ("_queue", "_ring", "__weakref__")
    _queue: _Queue
    _ring: FrameRing

    def __new__(cls, *args: Any, **kwargs: Any) -> Subscription:
        # Only the ring makes these; one made by hand would have no queue behind it.
        if len(args) != 3 or args[0] is not _MAKE or kwargs:
            raise TypeError(NOT_BY_HAND_MESSAGE)
        sub = super().__new__(cls)
        sub._ring = args[1]
        sub._queue = args[2]
        return sub

    def __reduce_ex__(self, protocol: SupportsIndex) -> NoReturn:
        # A second handle on one queue would close it when collected (as threading.Lock,
        # it is neither copied nor pickled).
        raise TypeError(f"cannot pickle or copy {type(self).__name__!r} object")

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

    def empty(self) -> bool:
        return not self._queue.items

    def full(self) -> bool:
        return len(self._queue.items) >= self._queue.maxsize

    def get(self, block: bool = True, timeout: float | datetime.timedelta | None = None) -> VisualFrame:
        """As ``queue.Queue.get``: the next frame, waiting up to ``timeout`` seconds
        (forever when None), or at once when ``block`` is false; ``queue.Empty`` when
        there is none. After close(): the frames still queued, then SubscriptionClosed."""
        if not block:
            return self.get_nowait()
        seconds = v.timeout_seconds(timeout)
        q = self._queue
        _check_not_forked(q.fork_gen)
        with q.lock:
            deadline = None if seconds is None else time.monotonic() + seconds
            while not q.items:
                if q.closed:
                    raise SubscriptionClosed("subscription is closed")
                left = WAIT_SLICE_S if deadline is None else min(WAIT_SLICE_S, deadline - time.monotonic())
                if left <= 0:
                    raise queue.Empty
                # In slices: a wake-up lost to an interrupted notify costs one slice.
                q.cond.wait(left)
            return q.take()

    def get_nowait(self) -> VisualFrame:
        q = self._queue
        _check_not_forked(q.fork_gen)
        with q.lock:
            if q.items:
                return q.take()
            if q.closed:
                raise SubscriptionClosed("subscription is closed")
            raise queue.Empty

    async def aget(self, timeout: float | datetime.timedelta | None = None) -> VisualFrame:
        seconds = v.timeout_seconds(timeout)
        loop = asyncio.get_running_loop()
        deadline = None if seconds is None else loop.time() + seconds
        q = self._queue
        _check_not_forked(q.fork_gen)
        while True:
            with q.lock:
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
                with q.lock:
                    if waiter in q.async_waiters:
                        q.async_waiters.remove(waiter)

    def close(self) -> None:
        _check_not_forked(self._queue.fork_gen)
        self._queue.close()
        self._ring._remove(self._queue)

    unsubscribe = close

    def __del__(self) -> None:
        # No lock here: a garbage collection may run this while the same thread holds the
        # ring's or this queue's lock. Nobody can read this queue any more (a reader would
        # hold this handle), so marking it closed is enough; the ring forgets closed
        # queues on its next fan-out.
        q = getattr(self, "_queue", None)  # a handle refused at the door has none
        if q is not None:
            q.closed = True

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[VisualFrame]:
        while True:
            try:
                yield self.get()
            except SubscriptionClosed:
                return

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> VisualFrame:
        try:
            return await self.aget()
        except SubscriptionClosed:
            raise StopAsyncIteration from None

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return (f"<Subscription {state} policy={self.policy} maxsize={self.maxsize} "
                f"queued={self.qsize()} dropped={self.dropped} delivered={self.delivered}>")


class _Slot:
    """The ring's own record of one stored frame: its bookkeeping never reads fields of a
    frame it has handed out (a reader cannot change the ring's books by editing one)."""

    __slots__ = ("frame", "nbytes", "received_ns")

    def __init__(self, frame: VisualFrame, nbytes: int, received_ns: int) -> None:
        self.frame = frame
        self.nbytes = nbytes
        self.received_ns = received_ns


class FrameRing:
    """A session's newest frames, rate limiter, source tracking, subscribers and counters.

    The lock is reentrant and every change runs under a claim (``_claim``): a call made on
    the same thread by code that interrupted a change (a finalizer the garbage collector
    runs, a signal handler) raises RuntimeError instead of waiting forever or seeing the
    change half made. Reads take the lock without a claim and always complete.
    """

    def __init__(self, clock: Callable[[], float], created_at: float) -> None:
        self._clock = v.clock(clock)
        self._lock = threading.RLock()
        self._busy = False
        self._fork_gen = _fork.generation
        self._last_active_s, _ = v.instant(created_at, "created_at")
        self._slots: collections.deque[_Slot] = collections.deque()
        self._bytes = 0
        self._source = ""
        self._last_accepted_ns: int | None = None
        # Copy-on-write: a fan-out iterates the list it read while others replace it.
        self._subscribers: list[_Queue] = []
        self._ended = False
        self._accepted = 0
        self._rate_limited = 0
        self._source_resets = 0
        # Accepted frames not yet offered to every subscriber, oldest first, and whether
        # a thread is offering them (the fan-out runner).
        self._pending: collections.deque[tuple[int, VisualFrame]] = collections.deque()
        # The runner's claim: None, or the token of the call that runs the fan-out.
        self._fanning: object | None = None
        self._offered_through = 0
        self._fan_done = threading.Condition(self._lock)

    def __reduce_ex__(self, protocol: SupportsIndex) -> NoReturn:
        raise TypeError(f"cannot pickle or copy {type(self).__name__!r} object")

    # -- locking ---------------------------------------------------------------
    def _claim(self) -> None:
        """Start a change (ring lock held): refuse a forked child and a same-thread re-entry."""
        _check_not_forked(self._fork_gen)
        if self._busy:
            raise RuntimeError(REENTERED_MESSAGE)
        self._busy = True

    # -- time ------------------------------------------------------------------
    def _now(self, now: float | None) -> tuple[float, int]:
        if now is None:
            return v.instant(self._clock(), "clock()")
        return v.instant(now, "now")

    @property
    def last_active_at(self) -> float:
        return self._last_active_s

    def touch(self, now: float | None = None) -> None:
        seconds, _ = self._now(now)
        with self._lock:
            self._claim()
            try:
                self._last_active_s = seconds
            finally:
                self._busy = False

    # -- visual input ----------------------------------------------------------
    def _clear_frames(self) -> None:
        self._slots.clear()
        self._bytes = 0

    def _switch_source(self, source: str) -> None:
        if self._source:
            self._source_resets += 1
        self._source = source
        self._clear_frames()

    def start_visual_input(self, source: str, now: float | None = None) -> None:
        source = v.text(source, "source")
        seconds, _ = self._now(now)
        with self._lock:
            self._claim()
            try:
                if self._source != source:
                    self._switch_source(source)
                    self._last_accepted_ns = None
                self._last_active_s = seconds
            finally:
                self._busy = False

    def stop_visual_input(self, source: str = "", now: float | None = None) -> None:
        source = v.text(source, "source")
        seconds, _ = self._now(now)
        with self._lock:
            self._claim()
            try:
                if not source or not self._source or self._source == source:
                    self._clear_frames()
                    self._source = ""
                    self._last_accepted_ns = None
                self._last_active_s = seconds
            finally:
                self._busy = False

    def store_frame(
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
        _check_buffer(data)
        source = v.text(source, "source")
        keep = v.count(max_recent, "max_recent")
        min_ns = v.duration_ns(min_interval, "min_interval")
        mime_type = v.text(mime_type, "mime_type")
        width = v.integer(width, "width", 0, v.INT32_MAX)
        height = v.integer(height, "height", 0, v.INT32_MAX)
        if (width == 0 or height == 0) and isinstance(data, np.ndarray) and data.ndim >= 2:
            # An image array describes itself: height, width = shape[:2].
            height = height or min(data.shape[0], v.INT32_MAX)
            width = width or min(data.shape[1], v.INT32_MAX)
        timestamp_ms = v.integer(timestamp_ms, "timestamp_ms")
        frame_seq = v.integer(frame_seq, "frame_seq")
        seconds, now_ns = self._now(now)
        # Cheap early rejection: most calls of a rate-limited camera loop end here.
        if self._count_if_rate_limited(now_ns, min_ns):
            return False
        # The copy runs outside the lock; the decision is taken again under it below,
        # because another producer may have stored meanwhile.
        payload = _copy_bytes(data)
        frame = VisualFrame(payload, mime_type, width, height, source, timestamp_ms, frame_seq, seconds)
        # pending[0] is set (with no call in between) when the frame joins the fan-out
        # queue, so a KeyboardInterrupt that lands between accepting and offering is
        # still followed by the offer, in the finally, before the store returns.
        pending = [0]
        offered = False
        try:
            seq = self._commit(frame, payload.nbytes, keep, min_ns, seconds, now_ns, pending)
            if seq > 0:
                self._fan_out(seq)
            offered = True
        finally:
            if pending[0] and not offered:
                self._fan_out(pending[0])
        return seq >= 0

    def _count_if_rate_limited(self, now_ns: int, min_ns: int) -> bool:
        with self._lock:
            self._claim()
            try:
                limited = self._rate_limited_at(now_ns, min_ns)
                if limited:
                    self._rate_limited += 1
                return limited
            finally:
                self._busy = False

    def _rate_limited_at(self, now_ns: int, min_ns: int) -> bool:
        last = self._last_accepted_ns
        return last is not None and min_ns > 0 and now_ns - last < min_ns

    def _commit(self, frame: VisualFrame, nbytes: int, keep: int, min_ns: int, seconds: float, now_ns: int,
                pending: list[int]) -> int:
        """Accept ``frame`` into the ring and queue it for the fan-out: its accept number
        (0 when there is no subscriber to offer it to), or -1 when rate-limited."""
        with self._lock:
            self._claim()
            try:
                if self._rate_limited_at(now_ns, min_ns):
                    self._rate_limited += 1
                    return -1
                if self._source != frame.source:
                    self._switch_source(frame.source)
                self._slots.append(_Slot(frame, nbytes, now_ns))
                self._bytes += nbytes
                while len(self._slots) > keep:
                    self._bytes -= self._slots.popleft().nbytes
                self._last_accepted_ns = now_ns
                self._last_active_s = seconds
                self._accepted += 1
                if not self._subscribers:
                    return 0
                # Noted before the append: an interrupt at the append's return still
                # finds it noted, and the store offers it in its finally.
                pending[0] = self._accepted
                self._pending.append((self._accepted, frame))
                return self._accepted
            finally:
                self._busy = False

    def _fan_out(self, seq: int) -> None:
        """Offer accepted frame ``seq`` (and every other pending one) to the subscribers.

        One thread at a time offers the pending frames, oldest first (the runner); a store
        made meanwhile leaves its frame to it and waits until it was offered, so each
        subscriber receives frames in accept order and has been offered a frame when its
        store returns. A runner never waits for another (a store made by a finalizer or
        signal handler that interrupted a fan-out returns at once: the runner offers its
        frame), so no two threads can wait for each other.
        """
        token = object()
        try:
            with self._lock:
                while True:
                    if self._offered_through >= seq or not self._pending:
                        return
                    if not self._fanning:
                        # Counted as a runner first: a call nested between these two
                        # lines finds no claim and runs the fan-out itself; one nested
                        # after them sees a runner on its own thread and returns. Claimed
                        # with no call in between, so an interrupt cannot leave a claim
                        # nobody releases (the finally below releases it).
                        _fan_runs.depth += 1
                        self._fanning = token
                        break
                    if _fan_runs.depth:
                        return
                    # Interrupted here (KeyboardInterrupt): the frame stays pending, so
                    # the runner still offers it and the books balance.
                    self._fan_done.wait(WAIT_SLICE_S)
            self._run_fan_out(token)
        finally:
            if self._fanning is token:
                with self._lock:
                    self._fanning = None
                    self._fan_done.notify_all()
                _fan_runs.depth -= 1

    def _run_fan_out(self, token: object) -> None:
        # An error (KeyboardInterrupt from a signal handler, a failing event loop) is
        # raised only after every pending frame was offered to every subscriber: offers
        # book each frame once, so an interrupted one is simply made again.
        error: BaseException | None = None
        failures = 0
        running = True
        while running:
            try:
                running = self._offer_oldest_pending(token, give_up=failures >= 2)
                failures = 0
            except BaseException as exc:
                error = error or exc
                failures += 1
        if error is not None:
            raise error

    def _offer_oldest_pending(self, token: object, give_up: bool) -> bool:
        """One step of the fan-out; False (runner role handed back) when none is left."""
        with self._lock:
            if not self._pending:
                if self._fanning is token:
                    # Released before the thread stops counting as a runner, so a call
                    # nested in between finds no claim rather than its own thread's.
                    self._fanning = None
                    self._fan_done.notify_all()
                    _fan_runs.depth -= 1
                return False
            seq, frame = self._pending[0]
            queues = self._subscribers
        error = None
        if give_up:  # offering it failed over and over: counted as dropped instead
            for q in queues:
                q.settle(seq)
        else:
            error = _offer_to_all(queues, frame, seq)
        with self._lock:
            # Forgotten only now that it was offered: a runner interrupted before this
            # line leaves it pending, and the next step offers it again.
            if self._pending and self._pending[0][0] == seq:
                self._pending.popleft()
                self._offered_through = seq
                self._fan_done.notify_all()
            if any(q.closed for q in queues):
                self._subscribers = [q for q in self._subscribers if not q.closed]
        if error is not None:
            raise error
        return True

    def store_visual_frame(self, frame: VisualFrame, max_recent: int, min_interval: float | datetime.timedelta = 0.0,
                           now: float | None = None) -> bool:
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

    def latest_visual_frames(self, ttl: float | datetime.timedelta, now: float | None = None) -> list[VisualFrame]:
        ttl_ns = v.duration_ns(ttl, "ttl")
        _, now_ns = self._now(now)
        if ttl_ns <= 0:
            return []
        _check_not_forked(self._fork_gen)
        with self._lock:
            return [s.frame for s in self._slots if now_ns - s.received_ns <= ttl_ns]

    def visual_stats(self) -> dict[str, int]:
        _check_not_forked(self._fork_gen)
        with self._lock:
            return {
                "accepted": self._accepted,
                "rate_limited": self._rate_limited,
                "source_resets": self._source_resets,
                "frames": len(self._slots),
                "bytes": self._bytes,
            }

    # -- subscribers -----------------------------------------------------------
    def subscribe_visual_frames(self, buffer: int = 1, *, policy: str = "drop_newest") -> Subscription:
        maxsize = v.count(buffer, "buffer")
        policy = v.policy(policy)
        with self._lock:
            self._claim()
            try:
                # Frames accepted before now are not this subscriber's, even those still
                # waiting for the fan-out.
                q = _Queue(maxsize, policy, self._accepted)
                # The session has ended: nothing will ever close this one, so it starts
                # closed and a reader finishes at once instead of waiting forever.
                if self._ended:
                    q.closed = True
                else:
                    self._subscribers = self._subscribers + [q]
            finally:
                self._busy = False
        return Subscription(_MAKE, self, q)

    @property
    def subscriber_count(self) -> int:
        _check_not_forked(self._fork_gen)
        with self._lock:
            return sum(1 for q in self._subscribers if not q.closed)

    def _remove(self, q: _Queue) -> None:
        # Closing is never refused: a re-entered close (a finalizer during a change) leaves
        # the closed queue for the next fan-out to forget.
        with self._lock:
            if self._busy:
                return
            self._subscribers = [other for other in self._subscribers if other is not q]

    def close_subscriptions(self) -> None:
        with self._lock:
            self._claim()
            try:
                self._ended = True
                subscribers, self._subscribers = self._subscribers, []
            finally:
                self._busy = False
        error: BaseException | None = None
        for q in subscribers:
            try:
                q.close()
            except BaseException as exc:  # every reader is still woken, then it is raised
                error = error or exc
        if error is not None:
            raise error


def _offer_to_all(queues: list[_Queue], frame: VisualFrame, seq: int) -> BaseException | None:
    """Offer accepted frame ``seq`` to every queue; returns the first error instead of
    raising it, after every queue got the frame or had it counted as dropped."""
    error: BaseException | None = None
    for q in queues:
        for _attempt in range(2):
            try:
                q.offer(frame, seq)
                break
            except BaseException as exc:
                error = error or exc
        else:
            q.settle(seq)
    return error
