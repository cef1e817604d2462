"""What the compiled backend promises beyond the shared contract, plus two memory
properties checked on every backend.

- The GIL is released during the copy of a large frame (Cython only).
- Frames, and views derived from them, that readers hold stay byte-identical across
  1,000 later stores of other sizes (every backend; the Cython ring reuses buffers, so
  this is where it could go wrong).
- Memory is bounded in steady state (every backend).
"""

from __future__ import annotations

import faulthandler
import gc
import os
import threading
import tracemalloc

import numpy as np
import pytest

from capsule_sessions import Session, _backend, available_backends
from support import FakeClock, payload

needs_cython = pytest.mark.skipif(
    "cython" not in available_backends(),
    reason=f"the Cython backend is not available here: {_backend._cython_import_error}",
)

MB = 1 << 20
UNDER_ASAN = "libasan" in os.environ.get("LD_PRELOAD", "")  # make sanitize


@pytest.fixture(autouse=True)
def deadlock_watchdog():
    """A hang with the GIL held would also stop pytest-timeout; faulthandler's C watchdog
    still dumps every thread's stack and ends the run."""
    faulthandler.dump_traceback_later(240.0, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


# -- the GIL --------------------------------------------------------------------------


@needs_cython
@pytest.mark.cython
def test_gil_is_released_while_a_64mb_frame_is_copied():
    """Another Python thread makes progress *during* the copy, shown by the copied bytes.

    The other thread counts up and writes its counter into two words of the source
    buffer 62 MiB apart: first word A, then word B. A copy made while no Python code
    runs (the GIL held) sees a single instant, in which B == A or B == A - 1. Any other
    pair in the stored frame means the counter thread wrote between the copy reading
    one word and reading the other, i.e. it ran during the copy, whatever order the
    copy goes in. No clock or timing threshold is involved. (With the pure backend,
    whose copy holds the GIL, every stored pair is consistent.)
    """
    source = np.zeros(64 * MB, dtype=np.uint8)
    words = source.view(np.uint64)
    first, second = MB // 8, len(words) - MB // 8
    stop = threading.Event()
    progress = [0]

    def count():
        i = 0
        while not stop.is_set():
            i += 1
            words[first] = i
            words[second] = i
        progress[0] = i

    session = Session("gil", clock=FakeClock(), backend="cython")
    counter = threading.Thread(target=count, daemon=True)
    counter.start()
    overlaps = 0
    try:
        for _ in range(30):
            assert session.store_frame(source, source="cam", max_recent=1)
            [frame] = session.latest_visual_frames(10.0)
            stored = frame.data.view(np.uint64)
            a, b = int(stored[first]), int(stored[second])
            if not a - 1 <= b <= a:
                overlaps += 1
                if overlaps >= 2:
                    break
    finally:
        stop.set()
        counter.join(30)
    assert not counter.is_alive()
    assert progress[0] > 0
    assert overlaps >= 2, "the counter thread never ran while a 64 MB frame was being copied"


# -- held frames never change ---------------------------------------------------------


def test_held_frames_and_views_survive_1000_later_stores(backend):
    session = Session("held", clock=FakeClock(), backend=backend)
    newest = session.subscribe_visual_frames(2)
    oldest = session.subscribe_visual_frames(2, policy="drop_oldest")
    rng = np.random.default_rng(7)
    held = []  # (expected bytes, something a reader kept)

    def size_of(seq):
        return int(rng.integers(0, 300_000)) if seq % 10 else 8

    for seq in range(1000):
        size = size_of(seq)
        expected = payload(seq, size)
        assert session.store_frame(np.frombuffer(expected, dtype=np.uint8), source="cam", max_recent=2,
                                   frame_seq=seq)
        if seq % 50 == 0:
            [*_, frame] = session.latest_visual_frames(10.0)
            held.append((expected, frame))  # the frame itself
            held.append((expected[3:size // 2], frame.data[3:size // 2]))  # only a slice of its data
            held.append((expected, frame.as_array()))  # only an as_array view
            held.append((expected, memoryview(frame.data)))  # only a memoryview
            del frame
        if seq % 97 == 0:
            for sub in (newest, oldest):
                while sub.qsize():
                    got = sub.get_nowait()
                    held.append((payload(got.frame_seq, len(got.data)), got))
        if seq % 250 == 0:
            gc.collect()  # let go of dropped readers' buffers so the ring may reuse them
    assert len(held) > 80
    for expected, kept in held:
        data = kept.data if hasattr(kept, "frame_seq") else kept
        assert bytes(data) == expected
    # frames delivered late (still queued now) are intact too
    for sub in (newest, oldest):
        sub.close()
        for frame in sub:
            assert bytes(frame.data) == payload(frame.frame_seq, len(frame.data))


# -- memory is bounded ----------------------------------------------------------------


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
