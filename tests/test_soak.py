"""Soak: every part of the library at once, for a while, with the books checked at the end.

Per backend, for two thirds of CAPSULE_SESSIONS_SOAK_SECONDS / len(available_backends())
seconds (default 60 s in total, soak and storms; ``make soak`` sets 600):

- producers, each owning one session at a time: they create it, store frames through
  store_frame / store_visual_frame / ingest_visual_frame (sizes 8 B .. 1 MB, so buffers
  are reused, pooled and reallocated), sometimes rate-limited, sometimes switching
  source, then delete the session or abandon it to idle eviction, and start another;
- sync subscriber threads and asyncio subscriber tasks (on one loop thread), both drop
  policies, that subscribe to a random live session, read for a while, then close, or
  drop the subscription without closing it, or see it closed by the session's end;
- readers of latest_visual_frames, which keep some frames and check later that their
  bytes never changed (buffers are reused underneath);
- a thread that drives the fake clock forward (idle eviction) and calls evict_idle,
  next to the manager's own cleanup thread.

The fake clock only advances once every busy producer has stored (or touched its session)
since the last tick, so a session is idle-evicted only after its producer left it: the
frames a session accepted are final when its subscriptions are closed, which makes each
subscriber's books exact. A per-session lock, held by the producer around each store and
by a subscriber around subscribe and close, makes "offered" countable from visual_stats.

Checked at the end: no exception in any thread; no deadlock (a monitor dumps every stack
with faulthandler and fails the run when nothing was stored for STALL_SECONDS, or when a
thread does not end; faulthandler.dump_traceback_later kills the process as a last
resort); every frame read has exactly the bytes of its frame_seq; per subscriber
delivered + dropped + queued == frames accepted while it was subscribed; each
subscriber saw frame_seq strictly increase; no subscription is left registered; every
Session, Subscription and VisualFrame is gone afterwards; and RSS is flat: the median
of the last quarter's samples exceeds the second quarter's by at most
RSS_TOLERANCE_BYTES + 10 % (allocator noise with up to 1 MB frames in flight; a leak of
the frames stored, or of their Python objects, grows far faster).

test_soak_storm (a third of the budget: finalizer and signal storms, see its section)
runs in child processes too (``python tests/test_soak.py BACKEND callbacks|interrupts``).

Each backend's soak runs in a child process (``python tests/test_soak.py BACKEND``), so a
deadlock fails this test with every stack instead of stopping the whole suite, and RSS
and object counts are the soak's own. Figures (frames/s, sessions and subscriptions
churned, ...) are printed, and appended as JSON lines to $CAPSULE_SESSIONS_SOAK_REPORT
when set.
"""

from __future__ import annotations

import asyncio
import collections
import faulthandler
import gc
import itertools
import json
import math
import os
import queue
import random
import signal
import statistics
import sys
import threading
import time
import traceback

import numpy as np
import pytest

from capsule_sessions import (
    MaxSessionsError,
    Session,
    SessionManager,
    SubscriptionClosed,
    VisualFrame,
    VisualInputConfig,
    available_backends,
)
from capsule_sessions._backend import module_for
from capsule_sessions._limits import NOGIL_COPY_MIN_BYTES
from capsule_sessions.errors import REENTERED_MESSAGE
from support import PACKAGE_ROOT, TESTS_DIR, FakeClock, backend_params, drain

TOTAL_SECONDS = float(os.environ.get("CAPSULE_SESSIONS_SOAK_SECONDS", "60"))
# The callback storms (test_soak_storm) take a third of the budget, the rest is the soak
# above: 20 s + 2 x 5 s per backend by default, 200 s + 2 x 50 s under `make soak`.
STORM_SHARE = 1 / 3
RUN_SECONDS = TOTAL_SECONDS * (1 - STORM_SHARE) / len(available_backends())
STORM_SECONDS = TOTAL_SECONDS * STORM_SHARE / len(available_backends()) / 2  # per mode
STALL_SECONDS = 20.0  # no store completing for this long is a deadlock
JOIN_SECONDS = 30.0
RSS_TOLERANCE_BYTES = 48 << 20
IDLE_TIMEOUT = 10.0  # fake seconds
MAX_SESSIONS = 24
PRODUCERS, SYNC_SUBSCRIBERS, ASYNC_SUBSCRIBERS, LATEST_READERS = 4, 3, 4, 2
SIZES = [8, 64, 1000, 4096, NOGIL_COPY_MIN_BYTES - 1, NOGIL_COPY_MIN_BYTES, 20000, 70000, 300000]
MIME = "video/x-raw-gray"

pytestmark = [pytest.mark.soak, pytest.mark.timeout(int(RUN_SECONDS + JOIN_SECONDS + 240))]


def size_for(seq: int) -> int:
    return 1_048_583 if seq % 101 == 0 else SIZES[seq % len(SIZES)]


