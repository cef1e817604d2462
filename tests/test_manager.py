"""SessionManager: registry, limits, callbacks outside the lock (and interrupted by a
BaseException), eviction and its idle_timeout, the cleanup thread, a shutdown that ends
sessions."""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import threading

import pytest

from capsule_sessions import (
    MaxSessionsError,
    PipelineMode,
    Session,
    SessionError,
    SessionExistsError,
    SessionManager,
    SessionNotFoundError,
    SessionState,
    SubscriptionClosed,
)
from capsule_sessions._validate import MAX_INSTANT_SECONDS


def test_create_get_list_count(make_manager, backend):
    m = make_manager(3)
    a = m.create("a")
    b = m.create("b", PipelineMode.STANDARD, "char")
    assert isinstance(a, Session) and a.backend == backend
    assert (b.id, b.mode, b.character_id) == ("b", PipelineMode.STANDARD, "char")
    assert m.get("a") is a and m.get("b") is b
    assert sorted(s.id for s in m.list()) == ["a", "b"]
    assert m.count() == 2 and len(m) == 2
    assert "a" in m and "zzz" not in m and 5 not in m and ["unhashable"] not in m


def test_sessions_use_the_managers_clock(make_manager, clock):
    clock.set(123.0)
    s = make_manager().create("a")
    assert s.created_at == 123.0
    clock.set(130.0)
    s.touch()
    assert s.last_active_at == 130.0


def test_limit(make_manager):
    m = make_manager(2)
    m.create("a")
    m.create("b")
    with pytest.raises(MaxSessionsError):
        m.create("c")
    m.delete("a")
    m.create("c")
    assert m.count() == 2


def test_zero_limit_refuses_everything(make_manager):
    with pytest.raises(MaxSessionsError):
        make_manager(0).create("a")


def test_exists(make_manager):
    m = make_manager(4)
    first = m.create("a")
    with pytest.raises(SessionExistsError):
        m.create("a")
    assert m.get("a") is first and m.count() == 1


def test_limit_is_checked_before_existence(make_manager):
    # Go checks the limit first: a full manager answers MaxSessions even for a known id.
    m = make_manager(1)
    m.create("a")
    with pytest.raises(MaxSessionsError):
        m.create("a")


def test_get_unknown(make_manager):
    m = make_manager()
    with pytest.raises(SessionNotFoundError, match="nope"):
        m.get("nope")
    with pytest.raises(KeyError):  # a SessionNotFoundError is a KeyError too
        m.get("nope")


def test_touch(make_manager, clock):
    m = make_manager()
    s = m.create("a")
    clock.advance(9)
    m.touch("a")
    assert s.last_active_at == clock()
    with pytest.raises(SessionNotFoundError):
        m.touch("missing")


def test_list_is_a_copy(make_manager):
    m = make_manager()
    m.create("a")
    listed = m.list()
    listed.clear()
    assert m.count() == 1


def test_delete_unknown_is_a_noop(make_manager):
    ended = []
    m = make_manager(on_session_end=ended.append)
    m.delete("missing")
    assert ended == []


def test_delete_ends_the_session(make_manager):
    ended = []

    def on_end(session):
        ended.append((session.id, session.state))

    m = make_manager(on_session_end=on_end)
    s = m.create("a")
    s.set_state(SessionState.SPEAKING)
    m.delete("a")
    m.delete("a")  # a second delete does not call back again
    assert ended == [("a", SessionState.SPEAKING)]  # the callback sees the session before CLOSED
    assert s.state is SessionState.CLOSED
    assert "a" not in m and m.count() == 0
    with pytest.raises(SessionNotFoundError):
        m.get("a")


def test_delete_closes_subscriptions_and_wakes_readers(make_manager):
    m = make_manager()
    s = m.create("a")
    queued = s.subscribe_visual_frames(4)
    waiting = s.subscribe_visual_frames(4, policy="drop_oldest")
    s.store_frame(b"frame", source="cam", max_recent=1, frame_seq=1)
    assert waiting.get_nowait().frame_seq == 1
    outcome = []

    def reader():
        try:
            waiting.get()
        except SubscriptionClosed:
            outcome.append("closed")

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    m.delete("a")
    t.join(10)
    assert not t.is_alive() and outcome == ["closed"]
    assert queued.closed and waiting.closed
    assert queued.get_nowait().frame_seq == 1  # what was queued is still read out
    with pytest.raises(SubscriptionClosed):
        queued.get_nowait()


