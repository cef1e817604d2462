"""Shared sessions across processes (issue 12's guarantees), with spawned reader
processes (``shm_child.py``, driven over a pipe; never fork) and bounded in time.

Each test has its own namespace and the ``world`` fixture: every child it started is
killed at the end, and /dev/shm must then hold nothing of that namespace.
"""

from __future__ import annotations

import asyncio
import os
import queue
import random
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from capsule_sessions import Session, SessionNotFoundError, attach, list_shared
from capsule_sessions.errors import SharedMemoryError, SubscriptionClosed
from shm_support import (
    OFF_READERS,
    SHM_DIR,
    Header,
    Sub,
    claimed_by,
    data_entries,
    describe,
    entries,
    patch_file,
    stamp,
    stamp_digest,
    sub_offset,
)
from support import FakeClock, child_env

pytestmark = [pytest.mark.cython]
# As tests/test_fuzz.py: CAPSULE_SESSIONS_FUZZ_EXAMPLES scales the hypothesis examples.
SCALE = float(os.environ.get("CAPSULE_SESSIONS_FUZZ_EXAMPLES", "1"))
DERANDOMIZE = os.environ.get("CAPSULE_SESSIONS_FUZZ_RANDOM", "") in ("", "0")

DIGEST = 8  # index of the bytes hash in a described frame
SEQ = 0

# -- 1. differential: the same operations in-process and across processes ----------------

SOURCES = ("a", "b")
store_op = st.tuples(st.just("store"), st.sampled_from(SOURCES), st.integers(1, 4),
                     st.sampled_from([0.0, 0.0, 0.05, 0.2]), st.sampled_from([1, 7, 64, 4096, 20000]),
                     st.sampled_from([0.0, 0.01, 0.04, 0.1, 0.5]), st.sampled_from(["", "image/jpeg"]),
                     st.integers(0, 3))
other_op = st.one_of(
    st.tuples(st.just("start"), st.sampled_from(SOURCES), st.sampled_from([0.0, 0.1])),
    st.tuples(st.just("stop"), st.sampled_from(("",) + SOURCES), st.sampled_from([0.0, 0.1])),
    st.tuples(st.just("sub"), st.integers(1, 3), st.sampled_from(["drop_newest", "drop_oldest"])),
    st.tuples(st.just("drain"), st.integers(0, 7), st.sampled_from([None, 1])),
    st.tuples(st.just("close_sub"), st.integers(0, 7)),
    st.tuples(st.just("latest"), st.sampled_from([0.0, 0.05, 0.1, 0.3, 1.0, 10.0]),
              st.sampled_from([0.0, 0.05, -0.01, 0.2])),
    st.tuples(st.just("stats")),
    st.tuples(st.just("counters"), st.integers(0, 7)),
)
# Stores about half the time, and long sequences: 15 examples must reach full queues,
# rate limits, source switches and evictions, not only the short lists hypothesis
# starts with. Every sequence opens with a subscription so the queues see every store.
ops_strategy = st.tuples(
    st.tuples(st.just("sub"), st.integers(1, 3), st.sampled_from(["drop_newest", "drop_oldest"])),
    st.lists(st.composite(lambda draw: draw(store_op) if draw(st.integers(0, 9)) < 5 else draw(other_op))(),
             min_size=30, max_size=60),
).map(lambda t: [t[0], *t[1]])

FIVE = ("accepted", "rate_limited", "source_resets", "frames", "bytes")


def local_drain(sub, limit):
    import queue

    frames, closed = [], False
    while limit is None or len(frames) < limit:
        try:
            frames.append(describe(sub.get_nowait()))
        except queue.Empty:
            break
        except SubscriptionClosed:
            closed = True
            break
    return [frames, closed]


def local_counters(sub):
    return {"dropped": sub.dropped, "delivered": sub.delivered, "qsize": sub.qsize(), "empty": sub.empty(),
            "full": sub.full(), "closed": sub.closed}


class Differential:
    """Drives one in-process session and one shared session (written here, read by the
    reader process) with the same operations; each step's two results must be equal."""

    def __init__(self, world, reader, session_id):
        self.local = Session(session_id + "-local", clock=FakeClock())
        self.shared = world.session(session_id, clock=FakeClock())
        self.reader = reader
        reader.call("attach", h="h", id=session_id, ns=world.ns)
        self.local_subs = []
        self.n_subs = 0
        self.t = 1000.0
        self.seq = 0

    def step(self, o):
        kind = o[0]
        if kind == "store":
            _, source, keep, interval, nbytes, dt, mime, dims = o
            self.t += dt
            self.seq += 1
            data = stamp(self.seq, nbytes)
            kw = dict(source=source, max_recent=keep, min_interval=interval, mime_type=mime, width=dims * 2,
                      height=dims, timestamp_ms=self.seq * 33, frame_seq=self.seq, now=self.t)
            return self.local.store_frame(data, **kw), self.shared.store_frame(data, **kw)
        if kind in ("start", "stop"):
            _, source, dt = o
            self.t += dt
            getattr(self.local, f"{kind}_visual_input")(source, now=self.t)
            getattr(self.shared, f"{kind}_visual_input")(source, now=self.t)
            return None, None
        if kind == "sub":
            _, buffer, policy = o
            sub = self.local.subscribe_visual_frames(buffer, policy=policy)
            self.local_subs.append(sub)
            remote = self.reader.call("subscribe", h="h", s=str(self.n_subs), buffer=buffer, policy=policy)
            self.n_subs += 1
            return local_counters(sub), remote
        if kind == "latest":
            _, ttl, offset = o
            now = self.t + offset
            return ([describe(f) for f in self.local.latest_visual_frames(ttl, now=now)],
                    self.reader.call("latest", h="h", ttl=ttl, now=now))
        if kind == "stats":
            local = self.local.visual_stats()
            remote = self.reader.call("stats", h="h")
            assert remote["copied_out"] == 0
            assert set(local) == set(FIVE)
            own = self.shared.visual_stats()
            assert {k: own[k] for k in FIVE} == local
            return local, {k: remote[k] for k in FIVE}
        if not self.local_subs:
            return None, None
        k = o[1] % len(self.local_subs)
        sub = self.local_subs[k]
        if kind == "drain":
            return local_drain(sub, o[2]), self.reader.call("drain", s=str(k), limit=o[2])
        if kind == "close_sub":
            sub.close()
            self.reader.call("close_sub", s=str(k))
            return local_counters(sub), self.reader.call("counters", s=str(k))
        if kind == "counters":
            return local_counters(sub), self.reader.call("counters", s=str(k))
        raise AssertionError(kind)

    def finish(self):
        results = [self.step(("stats",)), self.step(("latest", 10.0, 0.0))]
        for k in range(len(self.local_subs)):
            results.append(self.step(("drain", k, None)))
            results.append(self.step(("counters", k)))
        for k in range(self.n_subs):
            self.reader.call("drop_sub", s=str(k))
        self.reader.call("drop_handle", h="h")
        self.shared._close()
        self.local._close()
        return results


