"""The ring: one session's newest frames, rate limiter, source, subscribers, counters and
activity clock. The compiled twin's ``_ring.pxi``.
"""

from __future__ import annotations

import collections
import datetime
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn, SupportsIndex

import numpy as np

from .. import _validate as v
from .._limits import MAX_LOAN_BYTES
from .._records import VisualFrame
from ..errors import REENTERED_MESSAGE
from ._buffers import check_buffer, copy_bytes
from ._fanout import _FanOut
from ._fork import _MAKE, _fork, _refuse_copy, check_not_forked
from ._loan import FrameLoan
from ._queue import _Queue
from ._slots import _Slot
from ._subscription import Subscription

if TYPE_CHECKING:
    from typing_extensions import Buffer

# What _commit returns for a frame nobody subscribes to (0: rate-limited, not accepted).
NO_FAN_OUT = -1


class FrameRing:
    """A session's newest frames, rate limiter, source tracking, subscribers and counters.

    The lock is reentrant and every change runs under a claim (``_claim``): a call made on
    the same thread by code that interrupted a change (a finalizer the garbage collector
    runs, a signal handler) raises RuntimeError instead of waiting forever or seeing the
    change half made. Reads take the lock without a claim and always complete.
    """

    def __init__(self, clock: Callable[[], float], created_at: float) -> None:
        self._clock = v.clock(clock)
        self._last_active_s, _ = v.instant(created_at, "created_at")
        # Copy-on-write: a fan-out iterates the list it read while others replace it.
        self._subscribers: list[_Queue] = []
        self._source = ""
        self._fork_gen = _fork.generation
        self._lock = threading.RLock()
        self._fan = _FanOut(self._lock)
        self._busy = False
        self._slots: collections.deque[_Slot] = collections.deque()
        self._bytes = 0
        self._last_accepted_ns: int | None = None
        self._ended = False
        self._accepted = 0
        self._rate_limited = 0
        self._source_resets = 0

    def __reduce_ex__(self, protocol: SupportsIndex) -> NoReturn:
        _refuse_copy(self, protocol)

    # -- locking ---------------------------------------------------------------
    def _claim(self) -> None:
        """Before a change (ring lock held): refuse a forked child and a same-thread
        re-entry. The caller then sets ``_busy`` itself, right before its ``try``: a
        signal handler's exception lands where a call returns, and one landing after
        this call must find the flag unset, not set with no ``finally`` to clear it."""
        check_not_forked(self._fork_gen)
        if self._busy:
            raise RuntimeError(REENTERED_MESSAGE)

    # -- time ------------------------------------------------------------------
    def _read_now(self, now: float | None) -> tuple[float, int]:
        if now is None:
            return v.instant(self._clock(), "clock()")
        return v.instant(now, "now")

    @property
    def last_active_at(self) -> float:
        return self._last_active_s

    def touch(self, now: float | None = None) -> None:
        seconds, _ = self._read_now(now)
        with self._lock:
            self._claim()
            self._busy = True
            try:
                self._last_active_s = seconds
            finally:
                self._busy = False

    # -- visual input (ring lock held in the helpers) ----------------------------------
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
        seconds, _ = self._read_now(now)
        with self._lock:
            self._claim()
            self._busy = True
            try:
                if self._source != source:
                    self._switch_source(source)
                    self._last_accepted_ns = None
                self._last_active_s = seconds
            finally:
                self._busy = False

    def stop_visual_input(self, source: str = "", now: float | None = None) -> None:
        source = v.text(source, "source")
        seconds, _ = self._read_now(now)
        with self._lock:
            self._claim()
            self._busy = True
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
        """Store one frame's bytes (one copy); False when rate-limited."""
        return self._store(data, source, max_recent, min_interval, mime_type, width, height,
                           timestamp_ms, frame_seq, now)

    def store_visual_frame(self, frame: VisualFrame, max_recent: int, min_interval: float | datetime.timedelta = 0.0,
                           now: float | None = None) -> bool:
        if not isinstance(frame, VisualFrame):
            raise TypeError(f"frame must be a VisualFrame, got {type(frame).__name__}")
        return self._store(frame.data, frame.source, max_recent, min_interval, frame.mime_type,
                           frame.width, frame.height, frame.timestamp_ms, frame.frame_seq, now)

    def _store(self, data: Any, source: Any, max_recent: Any, min_interval: Any, mime_type: Any, width: Any,
               height: Any, timestamp_ms: Any, frame_seq: Any, now: Any) -> bool:
        check_buffer(data)
        source = v.text(source, "source")
        keep = v.count(max_recent, "max_recent")
        min_ns = v.duration_ns(min_interval, "min_interval")
        mime_type, width, height, timestamp_ms, frame_seq = v.frame_fields(
            data, mime_type, width, height, timestamp_ms, frame_seq)
        seconds, now_ns = self._read_now(now)
        # Cheap early rejection: most calls of a rate-limited camera loop end here.
        if self._count_if_rate_limited(now_ns, min_ns):
            return False
        # The copy runs outside the lock; the decision is taken again under it (in
        # _commit), because another producer may have stored meanwhile.
        payload = copy_bytes(data)
        frame = VisualFrame(payload, mime_type, width, height, source, timestamp_ms, frame_seq, seconds)
        return self._accept(frame, payload.nbytes, keep, min_ns, seconds, now_ns)

    def _store_loan(self, loan: FrameLoan, source: Any, max_recent: Any, min_interval: Any, mime_type: Any,
                    width: Any, height: Any, timestamp_ms: Any, frame_seq: Any, now: Any) -> bool:
        """FrameLoan.commit: _store's checks (a loan is 1-D: no width or height is read
        from a shape), then the loan's bytes as the frame's, copied once."""
        source = v.text(source, "source")
        keep = v.count(max_recent, "max_recent")
        min_ns = v.duration_ns(min_interval, "min_interval")
        mime_type, width, height, timestamp_ms, frame_seq = v.frame_fields(
            None, mime_type, width, height, timestamp_ms, frame_seq)
        seconds, now_ns = self._read_now(now)
        memory = loan._take()
        # Rate-limited: the loan is finished all the same, and nothing is copied.
        if self._count_if_rate_limited(now_ns, min_ns):
            return False
        payload = copy_bytes(memory)
        del memory
        frame = VisualFrame(payload, mime_type, width, height, source, timestamp_ms, frame_seq, seconds)
        return self._accept(frame, payload.nbytes, keep, min_ns, seconds, now_ns)

    def _accept(self, frame: VisualFrame, nbytes: int, keep: int, min_ns: int, seconds: float,
                now_ns: int) -> bool:
        """Commit a copied frame and see it offered to every subscriber; False when
        another producer's store made it rate-limited meanwhile."""
        # pending[0] is set (with no call in between) when the frame joins the fan-out
        # queue, so a KeyboardInterrupt that lands between accepting and offering is
        # still followed by the offer, in the finally, before the store returns.
        pending = [0]
        offered = False
        try:
            seq = self._commit(frame, nbytes, keep, min_ns, seconds, now_ns, pending)
            if seq == 0:
                return False
            if seq != NO_FAN_OUT:
                self._fan.await_offer(self, seq)
            offered = True
        finally:
            if pending[0] and not offered:
                self._fan.await_offer(self, pending[0])
        return True

    def _count_if_rate_limited(self, now_ns: int, min_ns: int) -> bool:
        with self._lock:
            self._claim()
            self._busy = True
            try:
                limited = self._is_rate_limited(now_ns, min_ns)
                if limited:
                    self._rate_limited += 1
                return limited
            finally:
                self._busy = False

    def _is_rate_limited(self, now_ns: int, min_ns: int) -> bool:
        last = self._last_accepted_ns
        return last is not None and min_ns > 0 and now_ns - last < min_ns

    def _commit(self, frame: VisualFrame, nbytes: int, keep: int, min_ns: int, seconds: float, now_ns: int,
                pending: list[int]) -> int:
        """Accept ``frame`` into the ring and queue it for the fan-out. Returns its accept
        number, 0 when rate-limited (another producer stored meanwhile), or NO_FAN_OUT
        when nobody subscribes."""
        with self._lock:
            self._claim()
            self._busy = True
            try:
                if self._is_rate_limited(now_ns, min_ns):
                    self._rate_limited += 1
                    return 0
                # From counting the frame to queueing it for the fan-out, nothing calls a
                # Python function (a signal handler's KeyboardInterrupt lands only at
                # one): the slot is made first, and the compiled twin's helper
                # _queue_for_fan_out and _FanOut.push are written out here.
                slot = _Slot(frame, nbytes, now_ns)
                if self._source != frame.source:
                    self._switch_source(frame.source)
                else:
                    while len(self._slots) >= keep:
                        self._bytes -= self._slots.popleft().nbytes
                self._slots.append(slot)
                self._bytes += nbytes
                self._last_accepted_ns = now_ns
                self._last_active_s = seconds
                self._accepted += 1
                if not self._subscribers:
                    return NO_FAN_OUT
                # Noted before the append: an interrupt at the append's return still
                # finds it noted, and the store offers it in its finally.
                pending[0] = self._accepted
                self._fan.pending.append((self._accepted, frame))
                return self._accepted
            finally:
                self._busy = False

    def loan_frame(self, nbytes: int) -> FrameLoan:
        """Writable memory for one frame of ``nbytes`` bytes; its commit() stores it."""
        size = v.integer(nbytes, "nbytes", 0, MAX_LOAN_BYTES)
        check_not_forked(self._fork_gen)
        return FrameLoan(_MAKE, self, size)

    # -- reads --------------------------------------------------------------------
    def latest_visual_frames(self, ttl: float | datetime.timedelta, now: float | None = None) -> list[VisualFrame]:
        """Frames no older than ttl (inclusive), oldest first; [] when ttl <= 0."""
        ttl_ns = v.duration_ns(ttl, "ttl")
        _, now_ns = self._read_now(now)
        if ttl_ns <= 0:
            return []
        check_not_forked(self._fork_gen)
        with self._lock:
            # Copied in one C call first: a signal handler may store on this thread (the
            # lock is reentrant) between two steps of the filter below, and the deque it
            # would change must not be the one being iterated.
            slots = list(self._slots)
        return [s.frame for s in slots if now_ns - s.received_ns <= ttl_ns]

    def visual_stats(self) -> dict[str, int]:
        check_not_forked(self._fork_gen)
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
            self._busy = True
            try:
                # Frames accepted before now are not this subscriber's, even those still
                # waiting for the fan-out.
                q = _Queue(maxsize, policy, self._accepted)
                if self._ended:
                    # Nothing would ever close it: it starts closed, so a reader finishes at once.
                    q.closed = True
                else:
                    self._subscribers = self._subscribers + [q]
            finally:
                self._busy = False
        return Subscription(_MAKE, self, q)

    @property
    def subscriber_count(self) -> int:
        check_not_forked(self._fork_gen)
        with self._lock:
            return sum(1 for q in self._subscribers if not q.closed)

    def _remove_queue(self, q: _Queue) -> None:
        # Closing is never refused: a re-entered close (a finalizer during a change) leaves
        # the closed queue for the next fan-out to forget.
        with self._lock:
            if self._busy:
                return
            self._subscribers = [other for other in self._subscribers if other is not q]

    def _prune_closed(self) -> None:
        """Forget queues whose handle was dropped (closed from __del__)."""
        with self._lock:
            self._subscribers = [q for q in self._subscribers if not q.closed]

    def close_subscriptions(self) -> None:
        """Close every live subscription (the session ended): their readers wake up."""
        with self._lock:
            self._claim()
            self._busy = True
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
