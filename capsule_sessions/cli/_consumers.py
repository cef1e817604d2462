"""The subscribers the main job runs per session, and what they measure.

- ``fast``: a thread that takes every frame as soon as it arrives (drop_oldest queue).
- ``slow``: a thread that spends ``work`` seconds per frame on a Go-style drop_newest
  queue of one, so it shows drops once frames come faster than it can take them.
- ``async``: a coroutine on a shared event loop (``async for frame in subscription``).
- ``sampler``: no subscription; every ``interval`` it takes
  ``latest_visual_frames(ttl)``, as the Go server does before each LLM call.

Latency is the consumer's clock at receive minus the instant of the store: the frame's
``received_at`` (the session's clock then), or, for a session on video time whose
``received_at`` is the stream's pts, the wall-clock instant the producer noted for that
frame_seq (``stored_at``). Both clocks are ``time.monotonic`` unless one is injected.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import Session, Subscription, VisualFrame
from ._latency import LatencyHistogram

if TYPE_CHECKING:
    from ._streamtime import StreamClock

KINDS = ("fast", "slow", "async", "sampler")


@dataclass(frozen=True)
class SubscriberSpec:
    """What to run: the kind, its label in the tables, and its queue."""

    kind: str
    label: str
    buffer: int = 1
    policy: str = "drop_newest"
    work: float = 0.0


def plan(kinds: Sequence[str], *, buffer: int, slow_work: float) -> list[SubscriberSpec]:
    """Specs for ``kinds`` (repeats allowed; the second 'fast' is labelled 'fast#2')."""
    specs = []
    seen: dict[str, int] = {}
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"unknown subscriber {kind!r} (choose from {', '.join(KINDS)})")
        seen[kind] = seen.get(kind, 0) + 1
        label = kind if seen[kind] == 1 else f"{kind}#{seen[kind]}"
        if kind == "slow":
            specs.append(SubscriberSpec(kind, label, 1, "drop_newest", slow_work))
        elif kind == "sampler":
            specs.append(SubscriberSpec(kind, label, 0, "", 0.0))
        else:
            specs.append(SubscriberSpec(kind, label, buffer, "drop_oldest", 0.0))
    return specs


def stamp_matches(frame: VisualFrame) -> bool:
    """Synthetic frames of 8 bytes or more carry their frame_seq in their first 8 bytes
    (little-endian)."""
    return int.from_bytes(bytes(frame.data[:8]), "little") == frame.frame_seq


class Consumer:
    """Shared bookkeeping of the subscription consumers (fast, slow, async)."""

    def __init__(self, spec: SubscriberSpec, subscription: Subscription, *,
                 clock: Callable[[], float] = time.monotonic, verify_stamp: bool = False,
                 stored_at: Callable[[VisualFrame], float | None] | None = None) -> None:
        self.spec = spec
        self.subscription = subscription
        self.clock = clock
        self.stored_at = stored_at
        self.untimed = 0  # frames whose store instant was no longer known
        self.verify_stamp = verify_stamp
        self.latency = LatencyHistogram()
        self.received = 0
        self.integrity_errors = 0
        self.error: BaseException | None = None

    @property
    def label(self) -> str:
        return self.spec.label

    def on_frame(self, frame: VisualFrame) -> None:
        now = self.clock()
        stored = frame.received_at if self.stored_at is None else self.stored_at(frame)
        if stored is None:
            self.untimed += 1
        else:
            self.latency.record(now - stored)
        self.received += 1
        if self.verify_stamp and frame.data.nbytes >= 8 and not stamp_matches(frame):
            self.integrity_errors += 1

    def counters(self) -> dict[str, int]:
        sub = self.subscription
        return {"delivered": sub.delivered, "dropped": sub.dropped, "queued": sub.qsize()}


class ThreadConsumer(Consumer):
    """Takes frames on its own thread until the subscription is closed and drained."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.thread = threading.Thread(target=self._run, name=f"consumer-{self.label}", daemon=True)

    def _run(self) -> None:
        work = self.spec.work
        try:
            for frame in self.subscription:
                self.on_frame(frame)
                if work:
                    time.sleep(work)  # the simulated per-frame work that makes it slow
        except BaseException as exc:  # reported in the summary instead of killing the run
            self.error = exc

    def start(self) -> None:
        self.thread.start()

    def join(self, timeout: float | None = None) -> None:
        self.thread.join(timeout)


