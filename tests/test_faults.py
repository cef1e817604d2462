"""Interpreter faults: Ctrl-C in a blocked read, during stores and in a subscriber's
wake-up, interpreter exit during a GIL-free copy, fork with a ring lock held, garbage
collection of sessions that still have subscribers, a manager stopped under load, and
subscriptions dropped without close().

Whatever can hang or kill the interpreter runs in a child process with a deadline, so a
failure is a test failure with every thread's stack (faulthandler), not a stuck suite.
The child imports the same build as this process (under ``make sanitize`` that is the
sanitized tree), through PYTHONPATH.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import threading
import time
import weakref

import numpy as np
import pytest

from capsule_sessions import Session, SessionManager
from support import FakeClock, finish, payload, run_child, run_scenario, start_child

pytestmark = pytest.mark.timeout(180)

def native_allocator() -> bool:
    """False under ASan or valgrind: their allocators keep freed blocks in quarantine,
    so freed frames do not leave the resident set at once."""
    preload = os.environ.get("LD_PRELOAD", "")
    return "asan" not in preload and "vgpreload" not in preload


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# -- Ctrl-C while blocked in a read ---------------------------------------------------

# The main thread blocks in a read; a helper thread watches the main thread's frame and
# says "blocked" once it sits on the read's line. After the KeyboardInterrupt the same
# subscription must still work (no lock was left held by the interrupted wait).
_CTRL_C_CHILD = """
import asyncio, sys, threading, time, traceback
from capsule_sessions import Session
session = Session("ctrl-c")
sub = session.subscribe_visual_frames(2)
main = threading.get_ident()
READ_LINE = None

def announce():
    while True:
        frame = sys._current_frames().get(main)
        while frame is not None:
            if frame.f_code.co_filename == "<string>" and frame.f_lineno == READ_LINE:
                time.sleep(0.2)  # let the read park itself in its wait
                print("blocked", flush=True)
                return
            frame = frame.f_back
        time.sleep(0.01)

def read():
    mode = sys.argv[1]
    if mode == "get":
        return sub.get()
    if mode == "get_timeout":
        return sub.get(timeout=3600)
    if mode == "iter":
        return next(iter(sub))
    return asyncio.run(sub.aget())

READ_LINE = read.__code__.co_firstlineno + 1 + {"get": 2, "get_timeout": 4, "iter": 6, "aget": 7}[sys.argv[1]]
threading.Thread(target=announce, daemon=True).start()
try:
    read()
    print("returned without interrupt", flush=True)
except KeyboardInterrupt:
    raised_at = time.monotonic()
    lines = [entry.lineno for entry in traceback.extract_tb(sys.exc_info()[2])]
    print("interrupted", "in-read" if READ_LINE in lines else f"elsewhere {lines}", flush=True)
session.store_frame(b"after", source="cam", max_recent=1, frame_seq=7)
assert sub.get(timeout=5).frame_seq == 7
sub.close()
print("still works", flush=True)
"""


@pytest.mark.parametrize("mode", ["get", "get_timeout", "iter", "aget"])
def test_ctrl_c_interrupts_a_blocked_read(backend, mode):
    code = _CTRL_C_CHILD.replace('sys.argv[1]', repr(mode))
    proc = start_child(code, backend)
    try:
        assert proc.stdout.readline().strip() == "blocked", proc.stderr.read()
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        line = proc.stdout.readline().strip()
        waited = time.monotonic() - sent
    finally:
        code_, out, err = finish(proc)
    assert line == "interrupted in-read", f"{line!r}\n{out}\n{err}"
    # The Cython wait checks for signals every 100 ms; 5 s only rules out "never".
    assert waited < 5.0, f"KeyboardInterrupt took {waited:.2f} s"
    assert out.strip() == "still works" and code_ == 0, err


# -- Ctrl-C during a store, and in a subscriber's wake-up ------------------------------

_INTERRUPTS = """
import asyncio, signal, threading, time
from support import assert_books_balance, payload, session_with_subscribers

s, sync_subs = session_with_subscribers("ctrl-c", 3)
loop = asyncio.new_event_loop()
async_sub = s.subscribe_visual_frames(3)
received = []

async def consume():
    async for frame in async_sub:
        received.append(frame.frame_seq)

loop_thread = threading.Thread(target=lambda: loop.run_until_complete(consume()))
loop_thread.start()
armed = hit = False
caught = lost = 0

def interrupt(signum, frame):
    global hit
    if armed:
        hit = True
        raise KeyboardInterrupt

