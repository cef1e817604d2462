"""Visual input: the ring, rate limiting, sources, TTL, buffer input of any layout (up to
64 dimensions, suboffsets), frame immutability and visual_stats."""

from __future__ import annotations

import array
import copy
import datetime as dt
import math
import pickle

import numpy as np
import pytest

from capsule_sessions import VisualFrame
from support import assert_handed_out, payload

try:
    import _testbuffer  # CPython's maker of PIL-style buffers and of buffers of 65+ dimensions
except ImportError:  # a CPython built without its test modules
    _testbuffer = None
needs_testbuffer = pytest.mark.skipif(_testbuffer is None, reason="CPython's _testbuffer makes the odd buffers")

# Every test here runs on a shared session too (tests/conftest.py).
ALSO_SHARED = True


def store(s, data=b"frame", *, source="cam", max_recent=4, min_interval=0.0, now=None, **fields):
    return s.store_frame(data, source=source, max_recent=max_recent, min_interval=min_interval, now=now, **fields)


def seqs(frames):
    return [f.frame_seq for f in frames]


def latest(s, now=None):
    return s.latest_visual_frames(math.inf, now=now)


# -- the ring ----------------------------------------------------------------------


@pytest.mark.parametrize("max_recent", [0, -1, -(2**40)])
def test_max_recent_not_positive_counts_as_one(session, max_recent):
    for seq in range(3):
        assert store(session, payload(seq), max_recent=max_recent, frame_seq=seq) is True
    assert seqs(latest(session)) == [2]


def test_keeps_newest_max_recent_oldest_first(session):
    for seq in range(6):
        store(session, payload(seq), max_recent=3, frame_seq=seq)
    assert seqs(latest(session)) == [3, 4, 5]
    assert session.visual_stats()["frames"] == 3


def test_smaller_max_recent_trims_on_next_store(session):
    for seq in range(4):
        store(session, payload(seq), max_recent=8, frame_seq=seq)
    store(session, payload(4), max_recent=2, frame_seq=4)
    assert seqs(latest(session)) == [3, 4]
    stats = session.visual_stats()
    assert stats["frames"] == 2 and stats["bytes"] == len(payload(3)) + len(payload(4))


def test_huge_max_recent_is_harmless(session):
    for seq in range(3):
        store(session, payload(seq), max_recent=2**62, frame_seq=seq)
    assert seqs(latest(session)) == [0, 1, 2]


def test_store_keeps_every_field_and_sets_received_at(session, clock):
    clock.set(77.25)
    assert store(session, b"\x01\x02", source="screen", mime_type="image/png", width=640, height=480,
                 timestamp_ms=-(2**63), frame_seq=2**63 - 1) is True
    [f] = latest(session)
    assert (f.source, f.mime_type, f.width, f.height, f.timestamp_ms, f.frame_seq, f.received_at) == (
        "screen", "image/png", 640, 480, -(2**63), 2**63 - 1, 77.25)
    assert bytes(f.data) == b"\x01\x02"
    assert_handed_out(f)


def test_width_and_height_come_from_an_image_array(session, clock):
    rgb = np.zeros((360, 640, 3), np.uint8)
    session.store_frame(rgb, source="cam", max_recent=4)
    clock.advance(0.001)
    session.store_frame(rgb[:, :320], source="cam", max_recent=4, width=100)  # given wins
    clock.advance(0.001)
    session.store_frame(np.zeros((4, 5), np.uint16), source="cam", max_recent=4)
    clock.advance(0.001)
    session.store_frame(np.zeros(12, np.uint8), source="cam", max_recent=4)  # 1-D: no shape to read
    sizes = [(f.width, f.height) for f in session.latest_visual_frames(10)]
    assert sizes == [(640, 360), (100, 360), (5, 4), (0, 0)]


def test_negative_width_or_height_is_a_value_error(session):
    for name in ("width", "height"):
        with pytest.raises(ValueError, match=name):
            session.store_frame(b"x", source="cam", max_recent=2, **{name: -3})
    assert session.visual_stats()["accepted"] == 0


def test_explicit_now_sets_received_at(session):
    store(session, now=12.5)
    assert latest(session, now=12.5)[0].received_at == 12.5


def test_store_visual_frame_stores_a_copy_and_leaves_the_callers_frame(session, clock):
    buf = bytearray(b"abcdef")
    frame = VisualFrame(buf, "image/jpeg", 2, 3, "cam", 99, 7)
    assert session.store_visual_frame(frame, 2, 0.0) is True
    buf[:] = b"XXXXXX"
    [got] = latest(session)
    assert bytes(got.data) == b"abcdef"
    assert got == VisualFrame(b"abcdef", "image/jpeg", 2, 3, "cam", 99, 7, clock())
    assert got is not frame and frame.received_at == 0.0 and frame.data is buf


