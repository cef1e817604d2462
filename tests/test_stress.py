"""Bounded multi-threaded stress tests that check the books, not just "no crash".

Every stored payload encodes its frame_seq, so any reader can tell whether a frame
carries the bytes stored for it. Per subscriber, delivered + dropped + still queued must
equal the frames offered to it; where the exact number of offers is unknowable
(subscribe/close racing with producers) it must lie between the accepted counts read
just inside and just outside the subscription's lifetime. Every thread must end.

Slack in those windows: a backend may count a frame as accepted and offer it to the
subscribers in two steps (the Cython twin fans out after dropping the ring lock, in
accept order). A subscription that opens or closes between the two steps may or may
not get that frame, so each bound allows one in-flight store per producer thread
(a producer has at most one store in flight). Subscriptions that live through the
whole run have no slack: they must account for exactly ``accepted`` frames.
"""

from __future__ import annotations

import asyncio
import faulthandler
import gc
import itertools
import math
import queue
import sys
import threading

import numpy as np
import pytest

from capsule_sessions import Session, SessionManager, SessionState, SubscriptionClosed
from support import FakeClock, payload

pytestmark = [pytest.mark.stress, pytest.mark.timeout(120)]


@pytest.fixture(autouse=True)
def deadlock_watchdog():
    """A deadlock that holds the GIL would stop pytest-timeout too (its handler needs the
    GIL); faulthandler's C watchdog still fires: it prints every thread's stack and ends
    the run, so a hang becomes a loud failure."""
    faulthandler.dump_traceback_later(WATCHDOG_SECONDS, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(autouse=True)
def frequent_thread_switches():
    """Switch threads every 50 us instead of 5 ms: more interleavings per second, and
    GIL hand-offs stop dominating the run time of these thread-heavy tests."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(5e-5)
    yield
    sys.setswitchinterval(before)

JOIN_SECONDS = 60.0
WATCHDOG_SECONDS = 180.0


class Worker(threading.Thread):
    """A daemon thread that keeps its target's exception for the test to re-raise."""

    def __init__(self, target, *args, name=None):
        super().__init__(daemon=True, name=name)
        self._fn = target
        self._args = args
        self.error = None
        self.result = None

    def run(self):
        try:
            self.result = self._fn(*self._args)
        except BaseException as exc:  # noqa: BLE001 - re-raised by join_all
            self.error = exc


def start_all(workers):
    for w in workers:
        w.start()
    return workers


def join_all(workers, timeout=JOIN_SECONDS):
    for w in workers:
        w.join(timeout)
    alive = [w.name for w in workers if w.is_alive()]
    assert not alive, f"threads still running: {alive}"
    for w in workers:
        if w.error is not None:
            raise w.error
    return [w.result for w in workers]


def check_frame(frame, bad: list) -> None:
    data = frame.data
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 1 and not data.flags.writeable):
        bad.append(("not a read-only 1-D uint8 array", frame.frame_seq))
    if bytes(data) != payload(frame.frame_seq):
        bad.append(("foreign bytes", frame.frame_seq))


def producer_seq(producer: int, i: int) -> int:
    return producer * 1_000_000 + i


def check_per_producer_order(seqs) -> None:
    """A producer stores its frames in order; a subscriber must see them in that order."""
    last = {}
    for seq in seqs:
        p = seq // 1_000_000
        assert seq > last.get(p, -1), f"frame {seq} delivered out of order or twice"
        last[p] = seq


def drain_all(sub, bad):
    """Read until closed and drained (the iteration protocol); returns the frame_seqs."""
    seqs = []
    for frame in sub:
        check_frame(frame, bad)
        seqs.append(frame.frame_seq)
        del frame
    return seqs


def produce(session, producer, count, max_recent):
    accepted = 0
    for i in range(count):
        seq = producer_seq(producer, i)
        if session.store_frame(payload(seq), source="cam", max_recent=max_recent, frame_seq=seq):
            accepted += 1
    return accepted