def test_subscribing_to_an_ended_session_gives_a_closed_subscription(make_manager, clock):
    m = make_manager()
    s = m.create("a")
    m.delete("a")
    late = s.subscribe_visual_frames(4)
    assert late.closed
    s.store_frame(b"after", source="cam", max_recent=1, frame_seq=7)  # storing still works
    assert late.qsize() == 0 and late.dropped == 0
    with pytest.raises(SubscriptionClosed):
        late.get(timeout=5)  # returns at once; never waits for a close that cannot come
    assert list(late) == []


def test_callback_may_call_the_manager(make_manager):
    seen = []
    holder = {}

    def on_end(session):
        m = holder["m"]
        # each of these takes the manager lock: a callback under the lock would deadlock
        seen.append((session.id, m.count(), session.id in m, sorted(x.id for x in m.list())))
        if session.id == "a":
            m.create("replacement")
            m.delete("b")

    m = make_manager(8, on_session_end=on_end)
    holder["m"] = m
    m.create("a")
    m.create("b")
    done = threading.Event()

    def run():
        m.delete("a")
        done.set()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert done.wait(10), "delete deadlocked when the callback called the manager"
    assert seen == [("a", 1, False, ["b"]), ("b", 1, False, ["replacement"])]
    assert sorted(s.id for s in m.list()) == ["replacement"]


def test_callback_error_still_closes_and_is_raised(make_manager):
    def on_end(session):
        raise RuntimeError("callback failed")

    m = make_manager(on_session_end=on_end)
    s = m.create("a")
    sub = s.subscribe_visual_frames()
    with pytest.raises(RuntimeError, match="callback failed"):
        m.delete("a")
    assert s.state is SessionState.CLOSED and sub.closed and "a" not in m


# -- a BaseException from on_session_end ---------------------------------------------

INTERRUPTS = [KeyboardInterrupt, SystemExit, asyncio.CancelledError]


def _blocked_reader(session):
    """A thread iterating a new subscription of ``session`` that has read one frame, so
    it waits in get() for the next; returns (thread, subscription, frame_seqs it read)."""
    sub = session.subscribe_visual_frames(4)
    seen = []
    got_one = threading.Event()

    def read():
        for frame in sub:
            seen.append(frame.frame_seq)
            got_one.set()

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    session.store_frame(b"frame", source="cam", max_recent=1, frame_seq=1)
    assert got_one.wait(10)
    return thread, sub, seen


def _assert_ended(sessions, subs, readers):
    for s in sessions:
        assert s.state is SessionState.CLOSED, f"{s.id} was removed but not ended"
    for sub in subs:
        assert sub.closed
    for thread in readers:
        thread.join(10)
        assert not thread.is_alive(), "a reader blocked on an interrupted session never woke"


@pytest.mark.parametrize("interrupt", INTERRUPTS, ids=lambda e: e.__name__)
def test_interrupted_eviction_still_ends_every_session(make_manager, clock, interrupt):
    attempted = []

    def on_end(session):
        attempted.append(session.id)
        if session.id == "a":
            raise interrupt("stop")

    clock.set(0.0)
    m = make_manager(idle_timeout=1.0, on_session_end=on_end)
    sessions = [m.create(name) for name in ("a", "b", "c")]
    readers = [_blocked_reader(s) for s in sessions]
    clock.set(5.0)
    with pytest.raises(interrupt):
        m.evict_idle()
    assert attempted == ["a", "b", "c"]  # the callback was attempted for every session
    assert m.count() == 0
    _assert_ended(sessions, [r[1] for r in readers], [r[0] for r in readers])
    assert [r[2] for r in readers] == [[1], [1], [1]]