def test_store_visual_frame_positional_and_defaults(session):
    assert session.store_visual_frame(VisualFrame(b"a", source="c"), 1) is True
    assert session.store_visual_frame(VisualFrame(b"b", source="c"), 1, 10.0) is False
    assert session.store_visual_frame(VisualFrame(b"c", source="c"), 1, 10.0, session.created_at + 10) is True


def test_store_touches_the_session(session, clock):
    clock.advance(3)
    store(session)
    assert session.last_active_at == clock()
    store(session, now=5000.0)
    assert session.last_active_at == 5000.0


def test_empty_frame_is_stored(session):
    assert store(session, b"") is True
    [f] = latest(session)
    assert f.data.shape == (0,)
    assert_handed_out(f)
    assert session.visual_stats()["bytes"] == 0 and session.visual_stats()["frames"] == 1


def test_ring_refuses_to_be_copied_or_pickled(session):
    for duplicate in (copy.copy, pickle.dumps):
        with pytest.raises(TypeError, match="cannot pickle or copy"):
            duplicate(session._ring)


# -- rate limiting -----------------------------------------------------------------


def test_rate_limit_measures_from_last_accepted_frame(session):
    assert store(session, now=10.0, min_interval=1.0) is True
    assert store(session, now=10.6, min_interval=1.0) is False
    assert store(session, now=11.0, min_interval=1.0) is True  # exactly min_interval: accepted
    # 11.5 is 0.9 s after the rejected 10.6 attempt, which must not count
    assert store(session, now=11.5, min_interval=1.0) is False
    assert store(session, now=11.999, min_interval=1.0) is False
    assert store(session, now=12.0, min_interval=1.0) is True
    assert session.visual_stats()["accepted"] == 3 and session.visual_stats()["rate_limited"] == 3


def test_first_frame_is_never_rate_limited(session):
    assert store(session, now=0.0, min_interval=math.inf) is True


def test_zero_is_a_valid_instant_for_the_limiter(session):
    # Go's zero time means "never"; here 0.0 is an ordinary instant.
    assert store(session, now=0.0, min_interval=1.0) is True
    assert store(session, now=0.5, min_interval=1.0) is False
    assert store(session, now=1.0, min_interval=1.0) is True
    assert store(session, now=-5.0, min_interval=0.0) is True
    assert latest(session, now=-5.0)[-1].received_at == -5.0


def test_min_interval_zero_or_negative_disables_the_limiter(session):
    for i, interval in enumerate([0.0, -1.0, 0, dt.timedelta(seconds=-3)]):
        assert store(session, now=1.0, min_interval=interval, frame_seq=i) is True
    assert session.visual_stats()["accepted"] == 4


def test_min_interval_accepts_timedelta(session):
    assert store(session, now=1.0, min_interval=dt.timedelta(milliseconds=500)) is True
    assert store(session, now=1.4, min_interval=dt.timedelta(milliseconds=500)) is False
    assert store(session, now=1.5, min_interval=dt.timedelta(milliseconds=500)) is True


def test_min_interval_is_per_call(session):
    assert store(session, now=1.0) is True
    assert store(session, now=1.1, min_interval=1.0) is False
    assert store(session, now=1.1, min_interval=0.05) is True


def test_clock_going_backwards(session):
    assert store(session, now=10.0, min_interval=1.0) is True
    assert store(session, now=5.0, min_interval=1.0) is False  # negative elapsed < min_interval
    assert store(session, now=5.0, min_interval=0.0) is True
    assert store(session, now=5.9, min_interval=1.0) is False  # measured from the 5.0 frame
    assert store(session, now=6.0, min_interval=1.0) is True


def test_rate_limit_uses_the_clock_when_now_is_none(session, clock):
    assert store(session, min_interval=1.0) is True
    clock.advance(0.5)
    assert store(session, min_interval=1.0) is False
    clock.advance(0.5)
    assert store(session, min_interval=1.0) is True


def test_rejected_frame_changes_nothing(session, clock):
    store(session, payload(1), now=10.0, min_interval=1.0, frame_seq=1)
    before_frames = latest(session, now=10.0)
    before_active = session.last_active_at
    assert store(session, payload(2), source="other", now=10.5, min_interval=1.0, frame_seq=2) is False
    # the rate check comes before the source switch (Go): the ring still holds frame 1
    assert latest(session, now=10.5) == before_frames
    assert session.last_active_at == before_active
    assert session.visual_stats() == {"accepted": 1, "rate_limited": 1, "source_resets": 0,
                                      "frames": 1, "bytes": len(payload(1))}


