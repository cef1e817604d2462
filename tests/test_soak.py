"""Soak: every part of the library at once, for a while, with the books checked at the end.

Per backend, for CAPSULE_SESSIONS_SOAK_SECONDS / len(available_backends()) seconds
(default 60 s in total; ``make soak`` sets 600):

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
import statistics
import sys
import threading
import time
import traceback

import numpy as np
import pytest

from pathlib import Path

import capsule_sessions
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
from support import FakeClock

TOTAL_SECONDS = float(os.environ.get("CAPSULE_SESSIONS_SOAK_SECONDS", "60"))
RUN_SECONDS = TOTAL_SECONDS / len(available_backends())
STALL_SECONDS = 20.0  # no store completing for this long is a deadlock
JOIN_SECONDS = 30.0
RSS_TOLERANCE_BYTES = 48 << 20
IDLE_TIMEOUT = 10.0  # fake seconds
MAX_SESSIONS = 24
PRODUCERS, SYNC_SUBSCRIBERS, ASYNC_SUBSCRIBERS, LATEST_READERS = 4, 3, 4, 2
SIZES = [8, 64, 1000, 4096, 16383, 16384, 20000, 70000, 300000]
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
            if all(not busy or beat != last for busy, beat, last in zip(self.busy, self.beats, seen)):
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
        assert grown <= allowed, f"[{backend}] RSS grew {grown / 2**20:.1f} MB between the 2nd and last quarter: {figures}"
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


PACKAGE_ROOT = Path(capsule_sessions.__file__).resolve().parent.parent
TESTS_DIR = Path(__file__).resolve().parent
# The child's own last resort: a thread stuck holding the GIL stops even the monitor;
# faulthandler then dumps every stack and ends the child.
CHILD_DEADLINE = RUN_SECONDS + STALL_SECONDS + 2 * JOIN_SECONDS + 60


def test_soak(backend, capsys):
    import subprocess

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_ROOT), str(TESTS_DIR), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, __file__, backend], env=env, capture_output=True, text=True,
                          timeout=CHILD_DEADLINE + 60, stdin=subprocess.DEVNULL)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and lines, (
        f"soak[{backend}] failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-12000:]}")
    figures = json.loads(lines[-1])
    with capsys.disabled():
        print(f"\nsoak[{backend}]: " + ", ".join(f"{k}={v}" for k, v in figures.items() if k != "backend"))
    report = os.environ.get("CAPSULE_SESSIONS_SOAK_REPORT")
    if report:
        with open(report, "a") as f:
            f.write(json.dumps(figures) + "\n")


if __name__ == "__main__":
    faulthandler.dump_traceback_later(CHILD_DEADLINE, exit=True)
    try:
        result = soak_in_this_process(sys.argv[1])
    except BaseException:
        traceback.print_exc()
        sys.exit(1)
    faulthandler.cancel_dump_traceback_later()
    print(json.dumps(result), flush=True)
