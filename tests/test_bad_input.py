"""Bad input: a clear TypeError/ValueError naming the argument, and a session that keeps working.

Each rejected call is made on a session that already holds a frame and has a
subscriber; afterwards nothing it holds or counts has changed, and a valid store and
read still work.
"""

from __future__ import annotations

import asyncio
import math
import queue

import numpy as np
import pytest

from capsule_sessions import ChatMessage, PipelineMode, Session, SessionManager, SessionState, VisualFrame
from support import FakeClock, assert_payload_matches, payload

GOOD = dict(source="cam", max_recent=4, min_interval=0.0, mime_type="", width=0, height=0, timestamp_ms=0,
            frame_seq=0, now=None)
HUGE = 10**400  # too big even for a float


def _store_kwargs(**bad):
    kwargs = dict(GOOD)
    kwargs.update(bad)
    return kwargs


# (argument named in the message, exception, keyword overrides of a valid store_frame call)
STORE_CASES = [
    ("data", TypeError, dict(data=object())),
    ("data", TypeError, dict(data="text is not a buffer")),
    ("data", TypeError, dict(data=12345)),
    ("data", TypeError, dict(data=None)),
    ("data", TypeError, dict(data=[1, 2, 3])),
    ("source", TypeError, dict(source=1)),
    ("source", TypeError, dict(source=None)),
    ("source", TypeError, dict(source=b"cam")),
    ("max_recent", TypeError, dict(max_recent="2")),
    ("max_recent", TypeError, dict(max_recent=2.0)),
    ("max_recent", TypeError, dict(max_recent=None)),
    ("max_recent", TypeError, dict(max_recent=True)),
    ("min_interval", TypeError, dict(min_interval="1")),
    ("min_interval", TypeError, dict(min_interval=None)),
    ("min_interval", TypeError, dict(min_interval=[1.0])),
    ("min_interval", ValueError, dict(min_interval=math.nan)),
    ("mime_type", TypeError, dict(mime_type=None)),
    ("mime_type", TypeError, dict(mime_type=5)),
    ("width", TypeError, dict(width=1.5)),
    ("width", TypeError, dict(width="3")),
    ("width", TypeError, dict(width=True)),
    ("width", ValueError, dict(width=2**31)),
    ("width", ValueError, dict(width=-(2**31) - 1)),
    ("width", ValueError, dict(width=HUGE)),
    ("height", TypeError, dict(height=None)),
    ("height", ValueError, dict(height=-(2**63))),
    ("timestamp_ms", ValueError, dict(timestamp_ms=2**63)),
    ("timestamp_ms", ValueError, dict(timestamp_ms=-(2**63) - 1)),
    ("timestamp_ms", TypeError, dict(timestamp_ms=1.0)),
    ("frame_seq", ValueError, dict(frame_seq=2**64)),
    ("frame_seq", ValueError, dict(frame_seq=-HUGE)),
    ("frame_seq", TypeError, dict(frame_seq="1")),
    ("now", TypeError, dict(now="x")),
    ("now", TypeError, dict(now=True)),
    ("now", TypeError, dict(now=np.array([1.0]))),
    ("now", ValueError, dict(now=math.nan)),
    ("now", ValueError, dict(now=math.inf)),
    ("now", ValueError, dict(now=-math.inf)),
    ("now", ValueError, dict(now=1e300)),
    ("now", ValueError, dict(now=HUGE)),
    ("now", ValueError, dict(now=-(2**70))),
]


@pytest.fixture
def busy(make_session):
    """A session holding frame 1 (stored at t=10) with one open subscriber."""
    s = make_session()
    sub = s.subscribe_visual_frames(8)
    assert s.store_frame(payload(1), source="cam", max_recent=4, frame_seq=1, now=10.0)
    return s, sub


def _snapshot(session, sub):
    return (session.visual_stats(), session.latest_visual_frames(math.inf, now=10.0), session.last_active_at,
            sub.qsize(), sub.dropped, sub.delivered, sub.closed)


def _still_works(session, sub, before):
    assert _snapshot(session, sub) == before, "a rejected call changed the session"
    assert session.store_frame(payload(2), source="cam", max_recent=4, frame_seq=2, now=11.0) is True
    frames = session.latest_visual_frames(math.inf, now=11.0)
    assert [f.frame_seq for f in frames] == [1, 2]
    for f in frames:
        assert_payload_matches(f)
    assert [sub.get_nowait().frame_seq for _ in range(2)] == [1, 2]
    stats = session.visual_stats()
    assert stats["accepted"] == before[0]["accepted"] + 1
    assert stats["rate_limited"] == before[0]["rate_limited"]