class AsyncConsumer(Consumer):
    """``async for frame in subscription`` on an event loop shared by all async consumers."""

    async def run(self) -> None:
        work = self.spec.work
        try:
            async for frame in self.subscription:
                self.on_frame(frame)
                if work:
                    await asyncio.sleep(work)
        except BaseException as exc:
            self.error = exc


class AsyncLoop:
    """One thread running one event loop with every async consumer of the run."""

    def __init__(self, consumers: Sequence[AsyncConsumer]) -> None:
        self.consumers = list(consumers)
        self.thread = threading.Thread(target=self._run, name="consumer-asyncio", daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            await asyncio.gather(*(c.run() for c in self.consumers))

        asyncio.run(main())

    def start(self) -> None:
        if self.consumers:
            self.thread.start()

    def join(self, timeout: float | None = None) -> None:
        if self.thread.is_alive():
            self.thread.join(timeout)


class VisionSampler:
    """Every ``interval`` seconds, ``latest_visual_frames(ttl)`` like the Go server's LLM call.

    It records how many frames each call returned and the age of the newest one (how
    stale the picture the model would see is), and counts any call that broke the
    contract: a frame older than ``ttl``, or frames not oldest first.
    """

    def __init__(self, spec: SubscriberSpec, session: Session, *, ttl: float, interval: float,
                 clock: Callable[[], float] = time.monotonic, stream_clock: StreamClock | None = None) -> None:
        self.spec = spec
        self.session = session
        self.ttl = ttl
        self.interval = interval
        self.clock = clock
        # Set (a StreamClock): the session is on video time, and the sampler calls at
        # every ``interval`` seconds of video, however fast the video is read.
        self.stream_clock = stream_clock
        if stream_clock is not None:
            # Before any thread starts, so the producer cannot pass the first call.
            stream_clock.expect(self, stream_clock.origin + interval)
        self.latency = LatencyHistogram()  # age of the newest frame per call
        self.calls = 0
        self.frames = 0
        self.empty_calls = 0
        self.violations = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"sampler-{spec.label}", daemon=True)

    @property
    def label(self) -> str:
        return self.spec.label

    def sample(self, now: float | None = None) -> list[VisualFrame]:
        """One call, as the LLM pipeline would make it; returns the frames."""
        now = self.clock() if now is None else now
        frames = self.session.latest_visual_frames(self.ttl, now)
        self.calls += 1
        self.frames += len(frames)
        if not frames:
            self.empty_calls += 1
            return frames
        stamps = [f.received_at for f in frames]
        # The ring compares in whole ns; allow that rounding at the inclusive boundary.
        if stamps != sorted(stamps) or now - stamps[0] > self.ttl + 1e-6:
            self.violations += 1
        self.latency.record(now - stamps[-1])
        return frames

    def _run(self) -> None:
        try:
            if self.stream_clock is None:
                while not self._stop.wait(self.interval):
                    self.sample()
                return
            clock, calls = self.stream_clock, 0
            try:
                while True:
                    calls += 1
                    due = clock.origin + calls * self.interval
                    clock.expect(self, due)
                    if not clock.wait_until(due, self._stop):
                        return
                    self.sample(due)
            finally:
                clock.forget(self)
        except BaseException as exc:
            self.error = exc

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self.stream_clock is not None:
            self.stream_clock.wake()

    def join(self, timeout: float | None = None) -> None:
        if self.thread.is_alive():
            self.thread.join(timeout)