def test_limiter_survives_a_source_switch_in_store(session):
    # Go's StoreVisualFrame resets the frames on a new source, but not LastAcceptedAt.
    assert store(session, source="a", now=1.0, min_interval=1.0) is True
    assert store(session, source="b", now=2.0, min_interval=1.0) is True
    assert store(session, source="a", now=2.5, min_interval=1.0) is False


# -- sources -----------------------------------------------------------------------


def test_frame_from_another_source_resets_the_ring(session):
    store(session, payload(1), source="a", frame_seq=1)
    store(session, payload(2), source="a", frame_seq=2)
    store(session, payload(3), source="b", frame_seq=3)
    assert seqs(latest(session)) == [3]
    assert [f.source for f in latest(session)] == ["b"]
    store(session, payload(4), source="a", frame_seq=4)
    assert seqs(latest(session)) == [4]
    stats = session.visual_stats()
    assert stats["source_resets"] == 2 and stats["accepted"] == 4 and stats["frames"] == 1


def test_empty_source_frames_then_a_named_source(session):
    store(session, payload(1), source="", frame_seq=1)
    store(session, payload(2), source="", frame_seq=2)
    assert seqs(latest(session)) == [1, 2]
    store(session, payload(3), source="cam", frame_seq=3)
    assert seqs(latest(session)) == [3]


def test_start_with_a_different_source_clears_ring_and_limiter(session):
    store(session, source="a", now=1.0, min_interval=10.0)
    session.start_visual_input("b", now=1.1)
    assert latest(session, now=1.1) == []
    assert session.visual_stats()["frames"] == 0 and session.visual_stats()["bytes"] == 0
    assert store(session, source="b", now=1.2, min_interval=10.0) is True


def test_start_with_the_same_source_keeps_ring_and_limiter(session):
    store(session, payload(1), source="a", now=1.0, min_interval=10.0, frame_seq=1)
    session.start_visual_input("a", now=1.1)
    assert seqs(latest(session, now=1.1)) == [1]
    assert store(session, source="a", now=1.2, min_interval=10.0) is False


def test_start_on_a_fresh_session_then_store(session):
    session.start_visual_input("cam")
    store(session, payload(1), source="cam", frame_seq=1)
    store(session, payload(2), source="cam", frame_seq=2)
    assert seqs(latest(session)) == [1, 2]
    assert session.visual_stats()["source_resets"] == 0


def test_start_then_frame_from_another_source_resets(session):
    session.start_visual_input("cam")
    store(session, payload(1), source="screen", frame_seq=1)
    assert seqs(latest(session)) == [1]
    assert session.visual_stats()["source_resets"] == 1


def test_start_and_stop_touch(session, clock):
    clock.advance(1)
    session.start_visual_input("a")
    assert session.last_active_at == clock()
    clock.advance(1)
    session.stop_visual_input("zzz")  # a no-op on the frames, but Go still touches
    assert session.last_active_at == clock()


def _filled(session):
    store(session, payload(1), source="cam", now=1.0, min_interval=5.0, frame_seq=1)
    store(session, payload(2), source="cam", now=6.0, min_interval=5.0, frame_seq=2)
    assert len(latest(session, now=6.0)) == 2


@pytest.mark.parametrize("stop_with", ["", "cam"], ids=["empty-source", "active-source"])
def test_stop_clears_everything(session, stop_with):
    _filled(session)
    session.stop_visual_input(stop_with, now=6.5)
    assert latest(session, now=6.5) == []
    assert session.visual_stats()["frames"] == 0 and session.visual_stats()["bytes"] == 0
    # the limiter is cleared too: 0.5 s after the last frame is accepted
    assert store(session, source="cam", now=6.5, min_interval=5.0) is True


def test_stop_default_source_clears(session):
    _filled(session)
    session.stop_visual_input()
    assert latest(session, now=6.0) == []


def test_stop_with_no_active_source_clears(session):
    # frames stored with source "" leave no source active: any stop clears
    store(session, payload(1), source="", now=1.0, min_interval=5.0, frame_seq=1)
    session.stop_visual_input("other", now=1.5)
    assert latest(session, now=1.5) == []
    assert store(session, source="", now=1.6, min_interval=5.0) is True


def test_stop_with_another_source_changes_nothing(session):
    _filled(session)
    session.stop_visual_input("screen", now=6.5)
    assert seqs(latest(session, now=6.5)) == [1, 2]
    assert store(session, source="cam", now=6.5, min_interval=5.0) is False  # limiter kept
    # the active source is still "cam": its frames do not reset the ring
    assert store(session, payload(3), source="cam", now=11.0, min_interval=5.0, frame_seq=3) is True
    assert seqs(latest(session, now=11.0)) == [1, 2, 3]