def _rejected(busy, error, name, call):
    session, sub = busy
    before = _snapshot(session, sub)
    with pytest.raises(error) as info:
        call(session, sub)
    assert name in str(info.value), f"message {str(info.value)!r} does not name {name!r}"
    _still_works(session, sub, before)


@pytest.mark.parametrize("name,error,bad", STORE_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(STORE_CASES)])
def test_store_frame_rejects(busy, name, error, bad):
    kwargs = _store_kwargs(**bad)
    data = kwargs.pop("data", payload(9))
    _rejected(busy, error, name, lambda s, _: s.store_frame(data, **kwargs))


def test_data_without_a_c_buffer_format(busy):
    # numpy cannot export datetime64 through the buffer protocol
    data = np.array(["2024-01-01"], dtype="datetime64[D]")
    _rejected(busy, (TypeError, ValueError), "data", lambda s, _: s.store_frame(data, source="cam", max_recent=1))


@pytest.mark.parametrize("missing", ["source", "max_recent"])
def test_store_frame_requires_its_keywords(busy, missing):
    kwargs = {"source": "cam", "max_recent": 1}
    del kwargs[missing]
    _rejected(busy, TypeError, missing, lambda s, _: s.store_frame(b"x", **kwargs))


FRAME_CASES = [
    ("frame", TypeError, lambda s: s.store_visual_frame("not a frame", 2)),
    ("frame", TypeError, lambda s: s.store_visual_frame(None, 2)),
    ("data", TypeError, lambda s: s.store_visual_frame(VisualFrame(None, source="cam"), 2)),
    ("data", TypeError, lambda s: s.store_visual_frame(VisualFrame(object(), source="cam"), 2)),
    ("width", TypeError, lambda s: s.store_visual_frame(VisualFrame(b"x", width="wide"), 2)),
    ("source", TypeError, lambda s: s.store_visual_frame(VisualFrame(b"x", source=None), 2)),
    ("mime_type", TypeError, lambda s: s.store_visual_frame(VisualFrame(b"x", mime_type=3), 2)),
    ("frame_seq", ValueError, lambda s: s.store_visual_frame(VisualFrame(b"x", frame_seq=2**64), 2)),
    ("max_recent", TypeError, lambda s: s.store_visual_frame(VisualFrame(b"x"), "2")),
    ("min_interval", ValueError, lambda s: s.store_visual_frame(VisualFrame(b"x"), 2, math.nan)),
    ("now", ValueError, lambda s: s.store_visual_frame(VisualFrame(b"x"), 2, 0.0, math.nan)),
    ("ttl", TypeError, lambda s: s.latest_visual_frames("10")),
    ("ttl", TypeError, lambda s: s.latest_visual_frames(None)),
    ("ttl", ValueError, lambda s: s.latest_visual_frames(math.nan)),
    ("now", TypeError, lambda s: s.latest_visual_frames(1.0, now="x")),
    ("now", ValueError, lambda s: s.latest_visual_frames(1.0, now=math.inf)),
    ("buffer", TypeError, lambda s: s.subscribe_visual_frames("1")),
    ("buffer", TypeError, lambda s: s.subscribe_visual_frames(1.5)),
    ("buffer", TypeError, lambda s: s.subscribe_visual_frames(None)),
    ("policy", ValueError, lambda s: s.subscribe_visual_frames(1, policy="drop")),
    ("policy", ValueError, lambda s: s.subscribe_visual_frames(1, policy="DROP_NEWEST")),
    ("policy", ValueError, lambda s: s.subscribe_visual_frames(1, policy="")),
    ("policy", TypeError, lambda s: s.subscribe_visual_frames(1, policy=None)),
    ("policy", TypeError, lambda s: s.subscribe_visual_frames(1, policy=1)),
    ("source", TypeError, lambda s: s.start_visual_input(1)),
    ("source", TypeError, lambda s: s.start_visual_input(None)),
    ("source", TypeError, lambda s: s.stop_visual_input(None)),
    ("now", ValueError, lambda s: s.start_visual_input("other", now=math.nan)),
    ("now", TypeError, lambda s: s.stop_visual_input("", now="later")),
    ("now", ValueError, lambda s: s.touch(now=math.nan)),
    ("state", ValueError, lambda s: s.set_state(9)),
    ("state", ValueError, lambda s: s.set_state("speaking")),
    ("owner_id", TypeError, lambda s: s.set_owner_id(7)),
    ("msg", TypeError, lambda s: s.add_message("hello")),
    ("msg", TypeError, lambda s: s.add_message({"role": "user", "content": "x"})),
    ("items", TypeError, lambda s: s.set_dialog_context([1])),
    ("items", TypeError, lambda s: s.set_dialog_context(5)),
    ("seq", TypeError, lambda s: s.mark_pipeline_finished("1")),
    ("seq", ValueError, lambda s: s.mark_pipeline_finished(HUGE)),
    ("timeout", ValueError, lambda s: s.wait_pipeline_done(-1)),
    ("timeout", ValueError, lambda s: s.wait_pipeline_done(math.nan)),
    ("timeout", TypeError, lambda s: s.wait_pipeline_done("1")),
]


