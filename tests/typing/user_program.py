"""A small program that uses every public name of capsule_sessions, as a user writes it.

tests/test_typing.py runs it and checks it with ``mypy --strict`` (so does ``make
lint``): it must run, and mypy must report nothing. Each ``assert_type`` pins what a
call returns, so a return type that decays to Any (or to a bare list) fails the check.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import queue
import threading
from typing import TYPE_CHECKING

import numpy as np

import capsule_sessions
from capsule_sessions import (
    BACKEND,
    ChatMessage,
    ConversationSnapshot,
    DialogContextItem,
    FrameLoan,
    MaxSessionsError,
    PipelineMode,
    Session,
    SessionError,
    SessionExistsError,
    SessionManager,
    SessionNotFoundError,
    SessionState,
    SharedMemoryError,
    Subscription,
    SubscriptionClosed,
    VisualFrame,
    VisualInputConfig,
    attach,
    available_backends,
    list_shared,
)

if TYPE_CHECKING:
    from typing_extensions import assert_type
else:
    def assert_type(value, _type):  # only the type checker reads the second argument
        return value

JPEG = b"\xff\xd8\xff\xe0" + bytes(60)


class Clock:
    """A clock the program moves by hand, as a test or a replay would."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def describe(frame: VisualFrame) -> str:
    pixels = frame.as_array((frame.height, frame.width, 3))
    return (f"{frame.source} #{frame.frame_seq} {frame.mime_type} {frame.width}x{frame.height} "
            f"t={frame.timestamp_ms} ms at {frame.received_at:.3f}: {pixels.shape}, {frame.nbytes} bytes")


def conversation(manager: SessionManager, clock: Clock) -> Session:
    session = manager.create("user-1", PipelineMode.STANDARD, character_id="guide")
    session.set_owner_id("owner")
    session.set_state(SessionState.CONNECTED)
    assert_type(session.state, SessionState)
    seq = session.mark_pipeline_running()
    assert session.is_current_pipeline(seq)
    session.mark_pipeline_finished(seq)
    assert session.wait_pipeline_done(datetime.timedelta(seconds=1))
    turn = session.mark_turn_started()
    assert session.is_current_turn(turn) and session.current_turn_seq == turn
    assert session.try_start_voice_startup_greeting()
    session.add_message(ChatMessage("user", "hello", turn_seq=turn))
    session.add_message(ChatMessage("assistant", "hi", timestamp=clock(), turn_seq=turn))
    history = assert_type(session.history_snapshot(), list[ChatMessage])
    assert [m.content for m in history] == ["hello", "hi"]
    session.set_dialog_context([DialogContextItem("user", "earlier", 5)])
    context = assert_type(session.dialog_context_snapshot(), list[DialogContextItem])
    assert context[0].timestamp == 5
    snapshot = assert_type(session.conversation_snapshot(), ConversationSnapshot)
    assert snapshot.session_id == "user-1" and snapshot.history[0].role == "user"
    assert session.to_dict()["character_id"] == "guide"
    assert history[0].to_dict(clock)["role"] == "user"
    session.touch(clock())
    assert session.last_active_at == clock() and session.created_at <= clock()
    return session


def frames(session: Session, clock: Clock) -> None:
    with session.subscribe_visual_frames(4, policy="drop_oldest") as sub:
        assert_type(sub, Subscription)
        assert isinstance(sub, Subscription) and sub.empty() and not sub.full()
        image = np.zeros((2, 3, 3), np.uint8)
        session.start_visual_input("camera", now=clock())
        for n in range(3):
            clock.now += 0.1
            image[:] = n
            stored = assert_type(session.store_frame(image, source="camera", max_recent=2, frame_seq=n), bool)
            assert stored
        latest = assert_type(session.latest_visual_frames(10.0), list[VisualFrame])
        assert [f.frame_seq for f in latest] == [1, 2]
        first = assert_type(sub.get(timeout=1.0), VisualFrame)
        print(describe(first))
        assert sub.get_nowait().frame_seq == 1 and sub.qsize() == 1
        assert session.store_visual_frame(first.replace(frame_seq=9), max_recent=2, min_interval=0.0)
        stats = assert_type(session.visual_stats(), dict[str, int])
        assert stats["accepted"] == 4 and sub.delivered == 2 and sub.dropped == 0
        assert sub.maxsize == 4 and sub.policy == "drop_oldest" and not sub.closed
        session.stop_visual_input("camera")
    assert sub.closed
    try:
        sub.get(block=False)
    except (queue.Empty, SubscriptionClosed):
        pass