def test_stop_clears_the_active_source(session):
    _filled(session)
    resets = session.visual_stats()["source_resets"]
    session.stop_visual_input("cam")
    store(session, payload(3), source="screen", frame_seq=3)
    # after stop no source was active, so this is a fresh start, not a switch
    assert session.visual_stats()["source_resets"] == resets


def test_stop_on_a_fresh_session_is_harmless(session):
    session.stop_visual_input()
    session.stop_visual_input("x")
    assert latest(session) == []


# -- TTL ---------------------------------------------------------------------------


def test_ttl_is_inclusive_at_the_boundary(session):
    store(session, payload(1), now=10.0, frame_seq=1)
    store(session, payload(2), now=11.0, frame_seq=2)
    assert seqs(session.latest_visual_frames(1.0, now=12.0)) == [2]
    assert seqs(session.latest_visual_frames(2.0, now=12.0)) == [1, 2]
    assert seqs(session.latest_visual_frames(0.5, now=11.5)) == [2]
    assert seqs(session.latest_visual_frames(0.499, now=11.5)) == []
    assert seqs(session.latest_visual_frames(dt.timedelta(seconds=1), now=12.0)) == [2]


@pytest.mark.parametrize("ttl", [0, 0.0, -1.0, -math.inf, dt.timedelta(0), dt.timedelta(seconds=-1)])
def test_ttl_not_positive_is_empty(session, ttl):
    store(session, now=10.0)
    assert session.latest_visual_frames(ttl, now=10.0) == []


def test_ttl_with_clock_default(session, clock):
    store(session)
    clock.advance(5)
    assert len(session.latest_visual_frames(5.0)) == 1
    clock.advance(0.01)
    assert session.latest_visual_frames(5.0) == []


def test_frames_from_the_future_are_returned(session):
    # Go: now.Sub(received) is negative, which is <= ttl
    store(session, now=100.0)
    assert len(session.latest_visual_frames(1.0, now=50.0)) == 1


def test_ttl_inf_returns_all(session):
    store(session, now=-1e9)
    assert len(session.latest_visual_frames(math.inf, now=1e9)) == 1


def test_latest_returns_a_new_list(session):
    store(session)
    first = latest(session)
    first.clear()
    assert len(latest(session)) == 1


# -- buffer input and frame immutability ---------------------------------------------

_BASE = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)


@pytest.mark.parametrize(
    "data",
    [
        b"\x00\x01\x02\xff",
        bytearray(b"\x10\x20\x30"),
        memoryview(b"abcdefgh")[2:6],
        memoryview(b"abcdefgh")[::2],
        array.array("d", [1.5, -2.25]),
        _BASE,
        _BASE[:, ::2, :],
        _BASE[::-1],
        np.asfortranarray(_BASE),
        _BASE.transpose(2, 0, 1),
        np.arange(10, dtype=np.float64)[::3],
        np.arange(12, dtype=">u4").reshape(3, 4)[:, 1:3],
        np.array([[True, False], [False, True]]),
        np.array([1 + 2j, 3 - 4j], dtype=np.complex64),
        np.zeros(3, dtype=[("a", "<i4"), ("b", "<f8")]),
        np.float64(3.25),
        np.array(7, dtype=np.int16),
        np.empty((0, 5), dtype=np.uint8),
        np.broadcast_to(np.arange(3, dtype=np.uint8), (4, 3)),
    ],
    ids=["bytes", "bytearray", "memoryview-slice", "memoryview-strided", "array.array", "ndarray-3d",
         "ndarray-strided", "ndarray-reversed", "fortran", "transposed", "float64-strided", "bigendian-2d",
         "bool", "complex64", "structured", "numpy-scalar", "0-d", "empty-2d", "broadcast-zero-stride"],
)
def test_any_buffer_input_stores_its_c_order_bytes(session, data):
    expected = np.asarray(data).tobytes()
    assert store(session, data) is True
    [f] = latest(session)
    assert_handed_out(f)
    assert f.data.tobytes() == expected
    assert f.data.shape == (len(expected),)
    assert session.visual_stats()["bytes"] == len(expected)