@pytest.mark.parametrize("interrupt", INTERRUPTS, ids=lambda e: e.__name__)
def test_interrupted_delete_still_ends_the_session(make_manager, interrupt):
    def on_end(session):
        raise interrupt("stop")

    m = make_manager(on_session_end=on_end)
    s = m.create("a")
    thread, sub, _ = _blocked_reader(s)
    with pytest.raises(interrupt):
        m.delete("a")
    assert "a" not in m
    _assert_ended([s], [sub], [thread])


def test_a_base_exception_wins_over_an_earlier_error(make_manager, clock):
    def on_end(session):
        if session.id == "a":
            raise RuntimeError("ordinary failure")
        if session.id == "b":
            raise KeyboardInterrupt

    clock.set(0.0)
    m = make_manager(idle_timeout=1.0, on_session_end=on_end)
    sessions = [m.create(name) for name in ("a", "b", "c")]
    subs = [s.subscribe_visual_frames() for s in sessions]
    clock.set(5.0)
    with pytest.raises(KeyboardInterrupt):
        m.evict_idle()
    _assert_ended(sessions, subs, [])


def test_the_first_of_several_errors_is_raised(make_manager, clock):
    def on_end(session):
        raise RuntimeError(f"failed on {session.id}")

    clock.set(0.0)
    m = make_manager(idle_timeout=1.0, on_session_end=on_end)
    sessions = [m.create(name) for name in ("a", "b")]
    clock.set(5.0)
    with pytest.raises(RuntimeError, match="failed on a"):
        m.evict_idle()
    _assert_ended(sessions, [], [])


def test_interrupted_background_eviction_still_ends_every_session(backend, clock, monkeypatch):
    died = []
    thread_died = threading.Event()

    def hook(args):
        died.append(args.exc_type)
        thread_died.set()

    monkeypatch.setattr(threading, "excepthook", hook)

    def on_end(session):
        if session.id == "a":
            raise KeyboardInterrupt

    clock.set(0.0)
    m = SessionManager(8, 1.0, cleanup_interval=0.005, on_session_end=on_end, clock=clock, backend=backend)
    try:
        sessions = [m.create(name) for name in ("a", "b", "c")]
        readers = [_blocked_reader(s) for s in sessions]
        clock.set(5.0)
        assert thread_died.wait(10), "the callback's KeyboardInterrupt did not reach the cleanup thread"
        # The interrupt ends the cleanup thread (as in any thread), but only after the
        # whole round was ended.
        assert died == [KeyboardInterrupt]
        _assert_ended(sessions, [r[1] for r in readers], [r[0] for r in readers])
    finally:
        m.stop()


# -- idle eviction ---------------------------------------------------------------------


def test_evict_idle_with_fake_clock(make_manager, clock):
    ended = []
    m = make_manager(8, idle_timeout=10.0, on_session_end=lambda s: ended.append(s.id))
    clock.set(0.0)
    old = m.create("old")
    clock.set(5.0)
    fresh = m.create("fresh")
    clock.set(10.0)
    assert m.evict_idle() == []  # idle for exactly idle_timeout: not yet (Go: strictly longer)
    clock.set(10.5)
    assert m.evict_idle() == [old]
    assert ended == ["old"] and old.state is SessionState.CLOSED
    assert m.list() == [fresh] and fresh.state is SessionState.INIT
    fresh.touch()  # activity postpones eviction
    clock.set(20.0)
    assert m.evict_idle() == []
    clock.set(20.6)
    assert m.evict_idle() == [fresh]
    assert m.count() == 0 and ended == ["old", "fresh"]
    assert m.evict_idle() == []


def test_evict_idle_explicit_now_and_timedelta(make_manager, clock):
    clock.set(100.0)
    m = make_manager(idle_timeout=dt.timedelta(seconds=30))
    m.create("a")
    assert m.evict_idle(now=130.0) == []
    assert [s.id for s in m.evict_idle(now=130.001)] == ["a"]