def test_producers_subscribers_and_latest_readers(backend):
    producers, per_producer, max_recent = 4, 1500, 3
    s = Session("stress", clock=FakeClock(), backend=backend)
    subs = [s.subscribe_visual_frames(4), s.subscribe_visual_frames(64),
            s.subscribe_visual_frames(1, policy="drop_oldest"), s.subscribe_visual_frames(16, policy="drop_oldest")]
    idle = [s.subscribe_visual_frames(5), s.subscribe_visual_frames(5, policy="drop_oldest")]  # never read
    bad: list = []
    drainers = start_all([Worker(drain_all, sub, bad, name=f"drain-{i}") for i, sub in enumerate(subs)])
    done = threading.Event()

    def latest_reader():
        reads = 0
        while not done.is_set() or reads == 0:
            frames = s.latest_visual_frames(math.inf)
            if len(frames) > max_recent:
                bad.append(("ring over max_recent", len(frames)))
            for f in frames:
                check_frame(f, bad)
            check_per_producer_order([f.frame_seq for f in frames])
            reads += 1
        return reads

    readers = start_all([Worker(latest_reader, name=f"latest-{i}") for i in range(2)])
    makers = start_all([Worker(produce, s, p, per_producer, max_recent, name=f"producer-{p}")
                        for p in range(producers)])
    results = join_all(makers)
    done.set()
    join_all(readers)
    total = producers * per_producer
    assert results == [per_producer] * producers
    stats = s.visual_stats()
    assert stats["accepted"] == total and stats["rate_limited"] == 0 and stats["source_resets"] == 0
    assert stats["frames"] == max_recent
    for sub in subs + idle:
        sub.close()
    received = join_all(drainers)
    assert bad == []
    for sub, seqs in zip(subs, received, strict=True):
        check_per_producer_order(seqs)
        assert sub.delivered == len(seqs)
        assert sub.delivered + sub.dropped + sub.qsize() == total
    for sub in idle:
        assert sub.delivered == 0 and sub.qsize() == 5
        assert sub.dropped + sub.qsize() == total
    # the newest frames of an undrained drop_oldest queue come last from every producer
    tail = [sub_frame.frame_seq for sub_frame in idle[1]]
    check_per_producer_order(tail)


def test_rate_limited_producers_keep_exact_books(backend, make_session):
    s = make_session()
    min_interval = 0.0035
    ticks = itertools.count(1)  # next() on a count is atomic: every call gets its own instant
    everything = s.subscribe_visual_frames(2**20)
    calls_per_producer, producers = 1500, 4

    def produce_ticking(p):
        accepted = 0
        for i in range(calls_per_producer):
            seq = producer_seq(p, i)
            if s.store_frame(payload(seq), source="cam", max_recent=2, min_interval=min_interval,
                             frame_seq=seq, now=next(ticks) * 0.001):
                accepted += 1
        return accepted

    accepted = sum(join_all(start_all([Worker(produce_ticking, p) for p in range(producers)])))
    stats = s.visual_stats()
    assert stats["accepted"] == accepted
    assert stats["accepted"] + stats["rate_limited"] == producers * calls_per_producer
    everything.close()
    frames = list(everything)
    bad: list = []
    for f in frames:
        check_frame(f, bad)
    assert bad == []
    assert len(frames) == accepted and everything.dropped == 0
    # accepted frames, in the order they were accepted, are min_interval apart (in ns, as compared)
    min_ns = int(min_interval * 1e9)
    received_ns = [int(f.received_at * 1e9) for f in frames]
    assert all(b - a >= min_ns for a, b in itertools.pairwise(received_ns))


def test_subscribe_close_churn(backend):
    producers = 2
    s = Session("churn", clock=FakeClock(), backend=backend)
    stop = threading.Event()
    bad: list = []

    def producer(p):
        i = 0
        while not stop.is_set() and i < 20_000:
            seq = producer_seq(p, i)
            s.store_frame(payload(seq), source="cam", max_recent=2, frame_seq=seq)
            i += 1
        return i

    def churner(c, rounds):
        checked = 0
        for r in range(rounds):
            policy = "drop_oldest" if (c + r) % 2 else "drop_newest"
            before_subscribe = s.visual_stats()["accepted"]
            sub = s.subscribe_visual_frames(1 + r % 4, policy=policy)
            after_subscribe = s.visual_stats()["accepted"]
            seqs = []
            for _ in range(r % 5):
                try:
                    frame = sub.get(timeout=0.002)
                except queue.Empty:
                    continue
                check_frame(frame, bad)
                seqs.append(frame.frame_seq)
            if r % 7 == 6:
                del sub  # forgotten, not closed: collection must unsubscribe it
                continue
            before_close = s.visual_stats()["accepted"]
            if r % 3:
                sub.close()
            else:
                sub.unsubscribe()
            after_close = s.visual_stats()["accepted"]
            for frame in sub:
                check_frame(frame, bad)
                seqs.append(frame.frame_seq)
            with pytest.raises(SubscriptionClosed):
                sub.get_nowait()
            check_per_producer_order(seqs)
            offered = sub.delivered + sub.dropped + sub.qsize()
            assert sub.qsize() == 0 and sub.delivered == len(seqs)
            slack = producers  # see the module docstring
            assert before_close - after_subscribe - slack <= offered <= after_close - before_subscribe + slack, (
                offered, before_subscribe, after_subscribe, before_close, after_close)
            checked += 1
        return checked

    makers = start_all([Worker(producer, p) for p in range(producers)])
    churners = start_all([Worker(churner, c, 150) for c in range(3)])
    try:
        checked = join_all(churners)
    finally:
        stop.set()
        join_all(makers)
    assert bad == []
    assert sum(checked) > 0
    gc.collect()
    assert s._ring.subscriber_count == 0


