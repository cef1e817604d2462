"""The subscriber queue: a bounded queue of frame references with its own lock, which the
ring offers accepted frames to and a Subscription takes them from. The compiled twin's
``_queue.pxi``.
"""

from __future__ import annotations

import asyncio
import collections
import threading

from .._records import VisualFrame
from ..errors import SubscriptionClosed
from ._fork import _fork

# An asyncio reader parked on a queue: its loop and the future a producer resolves.
_Waiter = tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]


def _wake(fut: asyncio.Future[None]) -> None:
    # Runs in the waiter's event loop (call_soon_threadsafe).
    if not fut.done():
        fut.set_result(None)


class _Queue:
    """A subscriber's bounded queue. The ring holds this, the user holds a Subscription.

    ``push`` books each accepted frame once, by its accept number: queued, or counted in
    ``dropped``. Booking is a pair of statements with no call between them, so no signal
    handler can run half-way; a push cut short by one (KeyboardInterrupt) is simply
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

    # -- producer side ---------------------------------------------------------------
    def push(self, frame: VisualFrame, seq: int) -> None:
        """Book accepted frame ``seq`` (once) as queued or dropped, then wake readers (a
        push made again after an interrupt wakes them again: its wake-up may have been
        the part cut short)."""
        with self.lock:
            if self.closed:
                return
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
        self.wake_async_waiters()

    def settle(self, seq: int) -> None:
        """Offering ``seq`` failed: count it dropped unless it was booked."""
        with self.lock:
            if not self.closed and seq > self.booked_seq:
                self.booked_seq = seq
                self.dropped += 1

    def wake_async_waiters(self) -> None:
        """Wake every parked asyncio waiter not woken yet. Each wake runs the loop's
        Python code (where a signal handler may raise): the first error is raised after
        all were tried, so one broken loop or one Ctrl-C never leaves another asleep."""
        error: BaseException | None = None
        for loop, fut in list(self.async_waiters):
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

    def mark_closed(self) -> None:
        """Close without locking: for a finalizer, which the garbage collector may run
        while this thread holds the ring's or this queue's lock. Nobody can read the
        queue any more (a reader would hold its handle), so the flag is enough; the ring
        forgets closed queues on its next fan-out."""
        self.closed = True

    def close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
            self.cond.notify_all()
        self.wake_async_waiters()

    # -- consumer side (lock held) ---------------------------------------------------------
    def take(self) -> VisualFrame:
        self.delivered += 1
        return self.items.popleft()

    def try_take(self) -> VisualFrame | None:
        """A frame, or None when there is none yet; SubscriptionClosed once closed and
        emptied. (The compiled twin's takes the lock itself; here the caller holds it,
        so an async reader parks its waiter under the same lock.)"""
        if self.items:
            return self.take()
        if self.closed:
            raise SubscriptionClosed("subscription is closed")
        return None