signal.signal(signal.SIGALRM, interrupt)
signal.setitimer(signal.ITIMER_REAL, 0.0003, 0.0003)
deadline = time.monotonic() + 4
n = 0
while time.monotonic() < deadline:
    hit = False
    try:
        armed = True
        s.store_frame(payload(n), source="cam", max_recent=2, frame_seq=n)
        armed = False
        lost += hit  # an interrupt was raised inside the store, and the store returned
    except KeyboardInterrupt:
        armed = False
        caught += 1
    for sub in sync_subs:
        while sub.qsize() > 1:
            sub.get_nowait()
    n += 1
signal.setitimer(signal.ITIMER_REAL, 0)
assert_books_balance(s, sync_subs + [async_sub])
async_sub.close()
loop_thread.join(10)
assert not loop_thread.is_alive(), "the asyncio reader never finished"
assert received == sorted(received)
assert lost == 0 and caught > 0, (lost, caught)
print("ok", n, s.visual_stats()["accepted"], caught)
"""


def test_keyboard_interrupt_during_stores_reaches_the_caller_and_books_balance(backend):
    _, err = run_scenario(_INTERRUPTS, backend, timeout=120)
    assert "Exception ignored" not in err, err


class _InterruptingLoop(asyncio.SelectorEventLoop):
    """An event loop whose wake-up from another thread raises KeyboardInterrupt, as a
    signal handler firing inside call_soon_threadsafe would."""

    interrupt = False

    def call_soon_threadsafe(self, callback, *args, **kwargs):
        if self.interrupt:
            self.interrupt = False
            raise KeyboardInterrupt
        return super().call_soon_threadsafe(callback, *args, **kwargs)


def test_an_interrupt_in_a_wake_up_still_offers_the_frame_to_every_subscriber(session, clock):
    first = session.subscribe_visual_frames(2)
    parked = session.subscribe_visual_frames(2)
    last = session.subscribe_visual_frames(2, policy="drop_oldest")
    loop = _InterruptingLoop()
    got = []
    ready = threading.Event()

    async def read_two():
        ready.set()
        got.append(await parked.aget(timeout=30))
        got.append(await parked.aget(timeout=30))

    reader = threading.Thread(target=loop.run_until_complete, args=(read_two(),))
    reader.start()
    try:
        ready.wait(5)
        time.sleep(0.05)  # aget() is parked on the loop
        loop.interrupt = True
        with pytest.raises(KeyboardInterrupt):
            session.store_frame(b"one", source="cam", max_recent=2)
        for sub in (first, last):
            assert bytes(sub.get_nowait().data) == b"one"
        # The waiter the interrupt kept asleep is woken by the next frame.
        clock.advance(0.001)
        assert session.store_frame(b"two", source="cam", max_recent=2)
        reader.join(10)
        assert not reader.is_alive()
        assert [bytes(f.data) for f in got] == [b"one", b"two"]
        assert parked.delivered == 2 and parked.dropped == 0
    finally:
        parked.close()
        reader.join(10)
        loop.close()


def test_a_session_is_usable_after_many_interrupted_stores(session, clock):
    sub = session.subscribe_visual_frames(64)
    for n in range(20):
        clock.advance(0.001)
        session.store_frame(payload(n), source="cam", max_recent=4, frame_seq=n)
    assert [f.frame_seq for f in session.latest_visual_frames(10)] == [16, 17, 18, 19]
    assert [sub.get_nowait().frame_seq for _ in range(20)] == list(range(20))



# -- interpreter shutdown while a daemon thread copies without the GIL -----------------

_SHUTDOWN = """
import sys, threading
import numpy as np
from capsule_sessions import Session

s = Session("exit")
sub = s.subscribe_visual_frames(2)
big = np.zeros(64 << 20, np.uint8)
started = threading.Event()

def produce():
    while True:
        s.store_frame(big, source="cam", max_recent=2)
        started.set()

def consume():
    for frame in sub:
        pass

class AtTeardown:
    # Finalized while the interpreter tears its modules down, with the producer
    # stopped wherever it was (inside the GIL-free copy, most likely).
    def __del__(self):
        s.visual_stats()
        s.latest_visual_frames(10)
        sub.close()