def test_store_counts_as_activity(make_manager, clock):
    clock.set(0.0)
    m = make_manager(idle_timeout=10.0)
    s = m.create("a")
    s.store_frame(b"x", source="cam", max_recent=1, now=8.0)
    assert m.evict_idle(now=15.0) == []
    # a rate-limited store is not activity (Go returns before touching)
    s.store_frame(b"x", source="cam", max_recent=1, min_interval=100.0, now=17.0)
    assert m.evict_idle(now=18.5) == [s]


def test_evict_closes_subscriptions_and_wakes_readers(make_manager, clock):
    clock.set(0.0)
    m = make_manager(idle_timeout=1.0)
    s = m.create("a")
    sub = s.subscribe_visual_frames()
    outcome = []

    def reader():
        try:
            for _ in sub:
                pass
            outcome.append("ended")
        except Exception as exc:  # pragma: no cover - reported below
            outcome.append(exc)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    clock.set(5.0)
    assert m.evict_idle() == [s]
    t.join(10)
    assert not t.is_alive() and outcome == ["ended"] and sub.closed


def test_evict_callback_may_call_the_manager(make_manager, clock):
    clock.set(0.0)
    holder = {}
    seen = []

    def on_end(session):
        seen.append(holder["m"].count())
        holder["m"].create(session.id + "-next")

    m = make_manager(idle_timeout=1.0, on_session_end=on_end)
    holder["m"] = m
    m.create("a")
    clock.set(2.0)
    done = threading.Event()
    t = threading.Thread(target=lambda: (m.evict_idle(), done.set()), daemon=True)
    t.start()
    assert done.wait(10), "evict_idle deadlocked when the callback called the manager"
    assert seen == [0] and [x.id for x in m.list()] == ["a-next"]


# idle_timeout: huge means never, NaN is an error, <= 0 evicts at once.

@pytest.mark.parametrize("forever", [10**400, math.inf, 1e300, dt.timedelta.max],
                         ids=["huge-int", "inf", "1e300", "timedelta.max"])
def test_a_huge_idle_timeout_never_evicts(make_manager, clock, forever):
    clock.set(-MAX_INSTANT_SECONDS * 0.999)
    m = make_manager(idle_timeout=forever)
    s = m.create("a")
    # The two instants furthest apart there are: still not idle.
    assert m.evict_idle(now=MAX_INSTANT_SECONDS * 0.999) == []
    assert m.list() == [s] and s.state is SessionState.INIT


@pytest.mark.parametrize("bad", [math.nan, -math.nan], ids=["nan", "-nan"])
def test_a_nan_idle_timeout_is_a_value_error(backend, bad):
    with pytest.raises(ValueError, match="idle_timeout"):
        SessionManager(1, bad, cleanup_interval=None, backend=backend)


@pytest.mark.parametrize("timeout", [-1.0, -(10**400), -math.inf, dt.timedelta(seconds=-5)],
                         ids=["-1", "-huge-int", "-inf", "timedelta"])
def test_a_negative_idle_timeout_evicts_every_session(make_manager, clock, timeout):
    # As in Go (idle when now - last_active > idle_timeout): below zero even a session
    # touched at this very instant is idle.
    clock.set(10.0)
    m = make_manager(idle_timeout=timeout)
    s = m.create("a")
    assert m.evict_idle() == [s]


def test_a_zero_idle_timeout_evicts_any_session_idle_at_all(make_manager, clock):
    clock.set(10.0)
    m = make_manager(idle_timeout=0)
    s = m.create("a")
    assert m.evict_idle() == []  # idle for exactly 0 s: not longer than 0
    clock.advance(0.001)
    assert m.evict_idle() == [s]


def test_background_thread_evicts(make_manager, clock):
    clock.set(0.0)
    evicted = threading.Event()
    m = make_manager(idle_timeout=1.0, cleanup_interval=0.005, on_session_end=lambda s: evicted.set())
    s = m.create("a")
    clock.set(2.0)  # the thread's next tick sees the session idle
    assert evicted.wait(10), "the cleanup thread never evicted the idle session"
    assert s.state is SessionState.CLOSED and "a" not in m
    m.stop()