@needs_testbuffer
def test_more_than_64_dimensions_is_the_same_type_error_on_both(session, clock):
    strided = _testbuffer.ndarray(list(range(4)), shape=[2] + [1] * 65, strides=[2] + [1] * 65, format="B")
    contiguous = _testbuffer.ndarray([7], shape=[1] * 66, format="B")
    for data in (strided, contiguous):
        with pytest.raises(TypeError, match="number of dimensions must not exceed 64"):
            session.store_frame(data, source="cam", max_recent=2)
    assert session.visual_stats()["accepted"] == 0
    # The refusal comes after the rate check, on both twins alike.
    assert session.store_frame(b"ok", source="cam", max_recent=2, min_interval=1.0)
    assert session.store_frame(strided, source="cam", max_recent=2, min_interval=1.0) is False


@needs_testbuffer
@pytest.mark.parametrize("ndim", [1, 2, 3, 64])
def test_buffers_with_suboffsets_are_gathered(session, ndim):
    shape = [3, 4] + [1] * (ndim - 2) if ndim >= 2 else [5]
    items = list(range(int(np.prod(shape))))
    pil = _testbuffer.ndarray(items, shape=shape, format="B", flags=_testbuffer.ND_PIL)
    assert memoryview(pil).suboffsets  # the buffer really is PIL-style
    assert session.store_frame(pil, source="cam", max_recent=2)
    assert bytes(session.latest_visual_frames(10)[0].data) == bytes(items)


@needs_testbuffer
def test_non_contiguous_suboffset_buffer(session):
    pil = _testbuffer.ndarray(list(range(24)), shape=[4, 6], format="B", flags=_testbuffer.ND_PIL)
    view = pil[::2, ::-3]
    assert session.store_frame(view, source="cam", max_recent=2)
    assert bytes(session.latest_visual_frames(10)[0].data) == memoryview(view).tobytes()


def test_later_changes_to_the_input_buffer_do_not_reach_stored_frames(session):
    src = np.zeros(16, dtype=np.uint8)
    store(session, src)
    src[:] = 7
    assert latest(session)[0].data.tobytes() == bytes(16)


def test_handed_out_data_is_read_only(session):
    store(session, b"abcd")
    [f] = latest(session)
    with pytest.raises(ValueError):
        f.data[0] = 1
    # the flag cannot be flipped back either: nobody may write into a shared frame
    with pytest.raises(ValueError):
        f.data.flags.writeable = True
    with pytest.raises(TypeError):
        memoryview(f.data)[0] = 1
    assert bytes(latest(session)[0].data) == b"abcd"


def test_frame_fields_cannot_be_assigned_or_deleted(session):
    session.store_frame(b"abc", source="cam", max_recent=2, width=3, height=1)
    frame = session.latest_visual_frames(10)[0]
    for name in ("data", "source", "width", "received_at"):
        with pytest.raises(AttributeError, match="immutable"):
            setattr(frame, name, None)
        with pytest.raises(AttributeError, match="immutable"):
            delattr(frame, name)
    assert bytes(frame.data) == b"abc" and frame.width == 3


def test_frames_are_shared_between_readers(session):
    sub_a = session.subscribe_visual_frames(4)
    sub_b = session.subscribe_visual_frames(4, policy="drop_oldest")
    store(session, payload(5, 4096), frame_seq=5)
    one, two = latest(session)[0], latest(session)[0]
    a, b = sub_a.get_nowait(), sub_b.get_nowait()
    for other in (two, a, b):
        assert other == one
        assert np.shares_memory(one.data, other.data)


# -- visual_stats ------------------------------------------------------------------


def test_visual_stats_fresh(session):
    assert session.visual_stats() == {"accepted": 0, "rate_limited": 0, "source_resets": 0, "frames": 0, "bytes": 0}


def test_visual_stats_counts(session):
    store(session, b"x" * 10, source="a", now=1.0, min_interval=1.0)
    store(session, b"x" * 20, source="a", now=1.5, min_interval=1.0)  # rate-limited
    store(session, b"x" * 30, source="a", now=2.0, min_interval=1.0)
    store(session, b"x" * 40, source="b", now=3.0, min_interval=1.0)  # reset
    store(session, b"x" * 50, source="b", now=3.1, min_interval=1.0)  # rate-limited
    store(session, b"x" * 60, source="b", now=4.0, min_interval=1.0)
    stats = session.visual_stats()
    assert stats == {"accepted": 4, "rate_limited": 2, "source_resets": 1, "frames": 2, "bytes": 100}
    assert all(type(v) is int for v in stats.values())
    session.stop_visual_input()
    assert session.visual_stats() == {"accepted": 4, "rate_limited": 2, "source_resets": 1, "frames": 0, "bytes": 0}


def test_visual_stats_is_a_fresh_dict(session):
    stats = session.visual_stats()
    stats["accepted"] = 99
    assert session.visual_stats()["accepted"] == 0
