"""A frame a reader holds never changes: not when later stores reuse the ring's
buffers (the Cython ring does), not when its record was edited behind the API, not when
its array comes back from a weak reference while a store copies without the GIL; and
neither do views derived from it. On every backend."""

from __future__ import annotations

import gc
import math
import sys
import threading
import time
import weakref

import numpy as np
import pytest

from capsule_sessions import Session
from support import FakeClock, assert_handed_out, payload


def test_frames_never_change_after_later_stores(session):
    held = []
    for seq in range(300):
        size = (seq * 997) % 5000
        session.store_frame(payload(seq, size), source="a" if seq % 50 < 40 else "b", max_recent=1 + seq % 3,
                            min_interval=0.0, frame_seq=seq)
        if seq % 7 == 0:
            held.extend(session.latest_visual_frames(math.inf))
    for f in held:
        assert bytes(f.data) == payload(f.frame_seq, (f.frame_seq * 997) % 5000)
        assert_handed_out(f)


def test_a_record_edited_behind_the_api_changes_neither_the_ring_nor_a_held_array(make_session, clock):
    # object.__setattr__ is the one way past the immutability; the ring's books and the
    # bytes a reader holds must not depend on the record either way.
    session = make_session()
    session.store_frame(np.full(1 << 20, 1, np.uint8), source="cam", max_recent=1)
    frame = session.latest_visual_frames(10)[0]
    held = frame.data
    object.__setattr__(frame, "data", None)
    object.__setattr__(frame, "received_at", -1e9)
    del frame
    for value in (2, 3):
        clock.advance(0.001)
        assert session.store_frame(np.full(1 << 20, value, np.uint8), source="cam", max_recent=2)
    assert held.min() == held.max() == 1
    stats = session.visual_stats()
    assert (stats["frames"], stats["bytes"]) == (2, 2 << 20)
    assert [int(f.data[0]) for f in session.latest_visual_frames(10)] == [2, 3]


def test_an_array_resurrected_from_a_weak_reference_never_changes(make_session, clock):
    # The evicted frame's array stays alive until the store that evicts it is done; a
    # thread that turns a weak reference into a strong one while that store copies
    # without the GIL must hold bytes nothing writes again. The reader is released
    # just before the store and, with a long switch interval, first gets the GIL when
    # the store lets go of it for the copy.
    session = make_session()
    size = 16 << 20
    changed = []
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1.0)
    try:
        for value in range(6):
            session.store_frame(np.full(size, value, np.uint8), source="cam", max_recent=1)
            ref = weakref.ref(session.latest_visual_frames(10)[0].data)
            gate = threading.Lock()
            gate.acquire()
            grabbed = []

            def grab():
                with gate:
                    array = ref()
                    if array is not None:
                        grabbed.append(array)

            reader = threading.Thread(target=grab)
            reader.start()
            time.sleep(0.01)  # the reader is blocked on the gate
            clock.advance(0.001)
            data = np.full(size, value + 100, np.uint8)  # numpy may release the GIL: not after the gate
            gate.release()
            session.store_frame(data, source="cam", max_recent=1)
            reader.join()
            changed += [value for array in grabbed if not array.min() == array.max() == value]
            grabbed.clear()
    finally:
        sys.setswitchinterval(interval)
    assert changed == []


@pytest.mark.usefixtures("deadlock_watchdog")
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