def loans(session: Session, clock: Clock) -> None:
    height, width = 2, 3
    clock.now += 0.1
    with session.loan_frame(height * width * 3) as loan:
        assert_type(loan, FrameLoan)
        assert isinstance(loan, FrameLoan) and loan.nbytes == 18
        np.copyto(loan.as_array((height, width, 3)), 7)  # a view made and dropped
        loan.array[:3] = (1, 2, 3)
        committed = assert_type(loan.commit(source="camera", max_recent=2, width=width, height=height,
                                            mime_type="video/x-raw-rgb", frame_seq=10), bool)
        assert committed
    (frame,) = [f for f in session.latest_visual_frames(10.0) if f.frame_seq == 10]
    assert bytes(frame.data[:4]) == b"\x01\x02\x03\x07"
    cancelled = session.loan_frame(4)
    cancelled.cancel()
    try:
        cancelled.commit(source="camera", max_recent=2)
    except ValueError as exc:
        print(f"finished: {exc}")


def ingest(session: Session, clock: Clock) -> None:
    config = VisualInputConfig(frame_interval=0.0, max_width=640, max_height=480, mime_types=("image/jpeg",))
    clock.now += 1.0
    frame = VisualFrame(JPEG, "image/jpeg", 640, 480, source="screen")
    assert session.ingest_visual_frame(frame, config)
    try:
        session.ingest_visual_frame(frame.replace(width=641), config)
    except ValueError as exc:
        print(f"rejected: {exc}")


async def watch(session: Session, clock: Clock) -> list[int]:
    sub = session.subscribe_visual_frames(8)
    seen: list[int] = []

    def produce() -> None:
        for n in range(3):
            session.store_frame(bytes([n]) * 4, source="mic-cam", max_recent=1, frame_seq=n, now=clock.now + n)
        sub.unsubscribe()

    producer = threading.Thread(target=produce)
    producer.start()
    first = assert_type(await sub.aget(timeout=5.0), VisualFrame)
    seen.append(first.frame_seq)
    async for frame in sub:
        seen.append(assert_type(frame, VisualFrame).frame_seq)
    producer.join()
    return seen


def manage() -> None:
    clock = Clock()
    ended: list[str] = []
    backend = assert_type(BACKEND, str)
    assert backend in assert_type(available_backends(), list[str])
    with SessionManager(2, idle_timeout=60.0, cleanup_interval=None, on_session_end=lambda s: ended.append(s.id),
                        clock=clock, backend=backend) as manager:
        session = conversation(manager, clock)
        frames(session, clock)
        loans(session, clock)
        ingest(session, clock)
        assert asyncio.run(watch(session, clock)) == [0, 1, 2]
        try:
            manager.create("user-1")
        except SessionExistsError:
            pass
        manager.create("user-2")
        try:
            manager.create("user-3")
        except MaxSessionsError as exc:
            print(f"full: {exc}")
        try:
            manager.get("nobody")
        except SessionNotFoundError:
            pass
        assert "user-2" in manager and len(manager) == manager.count() == 2
        assert_type(manager.get("user-2"), Session).touch()
        everyone = assert_type(manager.list(), list[Session])
        assert {s.id for s in everyone} == {"user-1", "user-2"}
        clock.now += 3600.0
        manager.touch("user-2")
        evicted = assert_type(manager.evict_idle(), list[Session])
        assert [s.id for s in evicted] == ["user-1"] and evicted[0].state is SessionState.CLOSED
        manager.delete("user-2")
    assert sorted(ended) == ["user-1", "user-2"]
    try:
        manager.create("late")
    except SessionError as exc:
        print(f"closed: {exc}")
    print(f"capsule_sessions {capsule_sessions.__version__} on {backend}: done")


def share() -> None:
    """A shared session read through attach(), as another process would (Linux, compiled)."""
    namespace = f"typing-{os.getpid()}"
    with SessionManager(2, shared=namespace, backend="cython") as manager:
        cam = manager.create("cam")
        assert cam.store_frame(np.zeros((2, 2, 3), np.uint8), source="c", max_recent=2)
        assert list_shared(namespace) == ["cam"]
        with attach("cam", namespace=namespace, timeout=1.0) as reader:
            frames: list[VisualFrame] = reader.latest_visual_frames(10.0)
            sub: Subscription = reader.subscribe_visual_frames(2, policy="drop_oldest")
            stats: dict[str, int] = reader.visual_stats()
            assert len(frames) == 1 and stats["accepted"] == 1 and not sub.closed
            print(f"shared: {describe(frames[0])}, {reader.shared_stats()}")
    try:
        attach("cam", namespace=namespace)
    except SessionNotFoundError:
        pass
    except SharedMemoryError as exc:
        print(f"not a session: {exc}")


if __name__ == "__main__":
    if "cython" in available_backends():
        share()
    manage()