def make_payload(seq: int) -> np.ndarray:
    """Frame ``seq``'s bytes: its little-endian int64 repeated, cut to size_for(seq)."""
    size = size_for(seq)
    return np.full(size // 8 + 1, seq, dtype="<i8").view(np.uint8)[:size]


def check_frame(frame) -> None:
    data, seq = frame.data, frame.frame_seq
    assert isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 1, type(data)
    assert not data.flags.writeable, "a handed-out frame is writeable"
    assert data.size == size_for(seq), f"frame {seq}: {data.size} bytes, stored {size_for(seq)}"
    whole = data.size // 8 * 8
    if whole and not (data[:whole].view("<i8") == seq).all():
        raise AssertionError(f"frame {seq} carries foreign bytes")
    tail = data[whole:].tobytes()
    assert tail == int(seq).to_bytes(8, "little", signed=True)[: len(tail)], f"frame {seq}: bad tail"


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Rec:
    """One session as the soak sees it: its producer's lock and how it ended.

    The books keep only ``final`` (a one-item list), never the Rec: holding every
    session ever made would keep every ring's frames alive and look like a leak."""

    __slots__ = ("session", "lock", "max_recent", "done", "ended", "final")

    def __init__(self, session, max_recent: int) -> None:
        self.session = session
        self.lock = threading.Lock()
        self.max_recent = max_recent
        self.done = False  # its producer stores no more
        self.ended = False  # deleted or evicted
        self.final = [None]  # accepted count once the producer is done


class Soak:
    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.clock = FakeClock()
        self.stop = threading.Event()
        self.errors: list = []
        self._local = threading.local()
        self.all_counts: list = []
        self.books: list = []  # (final, session id, accepted before, offered or None, delivered, dropped, queued)
        self.recs: dict = {}
        self.live: list = []
        self.ended: collections.deque = collections.deque(maxlen=16)
        self.reg_lock = threading.Lock()
        self.ids = itertools.count()
        self.seqs = itertools.count(1)
        self.beats = [0] * PRODUCERS
        self.busy = [False] * PRODUCERS
        self.rss: list = []
        self.manager = SessionManager(MAX_SESSIONS, IDLE_TIMEOUT, cleanup_interval=0.02,
                                      on_session_end=self.on_end, clock=self.clock, backend=backend)

    # -- bookkeeping ---------------------------------------------------------------
    @property
    def counts(self) -> collections.Counter:
        """This thread's counters: `+=` on one Counter shared by threads can lose counts."""
        mine = getattr(self._local, "counts", None)
        if mine is None:
            mine = self._local.counts = collections.Counter()
            with self.reg_lock:
                self.all_counts.append(mine)
        return mine

    def total(self, key=None):
        with self.reg_lock:
            counters = list(self.all_counts)
        if key is not None:
            return sum(c.get(key, 0) for c in counters)
        out = collections.Counter()
        for c in counters:
            out.update(c)
        return out

    def guard(self, fn, *args):
        try:
            fn(*args)
        except BaseException:  # noqa: BLE001 - every thread's failure is the test's
            self.errors.append(f"{threading.current_thread().name}:\n{traceback.format_exc()}")
            self.stop.set()

    def on_end(self, session: Session) -> None:
        # Runs on the manager's cleanup thread too, whose exceptions are only logged:
        # a broken promise is recorded, not raised.
        rec = self.recs.pop(session.id, None)
        if rec is None or not rec.done:
            self.errors.append(f"session {session.id} ended while its producer was still storing")
            self.stop.set()
            return
        rec.ended = True
        self.counts["sessions_ended"] += 1
        with self.reg_lock:
            if rec in self.live:
                self.live.remove(rec)
            self.ended.append(rec)

    def pick(self, rng: random.Random):
        with self.reg_lock:
            if not self.live:
                return None
            if self.ended and rng.random() < 0.05:  # now and then one that has ended
                return rng.choice(self.ended)
            return rng.choice(self.live)

    # -- producers -----------------------------------------------------------------
    def producer(self, index: int) -> None:
        rng = random.Random(index)
        while not self.stop.is_set():
            sid = f"s{next(self.ids)}"
            # Busy before the session exists: from here the clock waits for this
            # producer's stores, so its new session cannot go idle under it.
            self.busy[index] = True
            rec = self.recs[sid] = Rec(None, rng.choice([1, 2, 3, 8]))
            try:
                rec.session = self.manager.create(sid)
            except MaxSessionsError:
                self.busy[index] = False  # never block the clock: eviction makes room
                del self.recs[sid]
                self.counts["max_sessions_hit"] += 1
                self.stop.wait(0.005)
                continue
            with self.reg_lock:
                self.live.append(rec)
            self.counts["sessions_created"] += 1
            try:
                self.produce_into(index, rng, rec)
            finally:
                with rec.lock:
                    rec.done = True
                    rec.final[0] = rec.session.visual_stats()["accepted"]
                self.busy[index] = False
            if rng.random() < 0.5:
                self.manager.delete(sid)
                self.counts["sessions_deleted"] += 1
            else:
                self.counts["sessions_abandoned"] += 1  # the clock thread will evict it

    def produce_into(self, index: int, rng: random.Random, rec: Rec) -> None:
        session, keep = rec.session, rec.max_recent
        min_interval = rng.choice([0.0, 0.0, 0.0, 0.5])
        config = VisualInputConfig(frame_interval=min_interval, max_width=1 << 21, max_height=1,
                                   max_frame_bytes=1 << 21, max_recent_frames=keep, mime_types=(MIME,))
        source = "cam"
        for _ in range(rng.randint(200, 4000)):
            if self.stop.is_set():
                return
            seq = next(self.seqs)
            data = make_payload(seq)
            kind = seq % 10
            with rec.lock:
                if kind < 7:
                    ok = session.store_frame(data, source=source, max_recent=keep, min_interval=min_interval,
                                             mime_type=MIME, width=data.size, height=1, frame_seq=seq)
                elif kind < 9:
                    frame = VisualFrame(data, MIME, data.size, 1, source, 0, seq)
                    ok = session.store_visual_frame(frame, keep, min_interval)
                else:
                    frame = VisualFrame(data, MIME, data.size, 1, source, 0, seq)
                    ok = session.ingest_visual_frame(frame, config)
            self.counts["store_calls"] += 1
            if ok:
                self.counts["frames_accepted"] += 1
                self.counts["bytes_accepted"] += data.size
            else:
                session.touch()  # a rate-limited camera is still an active session
            self.beats[index] += 1
            if index and seq % 4 == 0:
                # A camera loop paces itself; without a pause the producers keep the GIL
                # and the readers starve (their books still balance, but on drops).
                # Producer 0 runs flat out, for contention on its rings.
                time.sleep(0.0001)
            roll = rng.random()
            if roll < 0.002:
                source = "cam2" if source == "cam" else "cam"  # the ring resets
                self.counts["source_switches"] += 1
            elif roll < 0.003:
                session.stop_visual_input(source)
                session.start_visual_input(source)
                self.counts["input_restarts"] += 1

    # -- subscribers -----------------------------------------------------------------
    def open_sub(self, rng: random.Random):
        rec = self.pick(rng)
        if rec is None:
            return None, None, None
        with rec.lock:
            before = rec.session.visual_stats()["accepted"]
            sub = rec.session.subscribe_visual_frames(rng.choice([1, 2, 4, 16, 64]),
                                                      policy=rng.choice(["drop_newest", "drop_oldest"]))
        return rec, sub, before

    def read_one(self, frame, last_seq: int, held: collections.deque) -> int:
        check_frame(frame)
        assert frame.frame_seq > last_seq, f"frame {frame.frame_seq} after {last_seq}: order broken"
        if frame.frame_seq % 7 == 0:
            held.append(frame)
        self.counts["frames_delivered"] += 1
        return frame.frame_seq

    def settle(self, rec, sub, before: int, how: str, held: collections.deque) -> None:
        """Close (or drop) ``sub`` and record its books."""
        if how == "drop":
            self.counts["subs_dropped_unclosed"] += 1
            return  # the caller drops its last reference
        if how == "close":
            with rec.lock:
                offered = rec.session.visual_stats()["accepted"] - before
                sub.close()
            self.counts["subs_closed_by_reader"] += 1
        else:
            offered = None  # closed by the session's end: counted once every producer stopped
            self.counts["subs_closed_by_session"] += 1
        self.books.append((rec.final, rec.session.id, before, offered, sub.delivered, sub.dropped, sub.qsize()))
        last = -1
        for frame in sub:  # what was queued at close is still handed out, then it ends
            last = self.read_one(frame, last, held)
        self.books.append((rec.final, rec.session.id, before, offered, sub.delivered, sub.dropped, sub.qsize()))
        for frame in list(held):
            check_frame(frame)  # still the same bytes, whatever the ring reused since
        self.counts["held_frames_rechecked"] += len(held)

    def sync_subscriber(self, index: int) -> None:
        rng = random.Random(100 + index)
        held: collections.deque = collections.deque(maxlen=30)
        while not self.stop.is_set():
            rec, sub, before = self.open_sub(rng)
            if rec is None:
                self.stop.wait(0.002)
                continue
            self.counts["subs_opened_sync"] += 1
            last, got, empties, how = -1, 0, 0, None
            budget = rng.randint(5, 400)
            while got < budget and empties < 25 and not self.stop.is_set():
                try:
                    frame = sub.get(timeout=0.02)
                except queue.Empty:
                    empties += 1
                    continue
                except SubscriptionClosed:
                    how = "ended"
                    break
                last = self.read_one(frame, last, held)
                got += 1
            if how is None:
                how = "close" if rng.random() < 0.8 or self.stop.is_set() else "drop"
            self.settle(rec, sub, before, how, held)
            del sub

    def async_subscribers(self) -> None:
        asyncio.run(self._async_main())

    async def _async_main(self) -> None:
        await asyncio.gather(*(self._async_subscriber(i) for i in range(ASYNC_SUBSCRIBERS)))

    async def _async_subscriber(self, index: int) -> None:
        rng = random.Random(200 + index)
        held: collections.deque = collections.deque(maxlen=30)
        while not self.stop.is_set():
            rec, sub, before = self.open_sub(rng)
            if rec is None:
                await asyncio.sleep(0.002)
                continue
            self.counts["subs_opened_async"] += 1
            state = {"last": -1, "how": None}
            budget = rng.randint(5, 400)

            async def consume():
                got = 0
                if rng.random() < 0.5:
                    async for frame in sub:  # ends when the session's end closes it
                        state["last"] = self.read_one(frame, state["last"], held)
                        got += 1
                        if got >= budget or self.stop.is_set():
                            return
                    state["how"] = "ended"
                    return
                empties = 0
                while got < budget and empties < 25 and not self.stop.is_set():
                    try:
                        frame = await sub.aget(timeout=0.02)
                    except queue.Empty:
                        empties += 1
                        continue
                    except SubscriptionClosed:
                        state["how"] = "ended"
                        return
                    state["last"] = self.read_one(frame, state["last"], held)
                    got += 1

            try:
                await asyncio.wait_for(consume(), timeout=rng.choice([0.05, 0.5, 2.0]))
            except asyncio.TimeoutError:
                self.counts["async_reads_cancelled"] += 1  # cancelled inside aget()
            how = state["how"] or ("close" if rng.random() < 0.8 or self.stop.is_set() else "drop")
            self.settle(rec, sub, before, how, held)
            del sub

    # -- latest readers, clock, monitor ------------------------------------------------
    def latest_reader(self, index: int) -> None:
        rng = random.Random(300 + index)
        held: collections.deque = collections.deque(maxlen=200)
        while not self.stop.is_set():
            rec = self.pick(rng)
            if rec is None:
                self.stop.wait(0.002)
                continue
            frames = rec.session.latest_visual_frames(rng.choice([0.5, 2.0, 5.0, math.inf]))
            self.counts["latest_calls"] += 1
            assert len(frames) <= rec.max_recent, f"{len(frames)} frames held, max_recent={rec.max_recent}"
            seqs = [f.frame_seq for f in frames]
            assert seqs == sorted(set(seqs)), f"latest out of order: {seqs}"
            assert len({f.source for f in frames}) <= 1, "frames of two sources in one ring"
            for frame in frames:
                check_frame(frame)
            held.extend(frames[-1:])
            self.counts["latest_frames"] += len(frames)
            if rng.random() < 0.05:
                for frame in held:
                    check_frame(frame)
                self.counts["held_frames_rechecked"] += len(held)

    def clock_driver(self) -> None:
        seen = list(self.beats)
        ticks = 0
        while not self.stop.is_set():
            if all(not busy or beat != last for busy, beat, last in zip(self.busy, self.beats, seen, strict=True)):
                seen = list(self.beats)
                self.clock.advance(1.0)
                ticks += 1
                if ticks % 4 == 0:
                    self.counts["sessions_evicted_by_clock_thread"] += len(self.manager.evict_idle())
            else:
                self.stop.wait(0.0005)
        self.counts["clock_ticks"] = ticks

    def monitor(self, started: float) -> None:
        last_calls, last_progress = -1, time.monotonic()
        while not self.stop.wait(0.25):
            now = time.monotonic()
            self.rss.append((now - started, rss_bytes()))
            calls = self.total("store_calls")
            if calls != last_calls:
                last_calls, last_progress = calls, now
                # Re-armed while stores complete. A thread stuck holding the GIL stops
                # this monitor too; then faulthandler's own thread dumps every stack and
                # ends the process.
                faulthandler.dump_traceback_later(STALL_SECONDS + JOIN_SECONDS + 10, exit=True)
            elif now - last_progress > STALL_SECONDS:
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                self.errors.append(f"deadlock: no store completed for {STALL_SECONDS} s (stacks on stderr)")
                self.stop.set()
            if now - started >= RUN_SECONDS:
                self.stop.set()


def count_live(kinds) -> int:
    return sum(1 for o in gc.get_objects() if isinstance(o, kinds))


TRACKED = {
    "Session": (Session,),
    "VisualFrame": (VisualFrame,),
    "Subscription": tuple(module_for(b).Subscription for b in available_backends()),
}


def run_soak(backend: str) -> dict:
    soak = Soak(backend)
    threads = [threading.Thread(target=soak.guard, args=(soak.producer, i), name=f"producer-{i}", daemon=True)
               for i in range(PRODUCERS)]
    threads += [threading.Thread(target=soak.guard, args=(soak.sync_subscriber, i), name=f"sync-sub-{i}", daemon=True)
                for i in range(SYNC_SUBSCRIBERS)]
    threads += [threading.Thread(target=soak.guard, args=(soak.async_subscribers,), name="async-subs", daemon=True)]
    threads += [threading.Thread(target=soak.guard, args=(soak.latest_reader, i), name=f"latest-{i}", daemon=True)
                for i in range(LATEST_READERS)]
    threads += [threading.Thread(target=soak.guard, args=(soak.clock_driver,), name="clock", daemon=True)]
    started = time.monotonic()
    monitor = threading.Thread(target=soak.guard, args=(soak.monitor, started), name="monitor", daemon=True)
    for t in threads + [monitor]:
        t.start()
    monitor.join(RUN_SECONDS + STALL_SECONDS + JOIN_SECONDS)
    soak.stop.set()
    deadline = time.monotonic() + JOIN_SECONDS
    for t in threads + [monitor]:
        t.join(max(0.0, deadline - time.monotonic()))
    elapsed = time.monotonic() - started
    faulthandler.dump_traceback_later(CHILD_DEADLINE, exit=True)  # for the checks below
    stuck = [t.name for t in threads + [monitor] if t.is_alive()]
    if stuck:
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        pytest.fail(f"[{backend}] threads did not end (deadlock?): {stuck}; stacks on stderr")
    assert not soak.errors, f"[{backend}] {len(soak.errors)} thread failures:\n" + "\n".join(soak.errors[:5])

    # Books: every producer has stopped, so a session's accepted count is final.
    offered_total = dropped_total = 0
    for i, (final, sid, before, offered, delivered, dropped, queued) in enumerate(soak.books):
        if offered is None:
            offered = final[0] - before
        if i % 2:  # each subscription is booked twice: at close and after draining
            offered_total += offered
            dropped_total += dropped
        assert delivered + dropped + queued == offered, (
            f"[{backend}] session {sid}: delivered {delivered} + dropped {dropped} + queued {queued}"
            f" != offered {offered}")
    # Subscriptions dropped without close() must not stay registered: one more store
    # (which prunes them in the compiled twin) and every live session has none left.
    for session in soak.manager.list():
        session.store_frame(b"last", source="cam", max_recent=1)
        assert session._ring.subscriber_count == 0, f"[{backend}] {session.id} still has subscribers"
    for session in soak.manager.list():
        soak.manager.delete(session.id)
    soak.manager.stop()

    samples = soak.rss
    n = len(samples)
    q2 = [rss for _, rss in samples[n // 4: n // 2]]
    q4 = [rss for _, rss in samples[3 * n // 4:]]
    c = soak.total()
    figures = {
        "backend": backend,
        "seconds": round(elapsed, 1),
        "frames_accepted": c["frames_accepted"],
        "frames_per_second": round(c["frames_accepted"] / elapsed),
        "megabytes_per_second": round(c["bytes_accepted"] / elapsed / 1e6, 1),
        "store_calls": c["store_calls"],
        "frames_offered_to_subscribers": offered_total,
        "frames_delivered_to_subscribers": c["frames_delivered"],
        "frames_dropped_for_slow_subscribers": dropped_total,
        "latest_calls": c["latest_calls"],
        "sessions_created": c["sessions_created"],
        "sessions_deleted": c["sessions_deleted"],
        "sessions_abandoned": c["sessions_abandoned"],
        "sessions_evicted_idle": c["sessions_ended"] - c["sessions_deleted"],
        "subscriptions_opened_sync": c["subs_opened_sync"],
        "subscriptions_opened_async": c["subs_opened_async"],
        "subscriptions_closed_by_reader": c["subs_closed_by_reader"],
        "subscriptions_closed_by_session_end": c["subs_closed_by_session"],
        "subscriptions_dropped_without_close": c["subs_dropped_unclosed"],
        "async_reads_cancelled": c["async_reads_cancelled"],
        "source_switches": c["source_switches"] + c["input_restarts"],
        "held_frames_rechecked": c["held_frames_rechecked"],
        "max_sessions_hit": c["max_sessions_hit"],
        "clock_ticks": c["clock_ticks"],
        "books_checked": len(soak.books),
        "rss_q2_median_mb": round(statistics.median(q2) / 2**20, 1) if q2 else None,
        "rss_q4_median_mb": round(statistics.median(q4) / 2**20, 1) if q4 else None,
        "rss_max_mb": round(max(r for _, r in samples) / 2**20, 1) if samples else None,
    }
    assert c["frames_accepted"] > 0 and c["frames_delivered"] > 0 and c["latest_frames"] > 0, figures
    assert c["subs_opened_sync"] and c["subs_opened_async"] and c["sessions_created"] > PRODUCERS, figures
    if len(q2) >= 4 and len(q4) >= 4:
        grown = statistics.median(q4) - statistics.median(q2)
        allowed = RSS_TOLERANCE_BYTES + 0.10 * statistics.median(q2)
        assert grown <= allowed, (
            f"[{backend}] RSS grew {grown / 2**20:.1f} MB between the 2nd and last quarter: {figures}")
    return figures


def soak_in_this_process(backend: str) -> dict:
    sys.setswitchinterval(5e-4)  # more interleavings per second than the default 5 ms
    gc.collect()
    baseline = {name: count_live(kinds) for name, kinds in TRACKED.items()}
    figures = run_soak(backend)
    gc.collect()
    after = {name: count_live(kinds) for name, kinds in TRACKED.items()}
    assert after == baseline, f"objects outlived the soak: before {baseline}, after {after}"
    figures["objects_left"] = {k: after[k] - baseline[k] for k in after}
    return figures


# -- callback storms: finalizers and signal handlers that call back into sessions -------
#
# test_soak_storm (per backend, STORM_SECONDS per mode, in a child process like the soak):
#
# - the main thread stores into sessions A and B; a SIGALRM timer (setitimer, every
#   0.3 ms) runs handlers that call visual_stats(), latest_visual_frames() and
#   store_frame() on the session being stored into, and in mode "interrupts" sometimes
#   raise KeyboardInterrupt, which store_frame must let through with its frame booked;
# - a producer thread stores into A and F (contention with the main thread's stores:
#   fan-outs wait for each other's runner);
# - gc.set_threshold(5): reference cycles with a __del__ that calls F.store_frame,
#   F.visual_stats, F.latest_visual_frames, or subscribes to F and closes that
#   subscription at once, are collected wherever any thread allocates;
# - two reader threads read A, B and F (get with timeouts), check every frame's bytes,
#   and subscribe to and close subscriptions of A and B now and then.
#
# A lock per session, held around each store (signal handlers act only while the main
# thread is inside a store, so under that lock) and around subscribe and close, makes
# each subscriber's offered count exact: checked at the end, as in the soak, after one
# more store that must be accepted and offered to every open subscriber; a call
# re-entered from a finalizer must complete or raise RuntimeError(REENTERED_MESSAGE);
# nothing may stall (the same monitor and faulthandler deadline as the soak).

STORM_TIMER_S = 0.0003
STORM_STALL_SECONDS = 5.0
STORM_GC_THRESHOLD = 5


class StormFinalizer:
    """Garbage in a reference cycle whose __del__ calls back into session F."""

    __slots__ = ("storm", "kind", "cycle", "__weakref__")

    def __init__(self, storm, kind: str) -> None:
        self.storm = storm
        self.kind = kind
        self.cycle = self

    def __del__(self) -> None:
        self.storm.finalize(self.kind)


class Storm:
    def __init__(self, backend: str, interrupts: bool) -> None:
        self.backend = backend
        self.interrupts = interrupts
        self.stop = threading.Event()
        self.errors: list = []
        self.counts: collections.Counter = collections.Counter()  # main thread and handlers only
        self.thread_counts: dict = {}
        self.seqs = itertools.count(1)
        self.sessions = {name: Session(name, clock=FakeClock(), backend=backend) for name in "ABF"}
        self.locks = {name: threading.Lock() for name in "ABF"}
        self.books: list = []  # [session name, sub, accepted at subscribe, at close or None]
        self.books_lock = threading.Lock()
        self.armed: str | None = None  # the session the main thread is storing into
        self.in_finalizer = 0  # finalizers running on the main thread
        self.handler_rng = random.Random(7)
        self.stores_done = 0

    def count(self, key: str, n: int = 1) -> None:
        mine = self.thread_counts.setdefault(threading.get_ident(), collections.Counter())
        mine[key] += n

    # -- what the callbacks do -----------------------------------------------------
    def finalize(self, kind: str) -> None:
        f = self.sessions["F"]
        main = threading.current_thread() is threading.main_thread()
        if main:
            self.in_finalizer += 1  # signal handlers stand aside: CPython would drop their exception here
        try:
            # Small frames (frame_seq 1: 64 bytes), and only a count of what latest holds:
            # a finalizer runs wherever any thread allocates, so it must be cheap, or the
            # thread running a chain of them would not get back to its own work.
            if kind == "store":
                f.store_frame(make_payload(1), source="cam", max_recent=2, frame_seq=1)
            elif kind == "visual_stats":
                f.visual_stats()
            elif kind == "latest":
                assert len(f.latest_visual_frames(math.inf)) <= 3
            else:  # subscribe, then close at once: both always complete or refuse cleanly
                f.subscribe_visual_frames(1).close()
            self.count(f"finalizer_{kind}_completed")
        except RuntimeError as exc:
            if str(exc) != REENTERED_MESSAGE:
                self.errors.append(f"finalizer {kind}: RuntimeError({exc})")
            self.count(f"finalizer_{kind}_reentered")
        except BaseException as exc:  # noqa: BLE001 - a finalizer's exception is only printed
            self.errors.append(f"finalizer {kind}: {type(exc).__name__}({exc})")
            self.stop.set()
        finally:
            if main:
                self.in_finalizer -= 1

    def on_signal(self, signum, frame) -> None:
        name = self.armed
        if name is None or self.in_finalizer:
            return  # only while the main thread stores (so under that session's lock)
        self.armed = None  # a handler interrupted by the next signal does nothing more
        try:
            self._handle(self.sessions[name])
        finally:
            self.armed = name

    def _handle(self, session) -> None:
        roll = self.handler_rng.random()
        self.counts["signals_handled"] += 1
        try:
            if roll < 0.3:
                session.visual_stats()
                self.counts["handler_visual_stats"] += 1
            elif roll < 0.55:
                for f in session.latest_visual_frames(math.inf):
                    check_frame(f)
                self.counts["handler_latest"] += 1
            elif roll < 0.8 or not self.interrupts:
                seq = next(self.seqs)
                session.store_frame(make_payload(seq), source="cam", max_recent=3, frame_seq=seq)
                self.counts["handler_store_completed"] += 1
            else:
                self.counts["handler_keyboard_interrupts"] += 1
                raise KeyboardInterrupt
        except RuntimeError as exc:
            if str(exc) != REENTERED_MESSAGE:
                self.errors.append(f"signal handler: RuntimeError({exc})")
            self.counts["handler_reentered"] += 1

    # -- threads -----------------------------------------------------------------------
    def main_loop(self, seconds: float) -> None:
        rng = random.Random(1)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self.stop.is_set():
            name = rng.choice("AB")
            for _ in range(rng.randint(0, 3)):
                StormFinalizer(self, rng.choice(["store", "store", "visual_stats", "latest", "subscribe"]))
            seq = next(self.seqs)
            data = make_payload(seq)
            with self.locks[name]:
                try:
                    self.armed = name
                    self.sessions[name].store_frame(data, source="cam", max_recent=3, frame_seq=seq)
                    self.armed = None
                    self.counts["main_stores_completed"] += 1
                except KeyboardInterrupt:
                    self.armed = None
                    self.counts["main_stores_interrupted"] += 1
            self.stores_done += 1

    def progress(self) -> int:
        return self.stores_done + sum(c.get("producer_stores", 0) for c in list(self.thread_counts.values()))

    def producer(self) -> None:
        rng = random.Random(2)
        while not self.stop.is_set():
            name = rng.choice("AF")
            for _ in range(rng.randint(0, 2)):
                StormFinalizer(self, rng.choice(["store", "visual_stats", "latest", "subscribe"]))
            seq = next(self.seqs)
            with self.locks[name]:
                self.sessions[name].store_frame(make_payload(seq), source="cam", max_recent=3, frame_seq=seq)
            self.count("producer_stores")
            if seq % 8 == 0:
                time.sleep(0.0002)

    def subscribe(self, name: str, rng: random.Random):
        with self.locks[name]:
            before = self.sessions[name].visual_stats()["accepted"]
            sub = self.sessions[name].subscribe_visual_frames(rng.choice([1, 2, 8]),
                                                              policy=rng.choice(["drop_newest", "drop_oldest"]))
        rec = [name, sub, before, None]
        with self.books_lock:
            self.books.append(rec)
        return rec

    def reader(self, index: int) -> None:
        rng = random.Random(10 + index)
        mine = [self.subscribe(name, rng) for name in "ABF"]
        while not self.stop.is_set():
            rec = rng.choice(mine)
            for _ in range(rng.randint(1, 50)):
                try:
                    frame = rec[1].get(timeout=0.01)
                except queue.Empty:
                    break
                check_frame(frame)  # (accept order is the soak's check: here seqs are drawn out of it)
                self.count("frames_read")
            if rec[0] != "F" and rng.random() < 0.05:
                with self.locks[rec[0]]:
                    rec[3] = self.sessions[rec[0]].visual_stats()["accepted"]
                    rec[1].close()
                self.count("subscriptions_closed")
                mine[mine.index(rec)] = self.subscribe(rec[0], rng)
                self.count("subscriptions_opened")

    def guard(self, fn, *args) -> None:
        try:
            fn(*args)
        except BaseException:  # noqa: BLE001
            self.errors.append(f"{threading.current_thread().name}:\n{traceback.format_exc()}")
            self.stop.set()

    def monitor(self) -> None:
        last, since = -1, time.monotonic()
        while not self.stop.wait(0.25):
            done = self.progress()
            if done != last:
                last, since = done, time.monotonic()
            elif time.monotonic() - since > STORM_STALL_SECONDS:
                # Stores complete by the thousand per second here: a pause this long is a
                # hang, and a hung main thread would keep the child alive until its
                # deadline, so end it now, with every stack.
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                print(f"deadlock: no store completed for {STORM_STALL_SECONDS} s (stacks above)", file=sys.stderr,
                      flush=True)
                os._exit(3)


def run_storm(backend: str, interrupts: bool) -> dict:
    storm = Storm(backend, interrupts)
    threads = [threading.Thread(target=storm.guard, args=(storm.producer,), name="producer", daemon=True)]
    threads += [threading.Thread(target=storm.guard, args=(storm.reader, i), name=f"reader-{i}", daemon=True)
                for i in range(2)]
    threads.append(threading.Thread(target=storm.guard, args=(storm.monitor,), name="monitor", daemon=True))
    old_threshold = gc.get_threshold()
    old_handler = signal.signal(signal.SIGALRM, storm.on_signal)
    started = time.monotonic()
    for t in threads:
        t.start()
    gc.set_threshold(STORM_GC_THRESHOLD, old_threshold[1], old_threshold[2])
    signal.setitimer(signal.ITIMER_REAL, STORM_TIMER_S, STORM_TIMER_S)
    try:
        storm.guard(storm.main_loop, STORM_SECONDS)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, old_handler)
        gc.set_threshold(*old_threshold)
        storm.stop.set()
    for t in threads:
        t.join(JOIN_SECONDS)
    elapsed = time.monotonic() - started
    stuck = [t.name for t in threads if t.is_alive()]
    if stuck:
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        pytest.fail(f"[{backend}] storm threads did not end (deadlock?): {stuck}; stacks on stderr")
    gc.collect()
    assert not storm.errors, f"[{backend}] {len(storm.errors)} failures:\n" + "\n".join(storm.errors[:5])

    # One more store per session, at rest: accepted and offered to every open subscriber.
    open_before = [(rec, rec[1].delivered + rec[1].dropped + rec[1].qsize()) for rec in storm.books if rec[3] is None]
    for name, session in storm.sessions.items():
        assert session.store_frame(make_payload(1), source="cam", max_recent=3, frame_seq=1) is True, name
    for rec, before in open_before:
        booked = rec[1].delivered + rec[1].dropped + rec[1].qsize()
        assert booked == before + 1, (
            f"[{backend}] the store after the storm reached subscriber of {rec[0]} {booked - before} times")
    final = {name: s.visual_stats()["accepted"] for name, s in storm.sessions.items()}
    for name, sub, opened, closed in storm.books:
        offered = (final[name] if closed is None else closed) - opened
        booked = sub.delivered + sub.dropped + sub.qsize()
        assert booked == offered, (
            f"[{backend}] session {name}: delivered {sub.delivered} + dropped {sub.dropped} + queued {sub.qsize()}"
            f" != offered {offered}")
        for frame in drain(sub):
            check_frame(frame)
    counts = collections.Counter(storm.counts)
    for c in storm.thread_counts.values():
        counts.update(c)
    assert counts["signals_handled"] and counts["main_stores_completed"] and counts["frames_read"], counts
    if interrupts:
        assert counts["main_stores_interrupted"], counts
    figures = {"backend": backend, "mode": "interrupts" if interrupts else "callbacks", "seconds": round(elapsed, 1),
               "books_checked": len(storm.books), "accepted": sum(final.values())}
    figures.update(sorted(counts.items()))
    return figures


# The child's own last resort: a thread stuck holding the GIL stops even the monitor;
# faulthandler then dumps every stack and ends the child.
CHILD_DEADLINE = RUN_SECONDS + STALL_SECONDS + 2 * JOIN_SECONDS + 60


def _run_child(capsys, label: str, *args: str) -> dict:
    import subprocess

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_ROOT), str(TESTS_DIR), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True,
                          timeout=CHILD_DEADLINE + 60, stdin=subprocess.DEVNULL)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and lines, (
        f"{label} failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-12000:]}")
    figures = json.loads(lines[-1])
    with capsys.disabled():
        print(f"\n{label}: " + ", ".join(f"{k}={v}" for k, v in figures.items() if k != "backend"))
    report = os.environ.get("CAPSULE_SESSIONS_SOAK_REPORT")
    if report:
        with open(report, "a") as f:
            f.write(json.dumps(figures) + "\n")
    return figures


def test_soak(backend, capsys):
    _run_child(capsys, f"soak[{backend}]", backend)




def _storm_params():
    return [pytest.param(*backend.values, mode, id=f"{backend.id}-{mode}", marks=backend.marks)
            for backend in backend_params() for mode in ("callbacks", "interrupts")]


@pytest.mark.parametrize("backend_name, mode", _storm_params())
def test_soak_storm(backend_name, mode, capsys):
    """Finalizer and signal storms calling back into sessions while threads store and
    read (see the section above); "interrupts" adds handlers raising KeyboardInterrupt."""
    _run_child(capsys, f"soak-storm[{backend_name}-{mode}]", backend_name, mode)


if __name__ == "__main__":
    faulthandler.dump_traceback_later(CHILD_DEADLINE, exit=True)
    try:
        if len(sys.argv) > 2:  # a storm: callbacks or interrupts
            sys.setswitchinterval(5e-4)
            result = run_storm(sys.argv[1], sys.argv[2] == "interrupts")
        else:
            result = soak_in_this_process(sys.argv[1])
    except BaseException:
        traceback.print_exc()
        sys.exit(1)
    faulthandler.cancel_dump_traceback_later()
    print(json.dumps(result), flush=True)
