"""Memory is bounded on every backend: flat in steady state, and given back once frames
get smaller."""

from __future__ import annotations

import gc
import os
import threading
import tracemalloc

import numpy as np
import pytest

from capsule_sessions import Session
from support import FakeClock, payload

pytestmark = pytest.mark.usefixtures("deadlock_watchdog")

MB = 1 << 20
UNDER_ASAN = "libasan" in os.environ.get("LD_PRELOAD", "")  # make sanitize


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Drainer(threading.Thread):
    """Reads a subscription until it closes; ``settled`` waits until it holds no frame."""

    def __init__(self, sub):
        super().__init__(daemon=True)
        self.sub = sub
        self.done = 0
        self.cond = threading.Condition()
        self.error = None

    def run(self):
        try:
            for frame in self.sub:
                if frame.data.nbytes != MB:
                    raise AssertionError("a drained frame has the wrong size")
                del frame
                with self.cond:
                    self.done += 1
                    self.cond.notify_all()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def settled(self, accepted: int, timeout: float = 60.0) -> None:
        # every frame offered was either dropped or read and let go of
        with self.cond:
            ok = self.cond.wait_for(lambda: self.sub.dropped + self.done == accepted, timeout)
        assert ok, f"drainer stuck: dropped={self.sub.dropped} done={self.done} accepted={accepted}"


@pytest.mark.parametrize("stores", [100_000])
def test_memory_is_flat_in_steady_state(backend, stores):
    """100,000 stores of 1 MiB frames (max_recent=2) with 2 subscribers drained by threads.

    Measured with every subscriber drained and nothing held by the test, at an early
    checkpoint (after 10% of the stores, past warm-up) and at the end. Tolerances: RSS
    may grow by at most 16 MiB (allocator slack, thread stacks; a leak of one frame per
    store would be ~90 GiB), and tracemalloc's traced Python memory by at most 1 MiB
    (a leaked frame object or view per store would be several MiB). Under AddressSanitizer
    (``make sanitize``) only the tracemalloc bound is checked.
    """
    session = Session("mem", clock=FakeClock(), backend=backend)
    frame = np.random.default_rng(1).integers(0, 256, MB, dtype=np.uint8)
    subs = [session.subscribe_visual_frames(4), session.subscribe_visual_frames(4, policy="drop_oldest")]
    drainers = [_Drainer(sub) for sub in subs]
    for d in drainers:
        d.start()
    checkpoint = stores // 10
    tracemalloc.start()
    try:
        readings = []
        for i in range(stores):
            session.store_frame(frame, source="cam", max_recent=2, frame_seq=i)
            if i + 1 in (checkpoint, stores):
                accepted = session.visual_stats()["accepted"]
                for d in drainers:
                    d.settled(accepted)
                gc.collect()
                readings.append((_rss_bytes(), tracemalloc.get_traced_memory()[0]))
    finally:
        tracemalloc.stop()
        for sub in subs:
            sub.close()
        for d in drainers:
            d.join(60)
    assert not any(d.is_alive() for d in drainers)
    for d in drainers:
        if d.error is not None:
            raise d.error
    stats = session.visual_stats()
    assert stats["accepted"] == stores and stats["frames"] == 2 and stats["bytes"] == 2 * MB
    for sub in subs:
        assert sub.delivered + sub.dropped == stores
    (rss_early, traced_early), (rss_end, traced_end) = readings
    if not UNDER_ASAN:  # ASan's quarantine keeps freed blocks resident on purpose
        assert rss_end - rss_early <= 16 * MB, f"RSS grew by {(rss_end - rss_early) / MB:.1f} MiB"
    assert traced_end - traced_early <= 1 * MB, f"traced memory grew by {(traced_end - traced_early) / MB:.2f} MiB"


@pytest.mark.skipif(UNDER_ASAN, reason="ASan's allocator keeps freed memory quarantined, so RSS says nothing")
def test_memory_shrinks_back_when_frames_get_smaller(backend):
    """Buffers grow for large frames and are released once frames get smaller (the ring's
    documented size policy): after 32 MiB frames, then small ones, RSS is back within
    16 MiB of where it started, with frames that readers held now released too."""
    session = Session("shrink", clock=FakeClock(), backend=backend)
    big = np.random.default_rng(2).integers(0, 256, 32 * MB, dtype=np.uint8)
    sub = session.subscribe_visual_frames(2, policy="drop_oldest")
    gc.collect()
    before = _rss_bytes()
    for seq in range(6):
        session.store_frame(big, source="cam", max_recent=2, frame_seq=seq)
        held = sub.get_nowait()  # a reader holding a frame forces fresh buffers
    grown = _rss_bytes()
    assert grown - before > 64 * MB  # the big frames really were resident
    del held
    while sub.qsize():
        sub.get_nowait()
    for seq in range(6, 40):
        session.store_frame(payload(seq, 4096), source="cam", max_recent=2, frame_seq=seq)
        sub.get_nowait()
    gc.collect()
    after = _rss_bytes()
    assert after - before < 16 * MB, f"RSS {before / MB:.0f} -> {grown / MB:.0f} -> {after / MB:.0f} MiB"
    assert session.visual_stats()["bytes"] == 2 * 4096
