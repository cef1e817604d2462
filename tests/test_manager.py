"""SessionManager: registry, limits, callbacks outside the lock, eviction, the cleanup thread."""

from __future__ import annotations

import datetime as dt
import threading

import pytest

from capsule_sessions import (
    MaxSessionsError,
    PipelineMode,
    Session,
    SessionExistsError,
    SessionManager,
    SessionNotFoundError,
    SessionState,
    SubscriptionClosed,
)


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
