"""Subscriptions: bounded queues, both drop policies, counters, blocking/async reads (with
queue.Queue's manners), close, and no copies."""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import gc
import pickle
import queue
import threading

import pytest

from capsule_sessions import SubscriptionClosed
from capsule_sessions._limits import MAX_COUNT
from capsule_sessions.errors import NOT_BY_HAND_MESSAGE
from support import assert_handed_out, assert_payload_matches, payload

try:
    from capsule_sessions._shm import MAX_QUEUE
except ImportError:  # no shared sessions here: the in-process bound alone is checked
    MAX_QUEUE = -1

# Every test here runs on a shared session too (tests/conftest.py).
ALSO_SHARED = True


def put(session, seq, **kw):
    return session.store_frame(payload(seq), source=kw.pop("source", "cam"), max_recent=kw.pop("max_recent", 2),
                               frame_seq=seq, **kw)


def drain(sub):
    out = []
    while True:
        try:
            out.append(sub.get_nowait().frame_seq)
        except queue.Empty:
            return out


def run_in_thread(fn, timeout=10.0):
    """Run ``fn`` in a thread; returns (thread, result list) after starting it."""
    result = []

    def target():
        try:
            result.append(("ok", fn()))
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            result.append(("err", exc))

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, result


def join(thread, timeout=10.0):
    thread.join(timeout)
    assert not thread.is_alive(), "thread did not finish"


# -- construction --------------------------------------------------------------------


def test_defaults(session):
    sub = session.subscribe_visual_frames()
    assert sub.maxsize == 1 and sub.policy == "drop_newest"
    assert (sub.closed, sub.dropped, sub.delivered, sub.qsize()) == (False, 0, 0, 0)


@pytest.mark.parametrize("buffer", [0, -1, -(2**70)])
def test_buffer_not_positive_counts_as_one(session, buffer):
    sub = session.subscribe_visual_frames(buffer)
    assert sub.maxsize == 1
    put(session, 1)
    put(session, 2)
    assert drain(sub) == [1] and sub.dropped == 1


def test_huge_buffer_is_harmless(session):
    sub = session.subscribe_visual_frames(2**62)
    # In-process the bound is clamped to MAX_COUNT; a shared session's queue holds at
    # most MAX_QUEUE frames (docs/shared-memory.md).
    assert sub.maxsize == (MAX_QUEUE if session.shared else MAX_COUNT)
    for seq in range(5):
        put(session, seq)
    assert drain(sub) == [0, 1, 2, 3, 4]


def test_policy_keyword(session):
    assert session.subscribe_visual_frames(3, policy="drop_oldest").policy == "drop_oldest"
    assert session.subscribe_visual_frames(3, policy="drop_newest").policy == "drop_newest"


def test_subscription_refuses_to_be_made_copied_or_pickled(session):
    sub = session.subscribe_visual_frames(2)
    cls = type(sub)
    for make in (lambda: cls(), lambda: cls.__new__(cls), lambda: cls.__new__(cls, None, None, None)):
        with pytest.raises(TypeError, match=NOT_BY_HAND_MESSAGE):
            make()
    for duplicate in (copy.copy, copy.deepcopy, pickle.dumps):
        with pytest.raises(TypeError, match="cannot pickle or copy"):
            duplicate(sub)
    assert not hasattr(sub, "__setstate_cython__")
    gc.collect()  # a refused copy left nothing behind that could close the original
    assert session.store_frame(b"x", source="cam", max_recent=1)
    assert bytes(sub.get(timeout=5).data) == b"x" and not sub.closed
    assert repr(sub).startswith("<Subscription open")


# -- drop policies and counters ----------------------------------------------------


def test_drop_newest_keeps_the_first_frames(session):
    sub = session.subscribe_visual_frames(2)
    for seq in range(1, 6):
        put(session, seq)
    assert (sub.qsize(), sub.dropped, sub.delivered) == (2, 3, 0)
    assert drain(sub) == [1, 2]
    assert (sub.qsize(), sub.dropped, sub.delivered) == (0, 3, 2)