threading.Thread(target=produce, daemon=True).start()
threading.Thread(target=consume, daemon=True).start()
started.wait()
keeper = AtTeardown()
print("exiting", flush=True)
"""


@pytest.mark.parametrize("attempt", range(3))
def test_interpreter_exit_during_a_gil_free_copy_does_not_hang(backend, attempt):
    code, out, err = run_child(_SHUTDOWN, backend, timeout=60)
    assert code == 0 and out.strip() == "exiting", f"exit {code}\n{out}\n{err}"
    assert "Fatal Python error" not in err, err


# -- fork while other threads hold the ring lock --------------------------------------

# Producers copy 24 MB frames (strided gathers) and fan them out to a subscriber; the
# pure twin's lock is also held on purpose by a thread. Each child checks that the
# inherited session refuses every call at once, then makes and uses a new manager.
_FORK_CHILD = """
import os, sys, threading, time, traceback
import numpy as np
from capsule_sessions import Session, SessionManager
from support import payload

backend = os.environ["CAPSULE_SESSIONS_BACKEND"]
old = Session("old")
keep = old.subscribe_visual_frames(4, policy="drop_oldest")
big = np.zeros((4096, 2 * 4096 * 3), dtype=np.uint8)[:, ::2]  # 24 MB, not contiguous
stop = threading.Event()

def produce():
    seq = 0
    while not stop.is_set():
        old.store_frame(big, source="cam", max_recent=2, frame_seq=seq)
        seq += 1

producers = [threading.Thread(target=produce, daemon=True) for _ in range(2)]
for t in producers:
    t.start()
if backend == "python":
    held = threading.Event()
    def hold():
        with old._ring._lock:
            held.set()
            stop.wait()
    threading.Thread(target=hold, daemon=True).start()
    held.wait()
while backend != "python" and old.visual_stats()["accepted"] == 0:
    time.sleep(0.01)

def child():
    # Every call on an inherited session or subscription is refused at once, even when
    # a thread that no longer exists held its locks or a fan-out at the fork.
    refused = []
    def probe():
        for call in (old.visual_stats, lambda: old.latest_visual_frames(10), keep.get_nowait,
                     lambda: old.store_frame(b"x", source="cam", max_recent=1), keep.close):
            try:
                call()
            except RuntimeError as exc:
                refused.append("fork" in str(exc))
    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    prober.join(5.0)
    if prober.is_alive() or refused != [True] * 5:
        print("inherited session:", "hung" if prober.is_alive() else refused, file=sys.stderr)
        return False
    manager = SessionManager(4, 60.0, cleanup_interval=0.01)
    session = manager.create("child")
    sub = session.subscribe_visual_frames(8)
    for seq in range(20):
        assert session.store_frame(payload(seq), source="cam", max_recent=3, frame_seq=seq)
    assert [f.frame_seq for f in session.latest_visual_frames(10)] == [17, 18, 19]
    got = [sub.get(timeout=5).frame_seq for _ in range(8)]
    assert got == list(range(8)), got
    assert all(bytes(f.data) == payload(f.frame_seq) for f in session.latest_visual_frames(10))
    manager.delete("child")
    assert sub.closed
    manager.stop()
    return True

results = []
for attempt in range(12):
    pid = os.fork()
    if pid == 0:
        try:
            code = 10 if child() else 11
        except BaseException:
            traceback.print_exc()
            code = 1
        os._exit(code)
    deadline = time.monotonic() + 30
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            results.append(os.waitstatus_to_exitcode(status))
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            results.append("hung")
            break
        time.sleep(0.005)
    if attempt >= 5:
        break
