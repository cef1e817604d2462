"""The ecosystem issue's API items, on both backends: queue.Queue manners, a shutdown that
ends sessions, frames that describe themselves."""

from __future__ import annotations

import queue
import threading

import numpy as np
import pytest

from capsule_sessions import SessionError, SessionManager, SessionState, SubscriptionClosed

# -- queue.Queue manners -----------------------------------------------------------------


def test_get_block_false_is_get_nowait(session):
    sub = session.subscribe_visual_frames(2)
    with pytest.raises(queue.Empty):
        sub.get(False)
    with pytest.raises(queue.Empty):
        sub.get(block=False, timeout=10)  # as queue.Queue: timeout is ignored
    session.store_frame(b"a", source="cam", max_recent=2)
    assert bytes(sub.get(False).data) == b"a"
    session.store_frame(b"b", source="cam", max_recent=2)
    assert bytes(sub.get(True, 5).data) == b"b"
    sub.close()
    with pytest.raises(SubscriptionClosed):
        sub.get(False)


def test_get_timeout_keyword_and_positional(session, clock):
    sub = session.subscribe_visual_frames(4)
    with pytest.raises(queue.Empty):
        sub.get(timeout=0.01)
    with pytest.raises(queue.Empty):
        sub.get(True, 0.01)
    for n in range(3):
        clock.advance(0.001)
        session.store_frame(bytes([n]), source="cam", max_recent=3)
    assert [bytes(sub.get(timeout=1).data), bytes(sub.get(True, timeout=1).data), bytes(sub.get(block=True).data)] == [
        b"\x00", b"\x01", b"\x02"]


def test_get_wrong_calls_read_like_queue_get(session):
    sub = session.subscribe_visual_frames()
    for args, kwargs in (((True, 1, 2), {}), ((True,), {"block": False}), ((), {"blocking": True})):
        with pytest.raises(TypeError, match=r"^Subscription\.get\(\) "):
            sub.get(*args, **kwargs)


def test_empty_and_full(session, clock):
    sub = session.subscribe_visual_frames(2)
    assert sub.empty() and not sub.full()
    session.store_frame(b"a", source="cam", max_recent=2)
    assert not sub.empty() and not sub.full()
    clock.advance(0.001)
    session.store_frame(b"b", source="cam", max_recent=2)
    assert sub.full()
    sub.get_nowait()
    assert not sub.full() and not sub.empty()


# -- a shutdown that ends sessions --------------------------------------------------------


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


# -- frames that describe themselves ------------------------------------------------------


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