def _async_drain(sub, bad):
    async def consume():
        seqs = []
        async for frame in sub:
            check_frame(frame, bad)
            seqs.append(frame.frame_seq)
        return seqs

    return asyncio.run(consume())


def test_delete_and_evict_during_use(backend):
    clock = FakeClock(0.0)
    ended = []
    sessions_n, per_producer = 4, 20_000
    with SessionManager(sessions_n, idle_timeout=5.0, cleanup_interval=None, clock=clock, backend=backend,
                        on_session_end=lambda session: ended.append(session.id)) as m:
        sessions = [m.create(f"s{i}") for i in range(sessions_n)]
        bad: list = []
        subs, readers = {}, []
        for s in sessions:
            subs[s.id] = [s.subscribe_visual_frames(3), s.subscribe_visual_frames(3, policy="drop_oldest"),
                          s.subscribe_visual_frames(8)]
            readers += [Worker(drain_all, subs[s.id][0], bad), Worker(drain_all, subs[s.id][1], bad),
                        Worker(_async_drain, subs[s.id][2], bad)]
        start_all(readers)
        warmed = [threading.Event() for _ in sessions]

        def producer(i, s):
            accepted = 0
            for n in range(per_producer):
                seq = producer_seq(i, n)
                accepted += s.store_frame(payload(seq), source="cam", max_recent=2, frame_seq=seq)
                if n == 200:
                    warmed[i].set()
                s.latest_visual_frames(10.0)
            return accepted

        makers = start_all([Worker(producer, i, s) for i, s in enumerate(sessions)])
        for event in warmed:
            assert event.wait(JOIN_SECONDS)
        window = {}
        for s in sessions[:2]:
            low = s.visual_stats()["accepted"]
            m.delete(s.id)
            window[s.id] = (low, s.visual_stats()["accepted"])
        lows = {s.id: s.visual_stats()["accepted"] for s in sessions[2:]}
        evicted = m.evict_idle(now=clock() + 6.0)
        for s in sessions[2:]:
            window[s.id] = (lows[s.id], s.visual_stats()["accepted"])
        assert sorted(x.id for x in evicted) == ["s2", "s3"]
        received = join_all(readers)  # every reader woke up and finished
        accepted = join_all(makers)
    assert sorted(ended) == [s.id for s in sessions]
    assert m.count() == 0
    assert bad == []
    for i, s in enumerate(sessions):
        assert s.state is SessionState.CLOSED
        assert s.visual_stats()["accepted"] == accepted[i] == per_producer  # storing goes on after the end
        low, high = window[s.id]
        for sub, seqs in zip(subs[s.id], received[3 * i:3 * i + 3], strict=True):
            assert sub.closed and sub.qsize() == 0
            check_per_producer_order(seqs)
            assert sub.delivered == len(seqs)
            # one producer per session: one store may be in flight across the close
            assert low - 1 <= sub.delivered + sub.dropped <= high + 1


def test_many_sessions_many_threads_one_manager(backend):
    """Threads create, use and delete their own sessions on one manager at the same time."""
    m = SessionManager(64, cleanup_interval=None, clock=FakeClock(), backend=backend)
    bad: list = []

    def life(t):
        for r in range(40):
            sid = f"t{t}-{r}"
            s = m.create(sid)
            sub = s.subscribe_visual_frames(2, policy="drop_oldest")
            for i in range(20):
                seq = producer_seq(t, r * 100 + i)
                s.store_frame(payload(seq), source="cam", max_recent=2, frame_seq=seq)
            assert m.get(sid) is s
            m.delete(sid)
            got = list(sub)
            for f in got:
                check_frame(f, bad)
            assert [f.frame_seq for f in got] == [producer_seq(t, r * 100 + 18), producer_seq(t, r * 100 + 19)]
            assert sub.dropped == 18
        return True

    assert join_all(start_all([Worker(life, t) for t in range(6)])) == [True] * 6
    assert bad == [] and m.count() == 0
    m.stop()
