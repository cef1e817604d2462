"""API hardening: interrupted session ends, message validation, clamped idle timeouts,
str/int/float subclasses, and the TypeError of a wrong call signature, on both backends."""

from __future__ import annotations

import asyncio
import threading

import pytest

from capsule_sessions import SessionManager, SessionState

INTERRUPTS = [KeyboardInterrupt, SystemExit, asyncio.CancelledError]


# -- 1. a BaseException from on_session_end ------------------------------------------


def _blocked_reader(session):
    """A thread iterating a subscription of ``session``, parked in get() once it has
    seen one frame; returns (thread, frames it read)."""
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
