"""The subscriber's handle on its queue: queue.Queue's reading methods, asyncio and
iteration. The compiled twin's ``_subscription.pxi``.
"""

from __future__ import annotations

import abc
import asyncio
import datetime
import queue
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NoReturn, SupportsIndex

from .. import _limits
from .. import _validate as v
from .._records import VisualFrame
from ..errors import NOT_BY_HAND_MESSAGE, SubscriptionClosed
from ._fork import _made_by_ring, _refuse_copy, check_not_forked
from ._queue import _Queue

if TYPE_CHECKING:
    from ._ring import FrameRing


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
        ring, q = _made_by_ring(args, kwargs, NOT_BY_HAND_MESSAGE)
        sub = super().__new__(cls)
        sub._ring = ring
        sub._queue = q
        return sub

    def __del__(self) -> None:
        q = getattr(self, "_queue", None)  # a handle refused at the door has none
        if q is not None:
            q.mark_closed()

    def __reduce_ex__(self, protocol: SupportsIndex) -> NoReturn:
        # A second handle on one queue would close it when collected (as threading.Lock,
        # it is neither copied nor pickled).
        _refuse_copy(self, protocol)

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
        return self._get_blocking(timeout)

    def _get_blocking(self, timeout: float | datetime.timedelta | None) -> VisualFrame:
        seconds = v.timeout_seconds(timeout)
        q = self._queue
        check_not_forked(q.fork_gen)
        with q.lock:
            deadline = None if seconds is None else time.monotonic() + seconds
            while not q.items:
                if q.closed:
                    raise SubscriptionClosed("subscription is closed")
                slice_s = _limits.WAIT_SLICE_S
                left = slice_s if deadline is None else min(slice_s, deadline - time.monotonic())
                if left <= 0:
                    raise queue.Empty
                # In slices: a wake-up lost to an interrupted notify costs one slice.
                q.cond.wait(left)
            return q.take()

    def get_nowait(self) -> VisualFrame:
        q = self._queue
        check_not_forked(q.fork_gen)
        with q.lock:
            frame = q.try_take()
        if frame is None:
            raise queue.Empty
        return frame

    async def aget(self, timeout: float | datetime.timedelta | None = None) -> VisualFrame:
        """Await the next frame without blocking the loop; ``queue.Empty`` on timeout."""
        return await self._await_frame(timeout)

    async def _await_frame(self, timeout: float | datetime.timedelta | None) -> VisualFrame:
        seconds = v.timeout_seconds(timeout)
        loop = asyncio.get_running_loop()
        deadline = None if seconds is None else loop.time() + seconds
        q = self._queue
        check_not_forked(q.fork_gen)
        while True:
            with q.lock:
                frame = q.try_take()
                if frame is not None:
                    return frame
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
        """Stop receiving; wakes every waiter. Idempotent."""
        check_not_forked(self._queue.fork_gen)
        try:
            self._queue.close()
        finally:
            self._ring._remove_queue(self._queue)

    unsubscribe = close

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[VisualFrame]:
        while True:
            try:
                yield self._get_blocking(None)
            except SubscriptionClosed:
                return

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> VisualFrame:
        try:
            return await self._await_frame(None)
        except SubscriptionClosed:
            raise StopAsyncIteration from None

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return (f"<Subscription {state} policy={self.policy} maxsize={self.maxsize} "
                f"queued={self.qsize()} dropped={self.dropped} delivered={self.delivered}>")