def test_drop_oldest_keeps_the_newest_frames(session):
    sub = session.subscribe_visual_frames(2, policy="drop_oldest")
    for seq in range(1, 6):
        put(session, seq)
    assert (sub.qsize(), sub.dropped, sub.delivered) == (2, 3, 0)
    assert drain(sub) == [4, 5]
    assert sub.delivered == 2


def test_policies_side_by_side_with_interleaved_reads(session):
    newest = session.subscribe_visual_frames(3)
    oldest = session.subscribe_visual_frames(3, policy="drop_oldest")
    got_newest, got_oldest = [], []
    for seq in range(20):
        put(session, seq)
        if seq % 4 == 3:
            got_newest.append(newest.get_nowait().frame_seq)
            got_oldest.append(oldest.get_nowait().frame_seq)
    got_newest += drain(newest)
    got_oldest += drain(oldest)
    for sub, got in ((newest, got_newest), (oldest, got_oldest)):
        assert got == sorted(got) and len(set(got)) == len(got)
        assert sub.delivered == len(got)
        assert sub.delivered + sub.dropped == 20
    assert got_oldest[-3:] == [17, 18, 19]  # drop_oldest always ends with the newest
    assert got_newest[:3] == [0, 1, 2]


def test_only_frames_accepted_after_subscribing_are_offered(session):
    put(session, 1)
    sub = session.subscribe_visual_frames(8)
    assert sub.qsize() == 0
    put(session, 2, min_interval=1e9)  # rate-limited: never offered
    put(session, 3, source="other")
    put(session, 4, source="other")
    assert drain(sub) == [3, 4]
    assert sub.dropped == 0


def test_ring_changes_do_not_touch_queued_frames(session):
    sub = session.subscribe_visual_frames(8)
    put(session, 1, source="a")
    put(session, 2, source="b")  # resets the ring, not the subscriber's queue
    session.stop_visual_input()
    session.start_visual_input("c")
    put(session, 3, source="c", max_recent=1)
    frames = [sub.get_nowait() for _ in range(3)]
    assert [f.frame_seq for f in frames] == [1, 2, 3]
    for f in frames:
        assert_payload_matches(f)
        assert_handed_out(f)
    assert not sub.closed


def test_delivered_frames_carry_the_stored_fields(session, clock):
    sub = session.subscribe_visual_frames()
    clock.set(33.0)
    session.store_frame(b"\xff\xd8\xff", source="s", max_recent=1, mime_type="image/jpeg", width=2, height=3,
                        timestamp_ms=44, frame_seq=55)
    f = sub.get(timeout=0)
    assert (f.source, f.mime_type, f.width, f.height, f.timestamp_ms, f.frame_seq, f.received_at) == (
        "s", "image/jpeg", 2, 3, 44, 55, 33.0)
    assert bytes(f.data) == b"\xff\xd8\xff"


# -- reads -------------------------------------------------------------------------


@pytest.mark.parametrize("timeout", [0, 0.0, 0.01, dt.timedelta(milliseconds=10)])
def test_get_times_out_with_queue_empty(session, timeout):
    sub = session.subscribe_visual_frames()
    with pytest.raises(queue.Empty):
        sub.get(timeout=timeout)
    assert sub.delivered == 0


def test_get_nowait_empty(session):
    with pytest.raises(queue.Empty):
        session.subscribe_visual_frames().get_nowait()


def test_get_returns_queued_frame_without_waiting(session):
    sub = session.subscribe_visual_frames()
    put(session, 9)
    assert sub.get().frame_seq == 9
    assert sub.delivered == 1


def test_blocking_get_wakes_when_another_thread_stores(session):
    sub = session.subscribe_visual_frames()
    thread, result = run_in_thread(lambda: sub.get(timeout=30).frame_seq)
    put(session, 4)
    join(thread)
    assert result == [("ok", 4)]


