"""The pure-Python frame-buffer backend: the reference the Cython twin must match.

The frame-buffer backend interface
----------------------------------
A backend module exports three classes; ``Session`` owns one ``FrameRing`` and forwards
its methods of the same names to it.

``FrameRing(clock, created_at)``
    One session's visual input plus its activity clock.

    - ``last_active_at`` (float), ``touch(now=None)``: the session's activity instant;
      every touch goes through the ring because storing a frame touches the session.
    - ``start_visual_input(source, now=None)``, ``stop_visual_input(source="", now=None)``
    - ``store_frame(data, *, source, max_recent, min_interval=0.0, mime_type="", width=0,
      height=0, timestamp_ms=0, frame_seq=0, now=None) -> bool``
    - ``store_visual_frame(frame, max_recent, min_interval=0.0, now=None) -> bool``
    - ``loan_frame(nbytes) -> FrameLoan``
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

``FrameLoan``
    ``nbytes``, ``array`` (writable 1-D uint8, a new view each time), ``as_array(shape,
    dtype=np.uint8)``, ``commit(...)`` (``store_frame``'s keywords and result, the bytes
    being the loan's; BufferError while a view of the loan is alive), ``cancel()``
    (a no-op on a finished loan), context manager (cancels unless committed). Made only
    by the ring: never by hand, copied or pickled. A loan dropped unfinished is cancelled.

What callers see, on both twins (the Go original's semantics plus the documented
extensions): instants are compared as int64 ns (``_validate``); the rate limiter
measures from the last *accepted* frame; a frame from another source empties the ring
(after the rate check, like Go); frames are stored with exactly one copy of their bytes
(a committed loan's: one in this twin, none in the compiled one), and handed to every
reader as the same read-only array, which never changes; a loan's commit decides the
rate limit when it is made, and nothing writes through a loan once it is finished; each
subscriber receives frames in accept order, and has been offered a frame (queued, or
counted in ``dropped``, exactly once) when the store that accepted it returns, unless
that store was made from inside another store's fan-out; an error raised during a
fan-out (KeyboardInterrupt) reaches the storing caller after the books are settled; a
call that interrupts another on the same thread (finalizer, signal handler) completes
or raises RuntimeError, never hangs; a ring inherited through fork() refuses use.

How the twins are built, file by file, and their lock order: docs/architecture.md.
"""

from ._loan import FrameLoan
from ._ring import FrameRing
from ._subscription import Subscription

__all__ = ["FrameLoan", "FrameRing", "Subscription"]
