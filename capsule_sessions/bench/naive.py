"""The naive port: what a user writes without capsule_sessions, as a benchmark reference.

A ``threading.Lock`` around a list ring, one ``queue.Queue(maxsize)`` per subscriber fed
with ``put_nowait`` (a full queue drops the frame and counts it), and one copy of the
bytes per store. The semantics are the Go original's: the rate limit is measured from
the last accepted frame, a frame from another source empties the ring, the newest
``max_recent`` frames are kept, and reads filter by TTL. It is deliberately plain: no
validation beyond what Python does anyway, floats compared as floats, everything under
the one lock. Method names match ``Session``'s visual API so a workload drives both
alike. It ships with the package for ``capsule-sessions bench``, but it is a benchmark
reference, not a supported API.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["NaiveClosed", "NaiveFrame", "NaiveSession", "NaiveSubscription"]



class NaiveClosed(Exception):
    """Raised by ``NaiveSubscription.get`` once the subscription is closed and drained."""


@dataclass
class NaiveFrame:
    data: bytes
    mime_type: str
    width: int
    height: int
    source: str
    timestamp_ms: int
    frame_seq: int
    received_at: float


class NaiveSubscription:
    def __init__(self, session: NaiveSession, maxsize: int) -> None:
        # None is put in by close(): the reader sees it after every queued frame.
        self.queue: queue.Queue[NaiveFrame | None] = queue.Queue(maxsize)
        self.maxsize = maxsize
        self.dropped = 0
        self.delivered = 0
        self.closed = False
        self._session = session

    def get(self, timeout: float | None = None) -> NaiveFrame:
        if self.closed and self.queue.empty():
            raise NaiveClosed("subscription is closed")
        item = self.queue.get(timeout=timeout)
        if item is None:
            raise NaiveClosed("subscription is closed")
        self.delivered += 1
        return item

    def qsize(self) -> int:
        return self.queue.qsize()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._session._unsubscribe(self)
        # Wakes a reader blocked on an empty queue. A full queue needs no marker: get()
        # sees the closed flag once the reader has drained it.
        try:
            self.queue.put_nowait(None)
        except queue.Full:
            pass


class NaiveSession:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._frames: list[NaiveFrame] = []
        self._source = ""
        self._last_accepted: float | None = None
        self._subscribers: list[NaiveSubscription] = []
        self.last_active_at = clock()

    def store_frame(
        self,
        data: Any,
        *,
        source: str,
        max_recent: int,
        min_interval: float = 0.0,
        mime_type: str = "",
        width: int = 0,
        height: int = 0,
        timestamp_ms: int = 0,
        frame_seq: int = 0,
        now: float | None = None,
    ) -> bool:
        if now is None:
            now = self._clock()
        if max_recent <= 0:
            max_recent = 1
        with self._lock:
            last = self._last_accepted
            if last is not None and min_interval > 0 and now - last < min_interval:
                return False
            if source != self._source:
                self._source = source
                self._frames = []
            frame = NaiveFrame(bytes(memoryview(data)), mime_type, width, height, source,
                               timestamp_ms, frame_seq, now)
            self._frames.append(frame)
            if len(self._frames) > max_recent:
                del self._frames[:-max_recent]
            self._last_accepted = now
            self.last_active_at = now
            for sub in self._subscribers:
                try:
                    sub.queue.put_nowait(frame)
                except queue.Full:
                    sub.dropped += 1
        return True

    def latest_visual_frames(self, ttl: float, now: float | None = None) -> list[NaiveFrame]:
        if now is None:
            now = self._clock()
        if ttl <= 0:
            return []
        with self._lock:
            return [f for f in self._frames if now - f.received_at <= ttl]

    def subscribe_visual_frames(self, buffer: int = 1) -> NaiveSubscription:
        sub = NaiveSubscription(self, buffer if buffer > 0 else 1)
        with self._lock:
            self._subscribers.append(sub)
        return sub

    def _unsubscribe(self, sub: NaiveSubscription) -> None:
        with self._lock:
            if sub in self._subscribers:
                self._subscribers.remove(sub)