def test_blocking_get_forever_wakes_on_close(session):
    sub = session.subscribe_visual_frames()
    thread, result = run_in_thread(lambda: sub.get())
    sub.close()
    join(thread)
    assert result[0][0] == "err" and isinstance(result[0][1], SubscriptionClosed)


def test_get_with_timeout_wakes_on_close(session):
    sub = session.subscribe_visual_frames()
    thread, result = run_in_thread(lambda: sub.get(timeout=30))
    sub.close()
    join(thread)
    assert isinstance(result[0][1], SubscriptionClosed)


# queue.Queue manners: get(block, timeout), empty(), full().

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


# -- close ---------------------------------------------------------------------------


def test_close_returns_queued_frames_then_raises(session):
    sub = session.subscribe_visual_frames(4)
    put(session, 1)
    put(session, 2)
    put(session, 3)
    sub.close()
    assert sub.closed
    assert sub.get().frame_seq == 1
    assert sub.get(timeout=0).frame_seq == 2
    assert sub.get_nowait().frame_seq == 3
    for read in (sub.get, lambda: sub.get(timeout=0), lambda: sub.get(timeout=5), sub.get_nowait):
        with pytest.raises(SubscriptionClosed):
            read()
    assert sub.delivered == 3 and sub.dropped == 0


def test_closed_subscription_gets_no_more_frames(session):
    sub = session.subscribe_visual_frames(4)
    put(session, 1)
    sub.close()
    put(session, 2)
    put(session, 3)
    assert sub.qsize() == 1 and sub.dropped == 0
    assert [f.frame_seq for f in sub] == [1]


def test_close_is_idempotent_and_unsubscribe_is_an_alias(session):
    sub = session.subscribe_visual_frames()
    sub.close()
    sub.close()
    sub.unsubscribe()
    assert sub.closed
    other = session.subscribe_visual_frames()
    other.unsubscribe()
    assert other.closed
    other.close()
    put(session, 1)
    assert other.qsize() == 0


def test_context_manager_closes(session):
    with session.subscribe_visual_frames(2) as sub:
        put(session, 1)
        assert sub.get_nowait().frame_seq == 1
        assert not sub.closed
    assert sub.closed
    put(session, 2)
    assert sub.qsize() == 0


def test_context_manager_closes_on_error(session):
    with pytest.raises(RuntimeError):
        with session.subscribe_visual_frames() as sub:
            raise RuntimeError("boom")
    assert sub.closed


def test_iteration_yields_until_closed_and_drained(session):
    sub = session.subscribe_visual_frames(8)
    thread, result = run_in_thread(lambda: [f.frame_seq for f in sub])
    for seq in range(5):
        put(session, seq)
    # the reader may still be behind: close only ends it after the queue is drained
    sub.close()
    join(thread)
    assert result == [("ok", [0, 1, 2, 3, 4])]  # the buffer holds all five: nothing dropped
    assert sub.delivered == 5 and sub.dropped == 0


def test_iteration_over_a_closed_subscription_drains_it(session):
    sub = session.subscribe_visual_frames(8)
    for seq in range(3):
        put(session, seq)
    sub.close()
    assert [f.frame_seq for f in sub] == [0, 1, 2]
    assert list(sub) == []


def test_dropped_subscription_stops_receiving(session):
    kept = session.subscribe_visual_frames()
    session.subscribe_visual_frames()  # never bound to a name
    gc.collect()
    assert session._ring.subscriber_count == 1
    sub = session.subscribe_visual_frames()
    assert session._ring.subscriber_count == 2
    del sub
    gc.collect()
    assert session._ring.subscriber_count == 1
    put(session, 1)
    assert kept.get_nowait().frame_seq == 1


def test_closed_subscription_leaves_the_ring(session):
    sub = session.subscribe_visual_frames()
    sub.close()
    assert session._ring.subscriber_count == 0


def test_repr_does_not_fail(session):
    sub = session.subscribe_visual_frames(3)
    assert "drop_newest" in repr(sub)


# -- asyncio -----------------------------------------------------------------------


