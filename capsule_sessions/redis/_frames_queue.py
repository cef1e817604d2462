"""A subscriber's local queue of a Redis session's frames, and its handle.

The queue is the pure twin's ``_Queue`` (the same bounded deque, lock, condition and
asyncio waiters, so ``Subscription``'s reading methods work on it unchanged) plus where
its frames come from: the stream, by sequence number. Each accepted frame has one
sequence number (its stream id is ``<epoch>-<seq>``) and is booked once per subscriber, as
queued or dropped:

- ``push_local``: a frame this node stored, offered right after its script returned, so
  a subscriber on the storing node has it (or has counted it as dropped) when the store
  returns, as with the in-process ring. Only the next number in sequence is taken here;
  anything else is left to the reader, which reads the stream in order.
- ``push_read``: a frame the reader read from the stream. Numbers it skipped are frames
  the stream trimmed before they were read (a slow subscriber, or one that was
  reconnecting): they are counted in ``dropped``, never lost silently.

An *epoch* names one life of the session's keys (made by the first store; a Redis
restart without persistence, or a reset of the keys, makes a new one): sequence numbers
restart with it, so the queue books a new epoch's frames from 0 again.
"""

from __future__ import annotations

import datetime
import queue
import threading
import time
from typing import Any

from .. import _limits
from .. import _validate as v
from .._framebuf_py import Subscription
from .._framebuf_py._fork import check_not_forked
from .._framebuf_py._queue import _Queue
from .._records import VisualFrame


class RedisQueue(_Queue):
    __slots__ = ("epoch", "read_through", "reader", "consumers", "consumer_left_at", "reader_cond")

    def __init__(self, maxsize: int, policy: str, booked_seq: int, epoch: bytes | None) -> None:
        super().__init__(maxsize, policy, booked_seq)
        # The epoch booked_seq counts in (None: the session had no frames yet).
        self.epoch = epoch
        # The highest sequence number the reader has read from the stream.
        self.read_through = booked_seq
        # The sync ring's reader (_frames._Reader), which a thread waiting in get may
        # step itself; None for the asyncio ring's (a task on its loop).
        self.reader: Any = None
        # Threads waiting in get now, and when the last one left (lock held to change).
        self.consumers = 0
        self.consumer_left_at = float("-inf")
        # What the reader thread waits on while it stands aside for those threads, so it
        # sleeps until it has to read again rather than looking every few milliseconds:
        # notified when the last of them left, when one's read failed (reconnecting is
        # the reader thread's) and when the queue closed. Not self.cond: a push's
        # notify() there must wake a waiting get, not the reader thread.
        self.reader_cond = threading.Condition(self.lock)

    def _book(self, frame: VisualFrame, seq: int) -> None:
        # The pure queue's booking (lock held): queued, or counted as dropped.
        self.booked_seq = seq
        if len(self.items) < self.maxsize:
            self.items.append(frame)
        elif self.policy == "drop_newest":
            self.dropped += 1
        else:
            self.dropped += 1
            self.items.append(frame)

    def push_local(self, frame: VisualFrame, seq: int, epoch: bytes) -> None:
        with self.lock:
            if self.closed:
                return
            if self.epoch != epoch:
                if self.epoch is not None or self.booked_seq != 0:
                    return  # the reader sorts out a change of epoch
                self.epoch = epoch
            if seq != self.booked_seq + 1:
                return
            self._book(frame, seq)
            self.cond.notify()
        self.wake_async_waiters()

    def push_read(self, frame: VisualFrame | None, seq: int, epoch: bytes) -> None:
        """A frame read from the stream (None: an entry that could not be read, counted
        as dropped)."""
        with self.lock:
            if self.closed:
                return
            if self.epoch != epoch:
                self.new_epoch(epoch)
            if seq > self.read_through:
                self.read_through = seq
            if seq <= self.booked_seq:
                return  # already booked (pushed by the storing node)
            self.dropped += seq - self.booked_seq - 1
            if frame is None:
                self.booked_seq = seq
                self.dropped += 1
            else:
                self._book(frame, seq)
            self.cond.notify()
        self.wake_async_waiters()

    def new_epoch(self, epoch: bytes | None) -> None:
        """The session's keys started a new life (lock held or not: only the reader and
        pushes of that epoch use these fields)."""
        with self.lock:
            self.epoch = epoch
            self.booked_seq = 0
            self.read_through = 0

    def end(self, last: int, epoch: bytes | None) -> None:
        """The session's frames ended after frame ``last`` of ``epoch``: those not booked
        were trimmed before they could be read, so they count as dropped; then closed."""
        with self.lock:
            if self.closed:
                return
            if epoch is not None and epoch == self.epoch and last > self.booked_seq:
                self.dropped += last - self.booked_seq
                self.booked_seq = last
        self.close()

    def close(self) -> None:
        super().close()
        with self.lock:
            self.reader_cond.notify_all()

    def wake_reader(self) -> None:
        """A waiting get's read failed: the reader thread takes over (it reconnects)."""
        with self.lock:
            self.reader_cond.notify_all()

    def position(self) -> str:
        """The stream id the reader's next read starts after: past everything booked or
        read (from the start when the epoch is not known yet)."""
        with self.lock:
            if self.epoch is None:
                return "0-0"
            return f"{self.epoch.decode()}-{max(self.booked_seq, self.read_through)}"

    def seq_position(self) -> int:
        with self.lock:
            return max(self.booked_seq, self.read_through)


class RedisSubscription(Subscription):
    """A subscription to a Redis session's frames: the in-process ``Subscription`` (it is
    one), reading a local queue that a background reader fills from the stream."""

    __slots__ = ()

    def _get_blocking(self, timeout: float | datetime.timedelta | None) -> VisualFrame:
        """Subscription.get: a thread that would wait reads the stream itself when the
        reader's connection is free, so the frame is its own at once; else it waits for
        the reader thread as the in-process queue's getters do."""
        q: RedisQueue = self._queue  # type: ignore[assignment]
        reader = q.reader
        if reader is None:
            return super()._get_blocking(timeout)
        seconds = v.timeout_seconds(timeout)
        check_not_forked(q.fork_gen)
        deadline = None if seconds is None else time.monotonic() + seconds
        counted = False
        try:
            # Counted inside the try: an interrupt as the lock is left must not leave the
            # count up, or the reader thread would stand aside for good.
            with q.lock:
                q.consumers += 1
                counted = True
            while True:
                with q.lock:
                    frame = q.try_take()
                if frame is not None:
                    return frame
                left = _limits.WAIT_SLICE_S if deadline is None else min(_limits.WAIT_SLICE_S,
                                                                           deadline - time.monotonic())
                if left <= 0:
                    raise queue.Empty
                if reader.try_step(left):
                    continue
                with q.lock:
                    if not q.items and not q.closed:
                        q.cond.wait(left)
        finally:
            if counted:
                # No wake-up of the reader thread: it looks again within READER_PARK_S.
                with q.lock:
                    q.consumers -= 1
                    q.consumer_left_at = time.monotonic()