def test_background_thread_with_timedelta_interval(backend, clock):
    clock.set(0.0)
    evicted = threading.Event()
    with SessionManager(4, 1.0, cleanup_interval=dt.timedelta(milliseconds=5), clock=clock, backend=backend,
                        on_session_end=lambda s: evicted.set()) as m:
        m.create("a")
        clock.set(3.0)
        assert evicted.wait(10)


def _stop_within(manager, seconds=10.0):
    t = threading.Thread(target=manager.stop, daemon=True)
    t.start()
    t.join(seconds)
    return not t.is_alive()


def test_stop_is_prompt_and_idempotent(backend):
    m = SessionManager(2, cleanup_interval=3600.0, backend=backend)
    thread = m._thread
    assert thread is not None and thread.is_alive()
    assert _stop_within(m), "stop() waited for the cleanup interval"
    assert not thread.is_alive()
    assert _stop_within(m)
    m.stop()
    # a stopped manager still works as a registry
    m.create("a")
    assert m.count() == 1


def test_no_thread_when_cleanup_interval_is_none(backend):
    m = SessionManager(2, cleanup_interval=None, backend=backend)
    assert m._thread is None
    m.stop()


def test_context_manager_stops(backend):
    with SessionManager(2, cleanup_interval=3600.0, backend=backend) as m:
        thread = m._thread
        m.create("a")
    assert not thread.is_alive()


def test_stop_from_the_callback_does_not_deadlock(backend, clock):
    clock.set(0.0)
    done = threading.Event()
    holder = {}

    def on_end(session):
        holder["m"].stop()  # runs on the cleanup thread itself
        done.set()

    m = SessionManager(2, 1.0, cleanup_interval=0.005, on_session_end=on_end, clock=clock, backend=backend)
    holder["m"] = m
    m.create("a")
    clock.set(5.0)
    assert done.wait(10)
    assert _stop_within(m)


def test_defaults(backend):
    with SessionManager(5, backend=backend) as m:
        assert m.max_concurrent == 5
        assert m.idle_timeout == 300.0
        assert m.on_session_end is None


def test_repr(make_manager):
    assert "SessionManager" in repr(make_manager())


# -- a shutdown that ends sessions --------------------------------------------------

def test_close_ends_every_session_once_and_wakes_readers(make_manager):
    ended = []
    manager = make_manager(on_session_end=ended.append)
    sessions = [manager.create(f"s{i}") for i in range(3)]
    sub = sessions[0].subscribe_visual_frames()
    seen = []
    reader = threading.Thread(target=lambda: seen.extend(sub))
    reader.start()
    manager.close()
    reader.join(10)
    assert not reader.is_alive(), "a reader blocked in `for f in sub` was not woken"
    assert ended == sessions and all(s.state is SessionState.CLOSED for s in sessions)
    assert manager.count() == 0
    manager.close()  # idempotent: nobody ended twice
    assert ended == sessions
    with pytest.raises(SessionError, match="closed"):
        manager.create("late")


def test_leaving_the_with_block_closes_and_stops_the_thread(backend, clock):
    ended = []
    with SessionManager(4, cleanup_interval=0.01, on_session_end=ended.append, clock=clock, backend=backend) as manager:
        session = manager.create("cam")
        sub = session.subscribe_visual_frames()
        thread = manager._thread
    assert ended == [session] and sub.closed and not thread.is_alive()


def test_stop_keeps_sessions_alive(make_manager):
    manager = make_manager(cleanup_interval=0.01)
    session = manager.create("cam")
    manager.stop()
    assert "cam" in manager and session.state is SessionState.INIT
    manager.close()
    assert session.state is SessionState.CLOSED


def test_close_ends_the_rest_when_a_callback_raises(make_manager):
    def end(session):
        if session.id == "s0":
            raise KeyboardInterrupt

    manager = make_manager(on_session_end=end)
    sessions = [manager.create(f"s{i}") for i in range(3)]
    with pytest.raises(KeyboardInterrupt):
        manager.close()
    assert all(s.state is SessionState.CLOSED for s in sessions)