stop.set()
print(results, flush=True)
"""


def test_fork_while_threads_hold_the_ring_lock(backend):
    code, out, err = finish(start_child(_FORK_CHILD, backend))
    assert code == 0, err
    results = eval(out.strip().splitlines()[-1])
    # 10: the inherited session refused every call at once and new sessions worked.
    assert results == [10] * len(results), f"children failed or hung: {results}\n{err}"


# -- garbage collection with live subscriptions ---------------------------------------


FRAME_MB = 40  # above glibc's mmap threshold cap (32 MB): freed memory leaves RSS at once


def test_session_collected_with_live_subscription_releases_frames(backend, clock):
    gc.collect()
    baseline = rss_bytes()
    session = Session("gc", clock=clock, backend=backend)
    sub = session.subscribe_visual_frames(4)
    for seq in range(3):  # three distinct buffers: the queue holds every one of them
        data = np.full(FRAME_MB << 20, seq, dtype=np.uint8)
        assert session.store_frame(data, source="cam", max_recent=2, frame_seq=seq)
    del data
    held = session.latest_visual_frames(10.0)
    views = [weakref.ref(frame.data) for frame in held]
    del held
    session_ref = weakref.ref(session)
    del session
    gc.collect()
    assert session_ref() is None, "the Session outlived its last reference"
    # The queue still holds all three frames (so they are resident). Whether the ring
    # outlives its session while a subscription lives is the backend's business; the
    # queued frames must stay readable either way.
    grown = rss_bytes() - baseline
    assert grown > 2 * (FRAME_MB << 20) or not native_allocator(), f"frames were never resident? grew {grown >> 20} MB"
    assert [int(sub.get(timeout=1).data[0]) for _ in range(3)] == [0, 1, 2]
    del sub
    gc.collect()
    assert all(view() is None for view in views), "frame arrays outlived the ring"
    if not native_allocator():
        return
    leftover = rss_bytes() - baseline
    assert leftover < 16 << 20, f"{leftover >> 20} MB still resident after the ring went away"


def test_manager_and_sessions_collected_with_blocked_readers(backend, clock):
    manager = SessionManager(4, 60.0, cleanup_interval=0.01, clock=clock, backend=backend)
    session = manager.create("a")
    sub = session.subscribe_visual_frames(2)
    errors = []

    def reader(sub):
        try:
            for _ in sub:
                pass
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            errors.append(exc)

    t = threading.Thread(target=reader, args=(sub,), daemon=True)
    t.start()
    session.store_frame(b"x" * 100, source="cam", max_recent=1)
    manager_ref, session_ref = weakref.ref(manager), weakref.ref(session)
    clock.advance(120.0)  # idle: the cleanup thread evicts it and closes `sub`
    t.join(10)
    assert not t.is_alive() and not errors, errors
    manager.stop()
    del manager, session, sub
    gc.collect()
    assert manager_ref() is None and session_ref() is None


def test_abandoned_async_reader_is_collectable(backend, clock):
    """A loop closed while a task is parked in aget(): the task, the loop and the ring
    must still be garbage once nothing outside refers to them."""
    session = Session("async-gc", clock=clock, backend=backend)
    sub = session.subscribe_visual_frames(2)
    loop = asyncio.new_event_loop()
    task = loop.create_task(sub.aget())
    loop.run_until_complete(asyncio.sleep(0.01))
    assert not task.done()
    task_ref, loop_ref = weakref.ref(task), weakref.ref(loop)
    loop.close()
    del task, loop, sub, session
    for _ in range(3):
        gc.collect()
    assert task_ref() is None and loop_ref() is None, "a parked aget() keeps its task and loop alive forever"


def test_fire_and_forget_async_reader_is_kept_alive_by_its_session(backend, clock):
    """A task parked in aget() whose handle nobody kept (asyncio.create_task(...) and
    forget) still gets the next frame: like asyncio.Queue, the live subscription keeps
    its waiter, and so the task, alive. Collecting it would silently end a consumer."""
    session = Session("fire-and-forget", clock=clock, backend=backend)
    sub = session.subscribe_visual_frames(2)
    got = []

    async def consumer():
        got.append((await sub.aget()).frame_seq)

    async def main():
        asyncio.get_running_loop().create_task(consumer())  # the handle is dropped
        await asyncio.sleep(0.01)
        gc.collect()
        session.store_frame(b"x", source="cam", max_recent=1, frame_seq=5)
        for _ in range(100):
            if got:
                return
            await asyncio.sleep(0.01)

    asyncio.run(main())
    assert got == [5], "the parked consumer task was garbage-collected"


# -- manager stopped while producers run ----------------------------------------------


def test_manager_stopped_while_producers_run(backend):
    clock = FakeClock()
    ended = []
    manager = SessionManager(8, 5.0, cleanup_interval=0.001, on_session_end=ended.append, clock=clock, backend=backend)
    sessions = [manager.create(f"s{i}") for i in range(4)]
    stop = threading.Event()
    errors = []
    stored = [0] * len(sessions)

    def produce(i, session):
        try:
            seq = 0
            while not stop.is_set():
                session.store_frame(payload(seq), source="cam", max_recent=2, frame_seq=seq)
                stored[i] += 1
                seq += 1
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            errors.append(exc)

    producers = [threading.Thread(target=produce, args=(i, s), daemon=True) for i, s in enumerate(sessions)]
    for t in producers:
        t.start()
    while min(stored) < 50:
        time.sleep(0.001)
    manager.stop()
    assert manager._thread is not None and not manager._thread.is_alive()
    manager.stop()  # idempotent
    before = list(stored)
    while any(now - then < 50 for now, then in zip(stored, before, strict=True)):
        time.sleep(0.001)
    stop.set()
    for t in producers:
        t.join(10)
    assert not any(t.is_alive() for t in producers)
    assert not errors, errors
    # Stopped means no background eviction, not a dead manager: explicit calls work.
    # (After the producers end: every store touches its session.)
    clock.advance(60.0)
    sessions[0].touch()
    evicted = manager.evict_idle()
    assert {s.id for s in evicted} == {"s1", "s2", "s3"}
    manager.delete("s0")
    assert {s.id for s in ended} == {"s0", "s1", "s2", "s3"} and len(manager) == 0
    for session in sessions:
        frames = session.latest_visual_frames(1e9)
        assert frames and all(bytes(f.data) == payload(f.frame_seq) for f in frames)


# -- subscriptions dropped without close ----------------------------------------------


def test_dropped_subscription_stops_costing_the_producer(session):
    ring = session._ring
    kept = session.subscribe_visual_frames(4)
    dropped = session.subscribe_visual_frames(4)
    session.store_frame(payload(1), source="cam", max_recent=2, frame_seq=1)
    assert ring.subscriber_count == 2
    del dropped  # no close(), no gc.collect(): the last reference just goes away
    session.store_frame(payload(2), source="cam", max_recent=2, frame_seq=2)
    assert ring.subscriber_count == 1
    assert [kept.get_nowait().frame_seq for _ in range(2)] == [1, 2]


def test_pure_finalizer_takes_no_lock():
    """A garbage collection can finalize a Subscription while the same thread holds the
    ring's or the queue's (non-reentrant) lock; the pure twin's __del__ must not take
    either. Run it with both held, in a thread, so a regression fails instead of hanging."""
    session = Session("gc-under-lock", backend="python")
    sub = session.subscribe_visual_frames(2)
    ring, q = session._ring, sub._queue
    finished = threading.Event()

    def finalize_under_locks():
        with ring._lock, q.cond:
            type(sub).__del__(sub)
        finished.set()

    threading.Thread(target=finalize_under_locks, daemon=True).start()
    assert finished.wait(10), "Subscription.__del__ blocked on a lock its thread held"
    assert sub.closed
    session.store_frame(payload(1), source="cam", max_recent=1, frame_seq=1)
    assert ring.subscriber_count == 0  # forgotten on the next fan-out


def test_dropped_subscriptions_do_not_accumulate(session):
    for seq in range(200):
        sub = session.subscribe_visual_frames(2)
        session.store_frame(payload(seq), source="cam", max_recent=2, frame_seq=seq)
        assert sub.get_nowait().frame_seq == seq
        del sub
    session.store_frame(payload(200), source="cam", max_recent=2, frame_seq=200)
    assert session._ring.subscriber_count == 0


# A reader drops its subscription (no close) right after a get() while producers fan
# out into it. Dropping the last reference must not block on the queue lock while
# holding the GIL: a producer that took the queue lock without the GIL and waits for
# the GIL would deadlock with it.
_DROP_RACE_CHILD = """
import threading, time
from capsule_sessions import Session
session = Session("race")
stop = threading.Event()
done = [0]

def produce():
    seq = 0
    while not stop.is_set():
        session.store_frame(b"x" * 64, source="cam", max_recent=2, frame_seq=seq)
        seq += 1

def consume():
    while not stop.is_set():
        sub = session.subscribe_visual_frames(4)
        try:
            sub.get(timeout=0.01)
        except Exception:
            pass
        del sub
        done[0] += 1

threads = [threading.Thread(target=produce, daemon=True) for _ in range(2)]
threads += [threading.Thread(target=consume, daemon=True) for _ in range(2)]
for t in threads:
    t.start()
time.sleep(RUN_SECONDS)
stop.set()
for t in threads:
    t.join(10)
assert not any(t.is_alive() for t in threads)
print("ok", done[0], flush=True)
"""


def test_dropping_a_subscription_while_producers_fan_out_does_not_deadlock(backend):
    # Unpatched, this hung within a few seconds; the run is 4 s, a hang is cut at 20 s.
    proc = start_child(_DROP_RACE_CHILD.replace("RUN_SECONDS", "4.0"), backend, deadline=20.0)
    code, out, err = finish(proc)
    assert code == 0 and out.startswith("ok"), f"deadlock or crash (exit {code}):\n{err[-6000:]}"