_example = [0]


@pytest.mark.timeout(120 * max(1.0, SCALE))
def test_differential_in_process_and_across_processes(world):
    """Guarantee: semantics are the in-process ring's, exactly. The same operations on
    an in-process session and on a shared one read from another process give the same
    frames (fields and bytes), counters and stats at every step."""
    reader = world.reader(deadline=110 * max(1.0, SCALE))

    # No shrinking: a failure names its step and operation, and shrinking sequences this
    # long through a child process can take minutes.
    @settings(max_examples=max(1, int(15 * SCALE)), deadline=None, derandomize=DERANDOMIZE, database=None,
              phases=[Phase.explicit, Phase.reuse, Phase.generate],
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                     HealthCheck.data_too_large])
    @given(ops=ops_strategy)
    def run(ops):
        _example[0] += 1
        reader.call("reset")
        d = Differential(world, reader, f"diff{_example[0]}")
        try:
            for i, o in enumerate(ops):
                local, remote = d.step(o)
                assert local == remote, f"step {i} {o}: in-process {local!r} != shared {remote!r}"
            for local, remote in d.finish():
                assert local == remote, f"at the end: in-process {local!r} != shared {remote!r}"
        finally:
            d.shared._close()
            d.local._close()

    run()
    assert reader.stop() == 0


# -- 2. a reader killed while it holds frames and queue entries --------------------------

KB = 1024


def timed_store(session, seq, nbytes, durations, **kw):
    """Store one stamped frame; append (wall seconds, this thread's CPU seconds)."""
    data = stamp(seq, nbytes)
    t0, c0 = time.perf_counter(), time.thread_time()
    accepted = session.store_frame(data, source="cam", max_recent=2, frame_seq=seq, **kw)
    durations.append((time.perf_counter() - t0, time.thread_time() - c0))
    return accepted


def assert_never_waited(durations):
    """No store waited or spun: CPU time per store stays small, and wall time only
    grows as far as a loaded machine's scheduler stretches it (a store that waited for
    a reader would sleep for its wait slices, or for ever)."""
    wall = max(d[0] for d in durations)
    cpu = max(d[1] for d in durations)
    assert cpu < 0.2, f"a store used {cpu:.3f} s of CPU"
    assert wall < 3.0, f"a store took {wall:.3f} s"