@pytest.mark.parametrize("name,error,call", FRAME_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(FRAME_CASES)])
def test_session_method_rejects(busy, name, error, call):
    _rejected(busy, error, name, lambda s, _: call(s))


def test_rejected_calls_leave_history_and_state_alone(busy):
    session, _ = busy
    session.add_message(ChatMessage("user", "a"))
    session.set_state(SessionState.LISTENING)
    for bad in (lambda: session.add_message("x"), lambda: session.set_state(77),
                lambda: session.set_dialog_context([object()])):
        with pytest.raises((TypeError, ValueError)):
            bad()
    assert [m.content for m in session.history_snapshot()] == ["a"]
    assert session.state is SessionState.LISTENING
    assert session.dialog_context_snapshot() == []


SUB_CASES = [
    ("timeout", ValueError, lambda sub: sub.get(timeout=-1)),
    ("timeout", ValueError, lambda sub: sub.get(timeout=-math.inf)),
    ("timeout", ValueError, lambda sub: sub.get(timeout=math.nan)),
    ("timeout", TypeError, lambda sub: sub.get(timeout="1")),
    ("timeout", TypeError, lambda sub: sub.get(timeout=[1])),
    ("timeout", ValueError, lambda sub: asyncio.run(sub.aget(timeout=-1))),
    ("timeout", TypeError, lambda sub: asyncio.run(sub.aget(timeout="soon"))),
]


@pytest.mark.parametrize("name,error,call", SUB_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(SUB_CASES)])
def test_subscription_rejects_bad_timeouts(busy, name, error, call):
    _rejected(busy, error, name, lambda _, sub: call(sub))


def test_huge_timeouts_and_durations_are_clamped_not_errors(busy):
    session, sub = busy
    assert sub.get(timeout=HUGE).frame_seq == 1  # a frame is queued: no wait at all
    with pytest.raises(queue.Empty):
        sub.get(timeout=0)
    assert session.latest_visual_frames(HUGE, now=10.0)[0].frame_seq == 1
    assert session.latest_visual_frames(-HUGE, now=10.0) == []
    assert session.store_frame(b"x", source="cam", max_recent=HUGE, min_interval=HUGE, now=10.5) is False
    assert session.store_frame(b"x", source="cam", max_recent=-HUGE, min_interval=-HUGE, now=10.5) is True
    sub_b = session.subscribe_visual_frames(HUGE)
    sub_c = session.subscribe_visual_frames(-HUGE)
    assert sub_b.maxsize >= 2**31 - 1 and sub_c.maxsize == 1


# -- clocks ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [5, "time.monotonic", 1.0, object()])
def test_non_callable_clock(backend, bad):
    with pytest.raises(TypeError, match="clock"):
        Session("a", clock=bad, backend=backend)
    with pytest.raises(TypeError, match="clock"):
        SessionManager(1, clock=bad, cleanup_interval=None, backend=backend)


@pytest.mark.parametrize("reading,error", [("soon", TypeError), (None, TypeError), (math.nan, ValueError),
                                           (math.inf, ValueError), (HUGE, ValueError)],
                         ids=["str", "None", "nan", "inf", "huge-int"])
def test_clock_returning_garbage_at_construction(backend, reading, error):
    with pytest.raises(error, match="clock"):
        Session("a", clock=lambda: reading, backend=backend)


