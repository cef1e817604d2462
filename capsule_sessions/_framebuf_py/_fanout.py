"""The fan-out: accepted frames wait in ``_FanOut.pending`` and one thread at a time (the
runner) offers them to the subscribers, oldest first. A store that finds a runner at work
leaves its frame to it and waits until it was offered, so each subscriber receives
frames in accept order and has been offered a frame when its store returns. A runner
never waits for another (a store made by a finalizer or signal handler that interrupted a
fan-out returns at once: the runner offers its frame), so no two threads can wait for
each other. Every method takes the ring whose lock guards the fan-out's state. The
compiled twin's ``_fanout.pxi``.
"""

from __future__ import annotations

import collections
import threading
from typing import TYPE_CHECKING

from .. import _limits
from .._records import VisualFrame
from ._queue import _Queue

if TYPE_CHECKING:
    from ._ring import FrameRing


class _FanRuns(threading.local):
    """How many fan-outs this thread is running (it is their runner): such a thread never
    waits for another thread's fan-out, which is what rules out two waiting on each other."""

    depth = 0


_fan_runs = _FanRuns()


class _FanOut:
    """The frames a ring accepted and has not offered to every subscriber yet, and the
    runner's claim."""

    __slots__ = ("pending", "runner", "offered_through", "done")

    def __init__(self, lock: threading.RLock) -> None:
        self.pending: collections.deque[tuple[int, VisualFrame]] = collections.deque()
        # The runner's claim: None, or the token of the call that runs the fan-out.
        self.runner: object | None = None
        self.offered_through = 0
        self.done = threading.Condition(lock)

    # -- offering ---------------------------------------------------------------------
    def await_offer(self, ring: FrameRing, seq: int) -> None:
        """Wait until accepted frame ``seq`` (and every other pending one) was offered,
        running the fan-out if nobody does."""
        token = object()
        try:
            with ring._lock:
                while True:
                    if self.offered_through >= seq or not self.pending:
                        return
                    if self.runner is None:
                        # Counted as a runner first: a call nested between these two
                        # lines finds no claim and runs the fan-out itself; one nested
                        # after them sees a runner on its own thread and returns. Claimed
                        # with no call in between, so an interrupt cannot leave a claim
                        # nobody releases (the finally below releases it).
                        _fan_runs.depth += 1
                        self.runner = token
                        break
                    if _fan_runs.depth:
                        return
                    # Interrupted here (KeyboardInterrupt): the frame stays pending, so
                    # the runner still offers it and the books balance.
                    self.done.wait(_limits.WAIT_SLICE_S)
            self.run(ring, token)
        finally:
            if self.runner is token:
                with ring._lock:
                    self.runner = None
                    self.done.notify_all()
                _fan_runs.depth -= 1

    def run(self, ring: FrameRing, token: object) -> None:
        """Offer pending frames until none is left (``token`` holds the runner role).
        An error (KeyboardInterrupt from a signal handler, a failing event loop) is
        raised only after every pending frame was offered to every subscriber: offers
        book each frame once, so an interrupted one is simply made again."""
        error: BaseException | None = None
        failures = 0
        running = True
        while running:
            try:
                running = self.offer_oldest(ring, token, give_up=failures >= 2)
                failures = 0
            except BaseException as exc:
                error = error or exc
                failures += 1
        if error is not None:
            raise error

    def offer_oldest(self, ring: FrameRing, token: object, give_up: bool) -> bool:
        """One step of the fan-out (the compiled twin's offer_to, then next_pending);
        False (runner role handed back) when none is left."""
        with ring._lock:
            if not self.pending:
                if self.runner is token:
                    # Released before the thread stops counting as a runner, so a call
                    # nested in between finds no claim rather than its own thread's.
                    self.runner = None
                    self.done.notify_all()
                    _fan_runs.depth -= 1
                return False
            seq, frame = self.pending[0]
            queues = ring._subscribers
        error = self.offer_to(queues, seq, frame, give_up)
        with ring._lock:
            # Forgotten only now that it was offered: a runner interrupted before this
            # line leaves it pending, and the next step offers it again.
            if self.pending and self.pending[0][0] == seq:
                self.pending.popleft()
                self.offered_through = seq
                self.done.notify_all()
            if any(q.closed for q in queues):
                ring._prune_closed()
        if error is not None:
            raise error
        return True

    def offer_to(self, queues: list[_Queue], seq: int, frame: VisualFrame, give_up: bool) -> BaseException | None:
        """Offer accepted frame ``seq`` to every queue; returns the first error instead of
        raising it, after every queue got the frame or had it counted as dropped."""
        error: BaseException | None = None
        for q in queues:
            if give_up:  # offering it failed over and over: counted as dropped instead
                q.settle(seq)
                continue
            for _attempt in range(2):
                try:
                    q.push(frame, seq)
                    break
                except BaseException as exc:
                    error = error or exc
            else:
                q.settle(seq)
        return error