def _store_later(session, seqs, started: threading.Event):
    def producer():
        started.wait(10)
        for seq in seqs:
            put(session, seq)

    t = threading.Thread(target=producer, daemon=True)
    t.start()
    return t


def test_aget_is_woken_by_a_store_from_another_thread(session):
    sub = session.subscribe_visual_frames()

    async def main():
        ready = threading.Event()
        thread = _store_later(session, [7], ready)
        task = asyncio.ensure_future(sub.aget(timeout=30))
        await asyncio.sleep(0)  # let the reader park before the frame arrives
        ready.set()
        frame = await task
        thread.join(10)
        return frame

    frame = asyncio.run(asyncio.wait_for(main(), 30))
    assert frame.frame_seq == 7
    assert_payload_matches(frame)
    assert sub.delivered == 1


def test_aget_does_not_block_the_loop(session):
    sub = session.subscribe_visual_frames()

    async def main():
        ticks = 0
        task = asyncio.ensure_future(sub.aget())
        for _ in range(5):
            await asyncio.sleep(0)
            ticks += 1
        assert not task.done()
        put(session, 1)
        return ticks, (await asyncio.wait_for(task, 10)).frame_seq

    assert asyncio.run(main()) == (5, 1)


@pytest.mark.parametrize("timeout", [0, 0.01])
def test_aget_times_out_with_queue_empty(session, timeout):
    sub = session.subscribe_visual_frames()

    async def main():
        with pytest.raises(queue.Empty):
            await sub.aget(timeout=timeout)

    asyncio.run(main())
    # the timed-out waiter left nothing behind: the next frame is still delivered
    put(session, 3)
    assert sub.get_nowait().frame_seq == 3


def test_aget_after_close_drains_then_raises(session):
    sub = session.subscribe_visual_frames(2)
    put(session, 1)
    sub.close()

    async def main():
        first = await sub.aget()
        with pytest.raises(SubscriptionClosed):
            await sub.aget()
        with pytest.raises(SubscriptionClosed):
            await sub.aget(timeout=0)
        return first.frame_seq

    assert asyncio.run(main()) == 1


def test_async_for_ends_when_closed_from_another_thread(session):
    sub = session.subscribe_visual_frames(16)

    async def main():
        ready = threading.Event()

        def producer():
            ready.wait(10)
            for seq in range(5):
                put(session, seq)
            sub.close()

        thread = threading.Thread(target=producer, daemon=True)
        thread.start()
        got = []
        ready.set()
        async for frame in sub:
            got.append(frame.frame_seq)
        thread.join(10)
        return got

    got = asyncio.run(asyncio.wait_for(main(), 30))
    assert got == [0, 1, 2, 3, 4]
    assert sub.delivered == 5


def test_aget_wakes_on_close_from_another_thread(session):
    sub = session.subscribe_visual_frames()

    async def main():
        task = asyncio.ensure_future(sub.aget())
        await asyncio.sleep(0)
        closer = threading.Thread(target=sub.close)
        closer.start()
        with pytest.raises(SubscriptionClosed):
            await asyncio.wait_for(task, 10)
        closer.join(10)

    asyncio.run(main())


def test_several_async_readers_share_the_frames(session):
    sub = session.subscribe_visual_frames(64)

    async def reader():
        got = []
        async for frame in sub:
            got.append(frame.frame_seq)
        return got

    async def main():
        tasks = [asyncio.ensure_future(reader()) for _ in range(3)]
        await asyncio.sleep(0)

        def producer():
            for seq in range(30):
                put(session, seq)
            sub.close()

        thread = threading.Thread(target=producer, daemon=True)
        thread.start()
        results = await asyncio.wait_for(asyncio.gather(*tasks), 30)
        thread.join(10)
        return results

    results = asyncio.run(main())
    merged = sorted(seq for got in results for seq in got)
    # the buffer holds all 30: nothing dropped, each frame read by exactly one reader
    assert merged == list(range(30))
    assert sub.dropped == 0 and sub.delivered == 30