def test_clock_that_goes_bad_later(backend):
    clock = FakeClock(10.0)
    s = Session("a", clock=clock, backend=backend)
    sub = s.subscribe_visual_frames(8)
    assert s.store_frame(payload(1), source="cam", max_recent=4, frame_seq=1)
    before = _snapshot(s, sub)
    clock.set(math.nan)
    for call in (lambda: s.store_frame(b"x", source="cam", max_recent=4), lambda: s.latest_visual_frames(1.0),
                 s.touch, lambda: s.start_visual_input("x"), s.stop_visual_input):
        with pytest.raises(ValueError, match="clock"):
            call()
    # explicit instants still work while the clock is broken
    assert s.latest_visual_frames(math.inf, now=10.0) == before[1]
    clock.set(10.0)
    _still_works(s, sub, before)


def test_clock_that_raises(backend):
    class ClockFailed(Exception):
        pass

    state = {"broken": False}

    def clock():
        if state["broken"]:
            raise ClockFailed("clock failed")
        return 10.0

    s = Session("a", clock=clock, backend=backend)
    sub = s.subscribe_visual_frames(8)
    assert s.store_frame(payload(1), source="cam", max_recent=4, frame_seq=1)
    before = _snapshot(s, sub)
    state["broken"] = True
    for call in (lambda: s.store_frame(b"x", source="cam", max_recent=4), lambda: s.latest_visual_frames(1.0),
                 lambda: s.add_message(ChatMessage("user", "x")), s.mark_turn_started):
        with pytest.raises(ClockFailed):
            call()
    assert s.history_snapshot() == []
    state["broken"] = False
    _still_works(s, sub, before)


# -- constructors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,error,name",
    [
        (dict(id=1), TypeError, "id"),
        (dict(id=None), TypeError, "id"),
        (dict(mode=7), ValueError, "mode"),
        (dict(mode="omni"), ValueError, "mode"),
        (dict(character_id=3), TypeError, "character_id"),
    ],
)
def test_session_constructor_rejects(backend, kwargs, error, name):
    args = dict(id="a", mode=PipelineMode.OMNI, character_id="")
    args.update(kwargs)
    with pytest.raises(error, match=name):
        Session(args["id"], args["mode"], args["character_id"], backend=backend)


@pytest.mark.parametrize(
    "args,kwargs,error,name",
    [
        ((-1,), {}, ValueError, "max_concurrent"),
        (("3",), {}, TypeError, "max_concurrent"),
        ((2.5,), {}, TypeError, "max_concurrent"),
        ((HUGE,), {}, ValueError, "max_concurrent"),
        ((1, math.nan), {}, ValueError, "idle_timeout"),
        ((1, "300"), {}, TypeError, "idle_timeout"),
        ((1,), dict(cleanup_interval=0), ValueError, "cleanup_interval"),
        ((1,), dict(cleanup_interval=-1.0), ValueError, "cleanup_interval"),
        ((1,), dict(cleanup_interval=math.nan), ValueError, "cleanup_interval"),
        ((1,), dict(cleanup_interval="30"), TypeError, "cleanup_interval"),
        ((1,), dict(on_session_end=5), TypeError, "on_session_end"),
    ],
)
def test_manager_constructor_rejects(backend, args, kwargs, error, name):
    with pytest.raises(error, match=name):
        SessionManager(*args, backend=backend, **kwargs)


def test_manager_keeps_working_after_bad_calls(make_manager, clock):
    m = make_manager(2, idle_timeout=5.0)
    m.create("a")
    for bad, error, name in [
        (lambda: m.create(5), TypeError, "id"),
        (lambda: m.create(None), TypeError, "id"),
        (lambda: m.create("b", mode=9), ValueError, "mode"),
        (lambda: m.create("b", character_id=1), TypeError, "character_id"),
        (lambda: m.evict_idle(now="x"), TypeError, "now"),
        (lambda: m.evict_idle(now=math.nan), ValueError, "now"),
    ]:
        with pytest.raises(error, match=name):
            bad()
    assert [s.id for s in m.list()] == ["a"]  # no half-made session was registered
    s = m.create("b")
    assert s.store_frame(b"x", source="cam", max_recent=1) is True
    clock.advance(6)
    assert sorted(x.id for x in m.evict_idle()) == ["a", "b"]


@pytest.mark.parametrize("bad", [None, 5, ["list"]])
def test_manager_lookups_of_odd_ids(make_manager, bad):
    m = make_manager()
    from capsule_sessions import SessionNotFoundError

    with pytest.raises(SessionNotFoundError):
        m.get(bad)
    assert (bad in m) is False
