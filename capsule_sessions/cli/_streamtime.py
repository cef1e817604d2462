"""Video time: the session clock of a source read without ``--realtime``.

Read flat out, a file decodes several times faster than it plays, so on the wall clock
``--frame-interval 1`` lets through one frame per second of decoding, not per second
of video, and ``--ttl`` means nothing about the video. Such a session's instants come
from a ``StreamClock`` instead: it stands at the stream time (pts) of the frame being
stored, mapped onto the wall clock's instant when the run was set up, and is passed as
``now`` to every store and to the vision sampler's ``latest_visual_frames``.

``received_at`` is then video time, so store-to-receive latency cannot be taken from
it; ``StoreTimes`` keeps the wall-clock instant of each store by ``frame_seq`` instead.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

import numpy as np

from .. import VisualFrame


class StreamClock:
    """A clock that moves only when the producer says the stream has moved.

    Calling it returns the current instant; ``advance(t)`` moves it to stream time ``t``
    (seconds, as the source yields them). It never goes back, so a stream whose
    timestamps jump backwards cannot put frames out of order for the ring.

    A vision sampler on this clock calls at fixed instants of video (``due``), and the
    producer does not move past a due instant until the sampler has made that call: a
    call at ``due`` sees exactly the frames with a stream time up to ``due``, however
    fast the stream is read and however the threads are scheduled.
    """

    def __init__(self, wall: Callable[[], float]) -> None:
        # A whole second: origin + 1.0 is then exact in binary, so frames exactly one
        # --frame-interval apart in pts are exactly that far apart in the ring's ns.
        # Rounded up, not down, so no instant precedes the session's creation.
        self.origin = float(math.ceil(wall()))
        self._now = self.origin
        self._first: float | None = None
        self._pending = -math.inf  # the instant the producer wants to move to
        self._ended = False
        self._due: dict[object, float] = {}  # sampler -> the instant of its next call
        self._changed = threading.Condition()

    def __call__(self) -> float:
        return self._now

    def advance(self, t: float) -> float:
        """Move to stream time ``t``, once every call due before it was made; returns
        the instant to store that frame at."""
        if self._first is None:
            self._first = t
        with self._changed:
            instant = max(self._now, self.origin + (t - self._first))
            self._pending = instant
            self._changed.notify_all()
            self._changed.wait_for(lambda: all(due >= instant for due in self._due.values()))
            self._now = instant
        return instant

    def end(self) -> None:
        """The stream is over: wake whoever waits for a time it will never reach."""
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    # -- the sampler's side ------------------------------------------------------
    def expect(self, key: object, due: float) -> None:
        """``key`` calls next at ``due``: the producer waits for it there."""
        with self._changed:
            self._due[key] = due
            self._changed.notify_all()

    def forget(self, key: object) -> None:
        """``key`` makes no more calls (it stopped or failed): never wait for it."""
        with self._changed:
            self._due.pop(key, None)
            self._changed.notify_all()

    def wake(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def wait_until(self, due: float, stop: threading.Event) -> bool:
        """Block until the stream reaches ``due`` (True: make the call now), or ends
        before it or ``stop`` is set (False)."""
        with self._changed:
            def ready() -> bool:
                return self._pending > due or self._ended or stop.is_set()

            self._changed.wait_for(ready)
            return (self._pending > due or self._now >= due) and not stop.is_set()


class StoreTimes:
    """Wall-clock instants of the most recent stores, looked up by ``frame_seq``.

    A fixed ring of ``size`` slots (seq modulo size), so memory stays bounded on an
    endless stream; a frame read more than ``size`` stores after it was made has lost
    its slot and ``get`` returns None for it. The producer writes the seq before the
    time and a reader reads the time before the seq, so a slot being overwritten reads
    as lost, never as another frame's time.
    """

    def __init__(self, size: int = 1 << 16) -> None:
        self._mask = size - 1
        assert size & self._mask == 0, "size must be a power of two"
        self._seqs = np.full(size, -1, dtype=np.int64)
        self._walls = np.zeros(size, dtype=np.float64)

    def put(self, seq: int, wall: float) -> None:
        slot = seq & self._mask
        self._seqs[slot] = seq
        self._walls[slot] = wall

    def get(self, frame: VisualFrame) -> float | None:
        seq = frame.frame_seq
        slot = seq & self._mask
        wall = float(self._walls[slot])
        return wall if self._seqs[slot] == seq else None