def attach_all(session_id, ns, n):
    """n handles on the session (SharedMemoryError when a reader slot is missing)."""
    return [attach(session_id, namespace=ns) for _ in range(n)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("reap", [True, False], ids=["reaped", "zombie"])
def test_killed_reader_is_reclaimed_and_never_stops_the_producer(world, reap):
    """Guarantees 1 and 5: a reader holding every free reader slot, 16 subscriptions
    with queued entries, and leased frames (from latest and from its queues) is killed
    with SIGKILL. The producer goes on storing without blocking or failing; within about
    a second of stores its slots and subscriptions are reclaimed (31 attaches succeed,
    the owner counts no subscriber), and over 1000 frames of changing size the data
    segments in /dev/shm stay bounded. ``zombie``: the dead reader is this process's
    child and not reaped yet, as under a supervisor that has not called wait()."""
    session = world.session("cam")
    ring = session._ring
    durations: list = []
    seq = 0
    for _ in range(3):
        seq += 1
        timed_store(session, seq, 64 * KB, durations)
    reader = world.reader()
    free_slots = 31  # the owner's own reads hold one of the 32
    assert reader.call("attach_many", h="h", id="cam", ns=world.ns, n=40) == free_slots
    with pytest.raises(SharedMemoryError, match="readers attached"):
        attach("cam", namespace=world.ns)
    for i in range(16):
        reader.call("subscribe", h=f"h{i}", s=str(i), buffer=4, policy="drop_oldest" if i % 2 else "drop_newest")
        reader.call("latest", h=f"h{i}", ttl=1e9, hold=f"l{i}")  # leases on ring buffers
    for _ in range(6):
        seq += 1
        timed_store(session, seq, 64 * KB, durations)
    for i in range(0, 16, 2):  # leases from queues; the rest stay queued
        assert len(reader.call("drain", s=str(i), hold=f"q{i}", limit=2)[0]) == 2
    assert ring.subscriber_count == 16
    assert len(data_entries(world.ns)) > 2  # buffers pinned by leases and queues

    os.kill(reader.pid, signal.SIGKILL)
    if reap:
        reader.proc.wait(10)
    killed_at = time.monotonic()
    reclaimed_at = None
    while time.monotonic() - killed_at < 3.0:
        seq += 1
        assert timed_store(session, seq, 64 * KB, durations)
        if ring.subscriber_count == 0:
            try:
                handles = attach_all("cam", world.ns, free_slots)
            except SharedMemoryError:
                pass
            else:
                reclaimed_at = time.monotonic()
                del handles
                break
        time.sleep(0.01)
    assert reclaimed_at is not None, "the killed reader's slots and subscriptions were never reclaimed"
    assert reclaimed_at - killed_at < 1.5, f"reclaimed only after {reclaimed_at - killed_at:.2f} s"

    # Memory follows what is referenced: with nobody holding anything, 1000 frames of
    # changing size leave a bounded number of data segments.
    sizes = [1 * KB, 300 * KB, 40 * KB, 2000 * KB, 8 * KB, 700 * KB]
    most = 0
    for i in range(1000):
        seq += 1
        assert timed_store(session, seq, sizes[i % len(sizes)] + i, durations)
        if i % 10 == 0:
            most = max(most, len(data_entries(world.ns)))
    assert most <= 2 + 4 + 2, f"{most} data segments for a ring of 2"
    assert_never_waited(durations)
    assert session.visual_stats()["accepted"] == seq
    frames = attach("cam", namespace=world.ns).latest_visual_frames(1e9)
    assert [describe(f)[DIGEST] for f in frames] == [stamp_digest(f.frame_seq, len(f.data)) for f in frames]


def reader_index_of(control, pid: int) -> int:
    raw = control.read_bytes()
    return next(r for r in range(32) if struct.unpack_from("<Q", raw, OFF_READERS + 64 * r)[0] == pid)


def store_until(session, predicate, seconds: float) -> float | None:
    """Store frames every 10 ms until ``predicate()``: how long it took (None: never)."""
    begin = time.monotonic()
    seq = 1000
    while time.monotonic() - begin < seconds:
        seq += 1
        session.store_frame(stamp(seq, 4 * KB), source="cam", max_recent=2, frame_seq=seq)
        if predicate():
            return time.monotonic() - begin
        time.sleep(0.01)
    return None


@pytest.mark.timeout(60)
def test_a_reader_killed_as_it_exits_leaves_no_subscription(world):
    """Guarantee 5 at the exit of a reader: the library's exit handler gives the reader
    slot back before the interpreter's finalizers release the subscriptions; a SIGKILL
    between the two (here an exit handler that runs right after the library's) must not
    leave a subscription active with no reader that reaping could find. (A soak run
    that killed readers as they exited once ended with such a subscription.)"""
    session = world.session("cam")
    session.store_frame(stamp(1, 4 * KB), source="cam", max_recent=2, frame_seq=1)
    child = world.popen([sys.executable, "-c", textwrap.dedent(f"""
        import atexit, os, signal, sys
        atexit.register(os.kill, os.getpid(), signal.SIGKILL)  # registered first: runs last
        from capsule_sessions import attach
        cam = attach("cam", namespace={world.ns!r})
        sub = cam.subscribe_visual_frames(buffer=4)
        print("ready", flush=True)
        sys.stdin.readline()
    """)], env=child_env("cython"), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "ready\n"
    for seq in range(2, 5):  # entries queued for it
        session.store_frame(stamp(seq, 4 * KB), source="cam", max_recent=2, frame_seq=seq)
    assert session.shared_stats()["subscriptions"] == 1
    child.stdin.write("exit\n")
    child.stdin.flush()
    assert child.wait(15) == -signal.SIGKILL
    took = store_until(session, lambda: (session.shared_stats()["readers"], session.shared_stats()["subscriptions"])
                       == (1, 0), 3.0)
    assert took is not None and took < 1.5, session.shared_stats()
    # Every subscription slot is free again.
    handle = attach("cam", namespace=world.ns)
    subs = [handle.subscribe_visual_frames() for _ in range(32)]
    handle.close()
    del subs


@pytest.mark.timeout(60)
def test_a_subscription_outliving_its_reader_slot_is_closed_and_touches_nothing(world):
    """After the exit handler gave the slot back (and released its queue, which another
    reader may claim at once), a subscription still referenced is closed: get raises
    SubscriptionClosed, the counters read as released, and nothing is written into the
    queue or the reader table (a waiting get used to index the table with slot -1)."""
    session = world.session("cam")
    child = world.popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from capsule_sessions import attach, _shm
        from capsule_sessions.errors import SubscriptionClosed
        cam = attach("cam", namespace={world.ns!r})
        sub = cam.subscribe_visual_frames(buffer=4)
        print("ready", flush=True)
        sys.stdin.readline()
        _shm._leave_live_slots()
        print("left", flush=True)
        sys.stdin.readline()  # another reader claims the released queue meanwhile
        try:
            sub.get(timeout=0.2)
        except SubscriptionClosed:
            print("closed", sub.closed, sub.qsize(), sub.delivered, flush=True)
        sub.close()
        del sub
    """)], env=child_env("cython"), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "ready\n"
    session.store_frame(stamp(1, 4 * KB), source="cam", max_recent=2, frame_seq=1)
    child.stdin.write("leave\n")
    child.stdin.flush()
    assert child.stdout.readline() == "left\n"
    assert store_until(session, lambda: session.shared_stats()["subscriptions"] == 0, 3.0) is not None
    handle = attach("cam", namespace=world.ns)
    subs = [handle.subscribe_visual_frames(buffer=4) for _ in range(32)]
    child.stdin.write("go\n")
    child.stdin.flush()
    assert child.stdout.readline() == "closed True 0 0\n"
    assert child.wait(15) == 0
    session.store_frame(stamp(2, 4 * KB), source="cam", max_recent=2, frame_seq=2)
    assert all(not sub.closed and sub.get(timeout=5).frame_seq == 2 for sub in subs)
    handle.close()


@pytest.mark.timeout(60)
def test_a_claim_cut_short_by_sigkill_is_reclaimed(world):
    """A reader killed between claiming a free subscription slot and writing its reader
    index into it leaves the slot claimed with the index of whoever held it last (here a
    live reader: the owner's own). The claim names its claimant in the slot's state, so
    the reaper still frees it."""
    session = world.session("cam")
    session.store_frame(stamp(1, 4 * KB), source="cam", max_recent=2, frame_seq=1)
    control = SHM_DIR / f"capsule.{world.ns}.cam"
    reader = world.reader()
    reader.call("attach", h="h", id="cam", ns=world.ns)
    dead = reader_index_of(control, reader.pid)
    live = reader_index_of(control, os.getpid())
    where = sub_offset(31)
    patch_file(control, where + Sub.state.offset, struct.pack("<Q", claimed_by(dead)))
    patch_file(control, where + Sub.reader.offset, struct.pack("<Q", live))
    os.kill(reader.pid, signal.SIGKILL)
    reader.proc.wait(10)

    def freed():
        return struct.unpack_from("<Q", control.read_bytes(), where + Sub.state.offset)[0] == 0

    took = store_until(session, freed, 3.0)
    assert took is not None and took < 1.5
    handle = attach("cam", namespace=world.ns)
    subs = [handle.subscribe_visual_frames() for _ in range(32)]
    handle.close()
    del subs


# -- 3. the producer killed while readers wait ---------------------------------------------


def consume(sub, frames, ended, mode):
    """A reader thread of this process: ``sub.get()`` (or ``async for``) until the
    subscription closes; ``ended`` gets (what ended it, when)."""

    def blocking():
        try:
            while True:
                frames.append(sub.get())
        except SubscriptionClosed:
            ended.append(("SubscriptionClosed", time.monotonic()))
        except BaseException as exc:
            ended.append((repr(exc), time.monotonic()))

    def asynchronous():
        async def main():
            async for frame in sub:
                frames.append(frame)

        try:
            asyncio.run(asyncio.wait_for(main(), 30))
            ended.append(("StopAsyncIteration", time.monotonic()))
        except BaseException as exc:
            ended.append((repr(exc), time.monotonic()))

    t = threading.Thread(target=blocking if mode == "get" else asynchronous, daemon=True)
    t.start()
    return t


def wait_until(predicate, timeout=10.0, what="the condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("reap", [True, False], ids=["reaped", "zombie"])
def test_killed_producer_wakes_readers_and_is_swept(world, reap):
    """Guarantees 5 and 6: the producer is killed with SIGKILL. Readers blocked in
    ``sub.get()`` and in ``async for`` wake within a second with SubscriptionClosed (the
    end of the ``async for``); a subscriber with frames still queued gets them, intact,
    then SubscriptionClosed; ``attach`` then raises SessionNotFoundError, the session is
    not listed, and a new producer in the namespace sweeps the dead one's segments.
    ``zombie``: the producer is this process's child and is not reaped."""
    producer = world.reader()
    owner_pid = producer.call("own", id="cam", ns=world.ns)
    cam = attach("cam", namespace=world.ns, timeout=10)
    assert list_shared(world.ns) == ["cam"]
    subs = {"get": cam.subscribe_visual_frames(8), "async": cam.subscribe_visual_frames(8, policy="drop_oldest")}
    queued = cam.subscribe_visual_frames(8)
    got = {mode: [] for mode in subs}
    ended = {mode: [] for mode in subs}
    threads = [consume(sub, got[mode], ended[mode], mode) for mode, sub in subs.items()]
    assert producer.call("store", id="cam", n=5, seq=1, nbytes=100 * KB) == 5
    wait_until(lambda: all(len(g) == 5 for g in got.values()), what="the readers to take 5 frames")
    assert queued.qsize() == 5
    time.sleep(0.2)  # the readers are asleep in get() and in the event loop

    os.kill(owner_pid, signal.SIGKILL)
    if reap:
        producer.proc.wait(10)
    killed_at = time.monotonic()
    for t in threads:
        t.join(5)
    for mode in subs:
        assert ended[mode], f"the {mode} reader never woke"
        what, when = ended[mode][0]
        assert what == ("SubscriptionClosed" if mode == "get" else "StopAsyncIteration"), what
        assert when - killed_at < 1.0, f"the {mode} reader woke {when - killed_at:.2f} s after the kill"
        assert [f.frame_seq for f in got[mode]] == [1, 2, 3, 4, 5]
        assert all(describe(f)[DIGEST] == stamp_digest(f.frame_seq, 100 * KB) for f in got[mode])
    assert queued.closed and cam.closed
    rest = [queued.get(timeout=1) for _ in range(5)]
    assert [describe(f)[DIGEST] for f in rest] == [stamp_digest(seq, 100 * KB) for seq in range(1, 6)]
    with pytest.raises(SubscriptionClosed):
        queued.get(timeout=5)
    assert (queued.delivered, queued.dropped) == (5, 0)

    with pytest.raises(SessionNotFoundError):
        attach("cam", namespace=world.ns)
    with pytest.raises(SessionNotFoundError):
        attach("cam", namespace=world.ns, timeout=0.2)
    assert list_shared(world.ns) == []
    dead = entries(world.ns)
    assert f"capsule.{world.ns}.cam" in dead and len(dead) > 1  # control and data, left by the kill

    # A new producer of the namespace (another session id) sweeps them; so would "cam".
    fresh = world.session("cam2")
    assert entries(world.ns) == [f"capsule.{world.ns}.cam2"]
    fresh.store_frame(stamp(1, 10), source="cam", max_recent=1)
    again = world.session("cam")
    assert again.store_frame(stamp(2, 10), source="cam", max_recent=1)
    assert attach("cam", namespace=world.ns).latest_visual_frames(1e9)[0].frame_seq == 0
    assert list_shared(world.ns) == ["cam", "cam2"]
    assert cam.closed  # the old handle stays on the dead session


# -- 4. a frame never changes while anything references it ------------------------------


def assert_stamped(described, nbytes=None):
    """Each described frame carries exactly the stamp of its frame_seq."""
    for d in described:
        assert d[DIGEST] == stamp_digest(d[SEQ], d[7] if nbytes is None else nbytes), f"frame {d[SEQ]} changed"


@pytest.mark.timeout(60)
def test_held_frames_never_change_and_past_the_budget_are_copied(world):
    """Guarantee 2: a reader process holds frames from ``latest_visual_frames`` and from
    a subscription while the producer stores hundreds more of the same size (so every
    free buffer is rewritten): the held bytes stay as stored. Past the lease budget (16
    frames per handle) frames are copied out, counted in ``copied_out`` on both sides,
    and are correct too; released, the buffers are reused and memory is bounded again."""
    session = world.session("cam")
    size = 64 * KB
    reader = world.reader()
    reader.call("attach", h="h", id="cam", ns=world.ns)
    reader.call("subscribe", h="h", s="q", buffer=8, policy="drop_newest")
    seq = 0

    def store(n):
        nonlocal seq
        for _ in range(n):
            seq += 1
            assert session.store_frame(stamp(seq, size), source="cam", max_recent=2, frame_seq=seq)

    store(8)
    latest = reader.call("latest", h="h", ttl=1e9, hold="L")
    queued, _ = reader.call("drain", s="q", hold="Q")
    assert [d[SEQ] for d in latest] == [7, 8] and [d[SEQ] for d in queued] == list(range(1, 9))
    assert reader.call("stats", h="h")["copied_out"] == 0  # 10 frames: all leased, zero-copy

    store(300)
    assert reader.call("held", key="L") == latest
    assert reader.call("held", key="Q") == queued
    assert_stamped(latest + queued, size)

    # 10 leases held: 6 more fit the budget of 16, the rest are copied out.
    more, _ = reader.call("drain", s="q", hold="Q2")
    assert [d[SEQ] for d in more] == list(range(9, 17))
    newest = reader.call("latest", h="h", ttl=1e9, hold="L2")
    assert [d[SEQ] for d in newest] == [seq - 1, seq]
    assert reader.call("stats", h="h")["copied_out"] == 4
    assert session.shared_stats()["copied_out"] == 4  # visible from the producer too
    store(300)
    for key, frames in (("L", latest), ("Q", queued), ("Q2", more), ("L2", newest)):
        assert reader.call("held", key=key) == frames
    assert_stamped(more + newest, size)

    for key in ("L", "Q", "Q2", "L2"):
        reader.call("release", key=key)
    assert reader.call("latest", h="h", ttl=1e9, hold="again")[-1][SEQ] == seq
    assert reader.call("stats", h="h")["copied_out"] == 4  # leased again, not copied
    reader.call("release", key="again")
    store(50)
    assert len(data_entries(world.ns)) <= 2 + 8 + 4 + 2  # ring, the queue, spares


@pytest.mark.timeout(60)
def test_frames_taken_while_the_producer_races_are_intact(world):
    """Guarantee 2 under a race: the producer stores 600 frames of one size, then 600
    whose sizes jump (so pooled buffers are destroyed and their indices reused for new
    segments) as fast as it can, while a reader process takes them from a drop_oldest
    queue (keeping every one: leased, then copied out) and reads
    ``latest_visual_frames`` over and over. Every frame is stamped right when taken and
    still at the end. (This caught buffers destroyed without a generation bump.)"""
    session = world.session("cam")
    sizes = [32 * KB] * 4 + [4 * KB, 300 * KB, 8 * KB, 600 * KB]
    reader = world.reader()
    reader.call("attach", h="h", id="cam", ns=world.ns)
    reader.call("attach", h="g", id="cam", ns=world.ns)
    reader.call("attach", h="c", id="cam", ns=world.ns)
    reader.call("subscribe", h="h", s="q", buffer=4, policy="drop_oldest")
    reader.call("consume", s="q", hold=True)
    errors = []
    done = threading.Event()

    def produce():
        try:
            for seq in range(1, 1201):
                size = sizes[(seq > 600) * 4 + seq % 4]
                session.store_frame(stamp(seq, size), source="cam", max_recent=3, frame_seq=seq)
        except BaseException as exc:
            errors.append(exc)
        done.set()

    t = threading.Thread(target=produce)
    t.start()
    seen = []
    checked = {"calls": 0, "frames": 0}
    while not done.is_set():
        frames = reader.call("latest", h="g", ttl=1e9, hold="L")
        assert_stamped(frames)
        seen += frames
        # and a tight loop in the reader, frames checked as they are handed out
        result = reader.call("latest_check", h="c", seconds=0.05)
        assert result["bad"] == []
        checked = {k: checked[k] + result[k] for k in checked}
    t.join()
    assert not errors
    assert checked["frames"] > 0
    session._close()
    result = reader.call("consumed", s="q", kept=True)
    assert not result["alive"] and result["error"] is None
    assert result["frames"] and result["kept"] == result["frames"]
    assert_stamped(result["kept"])
    assert reader.call("held", key="L") == seen
    assert_stamped(seen)
    seqs = [d[SEQ] for d in result["frames"]]
    assert seqs == sorted(set(seqs))
    assert result["delivered"] + result["dropped"] == 1200


# -- 5. a camera that changes resolution -------------------------------------------------

RESOLUTIONS = [(640, 480), (1920, 1080), (320, 240), (1920, 1080)]


@pytest.mark.timeout(60)
def test_resolution_changes_reach_readers_without_reattaching(world):
    """Guarantee 7: RGB frames switch 640x480 -> 1920x1080 -> 320x240 -> 1920x1080
    mid-stream. A reader process subscribed once (``get()`` and ``async for``) and
    reading ``latest_visual_frames`` on the same handle receives every frame with the
    right size, dimensions and bytes, never re-attaching."""
    session = world.session("cam")
    reader = world.reader()
    reader.call("attach", h="h", id="cam", ns=world.ns)
    reader.call("subscribe", h="h", s="get", buffer=32, policy="drop_newest")
    reader.call("subscribe", h="h", s="async", buffer=32, policy="drop_oldest")
    reader.call("consume", s="get")
    reader.call("consume", s="async", mode="async")
    per_phase = 12
    seq = 0
    for w, h in RESOLUTIONS:
        nbytes = w * h * 3
        for _ in range(per_phase):
            seq += 1
            assert session.store_frame(stamp(seq, nbytes), source="cam", max_recent=2, frame_seq=seq, width=w,
                                       height=h, mime_type="video/x-raw-rgb")
        latest = reader.call("latest", h="h", ttl=1e9)
        assert [(d[SEQ], d[3], d[4], d[7]) for d in latest] == [(seq - 1, w, h, nbytes), (seq, w, h, nbytes)]
        assert_stamped(latest, nbytes)
        target = seq
        wait_until(lambda: all(reader.call("counters", s=s)["delivered"] == target for s in ("get", "async")),
                   what="the readers to take every frame")
    session._close()
    expected = []
    seq = 0
    for w, h in RESOLUTIONS:
        for _ in range(per_phase):
            seq += 1
            expected.append([seq, "cam", "video/x-raw-rgb", w, h, 0, None, w * h * 3, stamp_digest(seq, w * h * 3)])
    for s in ("get", "async"):
        result = reader.call("consumed", s=s)
        assert result["error"] is None and not result["alive"]
        assert (result["delivered"], result["dropped"]) == (seq, 0)
        got = [d[:6] + [None] + d[7:] for d in result["frames"]]
        assert got == expected


# -- 6. the books: every frame delivered or counted dropped, per subscriber -------------


@pytest.mark.timeout(60)
def test_slow_subscribers_see_every_frame_delivered_or_dropped(world):
    """Guarantee 4: slow subscribers in another process (buffer=2, drop_newest and
    drop_oldest, one joining half-way) while the producer stores 400 frames, some
    rate-limited. Per subscriber, delivered + dropped == the frames accepted after it
    subscribed (exactly, once the producer is idle and again after the session ends),
    received frames are in increasing frame_seq order, and drops really happened."""
    session = world.session("cam")
    reader = world.reader()
    reader.call("attach", h="h", id="cam", ns=world.ns)
    seq = 0

    def store(n):
        nonlocal seq
        for _ in range(n):
            seq += 1
            # every 7th frame comes too soon after the one before: rate-limited
            now = 1000.0 + seq * 0.01 - (0.009 if seq % 7 == 0 else 0.0)
            session.store_frame(stamp(seq, 1000 + seq), source="cam", max_recent=2, min_interval=0.005,
                                frame_seq=seq, now=now)
            time.sleep(0.0005)

    def accepted():
        return session.visual_stats()["accepted"]

    store(20)
    base = {}
    for s, policy in (("new", "drop_newest"), ("old", "drop_oldest")):
        reader.call("subscribe", h="h", s=s, buffer=2, policy=policy)
        base[s] = accepted()
        reader.call("consume", s=s, delay=0.003)
    store(200)
    reader.call("subscribe", h="h", s="late", buffer=2, policy="drop_oldest")
    base["late"] = accepted()
    reader.call("consume", s="late", delay=0.003)
    store(200)
    assert session.visual_stats()["rate_limited"] > 0

    wait_until(lambda: all(reader.call("counters", s=s)["qsize"] == 0 for s in base), what="the queues to drain")
    for s in base:
        c = reader.call("counters", s=s)
        assert c["delivered"] + c["dropped"] == accepted() - base[s], (s, c)
        assert c["dropped"] > 0, f"{s} never fell behind: the test is not testing drops"
    session._close()
    for s in base:
        result = reader.call("consumed", s=s)
        assert result["error"] is None and not result["alive"] and result["closed"]
        assert result["delivered"] + result["dropped"] == accepted() - base[s], (s, result)
        seqs = [d[SEQ] for d in result["frames"]]
        assert len(seqs) == result["delivered"]
        assert seqs == sorted(set(seqs)), f"{s}: frames out of order"
        assert_stamped(result["frames"])


# -- the session ends with frames still queued ---------------------------------------------


@pytest.mark.timeout(30)
def test_frames_queued_when_the_session_ends_are_still_delivered(world):
    """As in-process: after the session ends, a subscriber still gets the frames that
    were queued for it, then SubscriptionClosed; also in buffers it had not read yet."""
    local = Session("cam-local")
    session = world.session("cam")
    reader = world.reader()
    reader.call("attach", h="h", id="cam", ns=world.ns)
    reader.call("subscribe", h="h", s="q", buffer=4, policy="drop_newest")
    mine = local.subscribe_visual_frames(4)
    for seq, nbytes in ((1, 1000), (2, 400 * KB), (3, 400 * KB), (4, 400 * KB)):
        for s in (local, session):
            s.store_frame(stamp(seq, nbytes), source="cam", max_recent=1, frame_seq=seq)
        if seq == 1:
            assert [d[SEQ] for d in reader.call("drain", s="q")[0]] == [1] == [mine.get_nowait().frame_seq]
    local._close()
    session._close()
    in_process = local_drain(mine, None)
    assert [[d[SEQ] for d in in_process[0]], in_process[1]] == [[2, 3, 4], True]
    frames, closed = reader.call("drain", s="q")
    counters = reader.call("counters", s="q")
    assert counters["delivered"] + counters["dropped"] == 4  # the books balance either way
    assert [[d[SEQ] for d in frames], closed] == [[2, 3, 4], True]


# -- SIGKILL at random points, the books checked ------------------------------------------


def reader_pids(namespace, session_id):
    """The pids in a session's reader table (read from /dev/shm as a file)."""
    raw = (SHM_DIR / f"capsule.{namespace}.{session_id}").read_bytes()
    pids = {int.from_bytes(raw[OFF_READERS + 64 * r:OFF_READERS + 64 * r + 8], "little") for r in range(32)}
    return pids - {0}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("seed", range(3))
def test_kills_at_random_points_keep_the_books(world, seed):
    """Guarantees 4 and 5 with SIGKILL at random moments: a producer process streams
    frames of changing size to two reader processes (slow and fast, both policies).
    One reader is killed at a random point: its reader slot is gone from the table
    within a second while the stream goes on. Then the producer is killed at a random
    point: the other reader's subscriptions wake with SubscriptionClosed within a second,
    its frames are intact and in order, and per subscriber delivered + dropped is the
    number of frames accepted (the one in flight at the kill may be missing). A new
    producer then sweeps everything the dead one left."""
    rng = random.Random(seed)
    producer = world.reader()
    producer.call("own", id="cam", ns=world.ns)
    victim, survivor = world.reader(), world.reader()
    for r in (victim, survivor):
        r.call("attach", h="h", id="cam", ns=world.ns)
        for s, buffer, policy, delay in (("slow", 2, "drop_newest", 0.004), ("fast", 8, "drop_oldest", 0.0)):
            r.call("subscribe", h="h", s=s, buffer=buffer, policy=policy)
            r.call("consume", s=s, delay=delay, hold=(s == "fast"))
    assert {victim.pid, survivor.pid} <= reader_pids(world.ns, "cam")
    producer.call("stream", id="cam", n=200_000, pause=0.0002)

    time.sleep(rng.uniform(0.05, 0.4))
    victim.kill()
    killed_at = time.monotonic()
    while victim.pid in reader_pids(world.ns, "cam"):
        assert time.monotonic() - killed_at < 1.5, "the killed reader's slot was not reclaimed"
        time.sleep(0.01)
    assert survivor.pid in reader_pids(world.ns, "cam")

    time.sleep(rng.uniform(0.05, 0.4))
    producer.kill()
    killed_at = time.monotonic()
    stats = survivor.call("stats", h="h")
    for s in ("slow", "fast"):
        result = survivor.call("consumed", s=s, timeout=10)
        assert not result["alive"] and result["error"] is None and result["closed"]
        woke = result["closed_at"] - killed_at  # both processes read the same system-wide clock
        assert woke < 1.0, f"{s} woke {woke:.2f} s after the kill"
        seqs = [d[SEQ] for d in result["frames"]]
        bad = next((i for i in range(1, len(seqs)) if seqs[i] <= seqs[i - 1]), None)
        assert bad is None, f"{s}: frame {seqs[bad]} after {seqs[bad - 1]}: {seqs[max(0, bad - 12):bad + 12]}"
        assert len(seqs) == result["delivered"]
        assert_stamped(result["frames"])
        booked = result["delivered"] + result["dropped"]
        assert stats["accepted"] - 1 <= booked <= stats["accepted"], (s, result["delivered"], result["dropped"],
                                                                     stats)
    assert stats["accepted"] > 100
    assert list_shared(world.ns) == []
    world.session("next")
    assert entries(world.ns) == [f"capsule.{world.ns}.next"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("policy", ["drop_newest", "drop_oldest"])
def test_queue_books_do_not_leak_buffers_when_a_reader_keeps_pace(world, policy):
    """A reader that keeps pace with the producer (its small queue often full when a
    store starts and emptied during the copy) must not leave buffers pinned: once it
    unsubscribes, a few more stores bring the data segments back to what the ring and
    the spare pool hold. Every frame it got is intact. (This caught the owner counting
    a queue's taken entries out after a push had overwritten their slot: the wrong
    buffer was unpinned, the right one pinned for ever.)"""
    session = world.session("cam")
    reader = world.reader()
    reader.call("attach", h="h", id="cam", ns=world.ns)
    reader.call("subscribe", h="h", s="q", buffer=2, policy=policy)
    reader.call("consume", s="q")
    sizes = [200 * KB, 120 * KB, 250 * KB]
    deadline = time.monotonic() + 1.5
    seq = 0
    while time.monotonic() < deadline:
        seq += 1
        session.store_frame(stamp(seq, sizes[seq % 3]), source="cam", max_recent=2, frame_seq=seq)
    reader.call("close_sub", s="q")
    result = reader.call("consumed", s="q")
    assert result["error"] is None and result["delivered"] > 20
    assert_stamped(result["frames"])
    reader.call("drop_sub", s="q")
    for _ in range(10):
        seq += 1
        session.store_frame(stamp(seq, 100 * KB), source="cam", max_recent=2, frame_seq=seq)
    pinned = len(data_entries(world.ns))
    assert pinned <= 2 + 4 + 1, f"{pinned} data segments left for a ring of 2 with nobody subscribed"


@pytest.mark.timeout(60)
def test_copied_out_frames_keep_their_own_header(world):
    """Past the lease budget a frame is copied out and its lease ended: its fields
    (frame_seq, sizes) must be read before that, or they may be the next frame's. A
    reader holding its whole budget takes a fast stream of small frames from a queue
    of one while the producer reuses each buffer as soon as it is free: every copied
    frame's bytes are the stamp of its own frame_seq. (This caught _build reading the
    header after the copy-out ended the lease.)"""
    session = world.session("cam")
    reader = world.reader()
    reader.call("attach", h="h", id="cam", ns=world.ns)
    for seq in range(1, 17):
        session.store_frame(stamp(seq, 64), source="cam", max_recent=16, frame_seq=seq)
    assert len(reader.call("latest", h="h", ttl=1e9, hold="budget")) == 16  # the whole lease budget
    reader.call("subscribe", h="h", s="q", buffer=1, policy="drop_oldest")
    reader.call("consume", s="q")
    seq = 16
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        seq += 1
        session.store_frame(stamp(seq, 64 + seq % 2 * 8), source="cam", max_recent=1, frame_seq=seq)
    session._close()
    result = reader.call("consumed", s="q")
    assert result["error"] is None and result["delivered"] > 100
    assert_stamped(result["frames"])
    assert reader.call("stats", h="h")["copied_out"] >= result["delivered"]


@pytest.mark.timeout(30)
def test_a_producer_killed_while_publishing_leaves_readable_counters(world):
    """A producer killed with SIGKILL in the middle of publishing leaves the seqlock odd
    for good. Readers of the dead session still get its last counters from
    ``visual_stats()`` (as ``latest_visual_frames`` gives [] rather than an error), and
    their subscriptions close. (This caught visual_stats raising SharedMemoryError,
    'its counters never stopped changing', for a producer that will never finish.)"""
    producer = world.reader()
    producer.call("own", id="cam", ns=world.ns)
    assert producer.call("store", id="cam", n=3, seq=1, nbytes=1000) == 3
    cam = attach("cam", namespace=world.ns)
    sub = cam.subscribe_visual_frames(2)
    producer.kill()
    control = SHM_DIR / f"capsule.{world.ns}.cam"
    raw = bytearray(control.read_bytes())
    seq_word = int.from_bytes(raw[Header.seq.offset:Header.seq.offset + 8], "little")
    raw[Header.seq.offset:Header.seq.offset + 8] = (seq_word | 1).to_bytes(8, "little")  # a publish cut short
    fd = os.open(control, os.O_WRONLY)
    try:
        os.pwrite(fd, bytes(raw[Header.seq.offset:Header.seq.offset + 8]), Header.seq.offset)
    finally:
        os.close(fd)
    assert cam.closed
    t0 = time.monotonic()
    stats = cam.visual_stats()
    assert stats["accepted"] == 3 and stats["frames"] == 2
    assert cam.latest_visual_frames(1e9) == []
    with pytest.raises(SubscriptionClosed):
        sub.get(timeout=5)
    assert time.monotonic() - t0 < 1.0
    world.session("next")  # sweeps the dead session
    assert entries(world.ns) == [f"capsule.{world.ns}.next"]


_PROBES: list[str] = []
_COUNTING: list[bool] = [False]


def _count_stat_opens(event, args):
    if _COUNTING[0] and event == "open" and isinstance(args[0], str) and args[0].endswith("/stat"):
        _PROBES.append(args[0])


def test_a_subscriber_probes_the_owner_process_at_most_every_20_ms(world):
    """Each empty take asked whether the owner still runs by reading /proc/<pid>/stat
    (tens of µs), once before every wait: at 1080p rates that was 85 µs of a reader's
    CPU per frame. The verdict is now trusted for 20 ms."""
    owner = world.popen([sys.executable, "-c", (
        "import sys, capsule_sessions as cs\n"
        f"m = cs.SessionManager(2, shared={world.ns!r}, cleanup_interval=None)\n"
        "m.create('cam')\nprint('ready', flush=True)\nsys.stdin.read()\nm.close()\n")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline().strip() == "ready"
        session = attach("cam", namespace=world.ns, timeout=10)
        sub = session.subscribe_visual_frames(2)
        sys.addaudithook(_count_stat_opens)
        _PROBES.clear()
        _COUNTING[0] = True
        started = time.monotonic()
        try:
            for _ in range(2000):
                with pytest.raises(queue.Empty):
                    sub.get_nowait()
        finally:
            _COUNTING[0] = False
        elapsed = time.monotonic() - started
        sub.close()
        session.close()
        assert len(_PROBES) <= elapsed / 0.020 + 2, f"{len(_PROBES)} probes in {elapsed:.3f} s"
        assert all(p == f"/proc/{owner.pid}/stat" for p in _PROBES)
    finally:
        owner.communicate("", timeout=10)  # the owner ends its session itself
    assert owner.returncode == 0
