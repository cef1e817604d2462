"""A Redis session's frames give the in-process ring's results, call for call.

The in-process frame tests (tests/test_visual_input.py, test_subscription.py and
test_loans.py) run here once more on sessions whose frames are in a real redis-server
(ON_REDIS: tests/conftest.py's make_session builds a RingSession around a
RedisFrameRing); then the tests of what only Redis has: the keys it writes, corrupted
keys, the asyncio twin, and a differential run of the pure ring against the Redis one.
"""

from __future__ import annotations

import inspect
import re

import pytest
import test_loans
import test_subscription
import test_visual_input

ON_REDIS = True

# The in-process tests that cannot hold on Redis, and why.
NOT_ON_REDIS = {
    # The message it checks names Session.loan_frame: Session's own signature, which a
    # Redis session has, not its ring.
    "test_loan_frame_is_called_as_a_method",
}


def _collect() -> dict[str, object]:
    tests: dict[str, object] = {}
    for module in (test_visual_input, test_subscription, test_loans):
        for name, obj in vars(module).items():
            if not name.startswith("test_") or not inspect.isfunction(obj):
                continue
            params = inspect.signature(obj).parameters
            if "session" not in params or name in NOT_ON_REDIS:
                continue
            assert name not in tests, f"{name} is in two modules"
            tests[name] = obj
    return tests


globals().update(_collect())


def redis_kinds(function) -> list[str]:
    """Each test runs on the sync ring and on the asyncio twin (driven from its own loop:
    tests/redis_frames_support.py), the loan tests on the sync ring (an asyncio loan's
    commit is a coroutine: tested below)."""
    return ["redis"] if function.__module__ == "test_loans" else ["redis", "redis-async"]


@pytest.fixture
def backend() -> str:
    # The frames are in Redis whatever the backend: each test runs once.
    return "python"


# -- what only Redis has -------------------------------------------------------------------

import asyncio  # noqa: E402
import math  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402

import numpy as np  # noqa: E402
import redis  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule, run_state_machine_as_test  # noqa: E402
from redis_frames_support import client_for  # noqa: E402

import capsule_sessions  # noqa: E402
from capsule_sessions import Subscription, SubscriptionClosed, VisualFrame  # noqa: E402
from capsule_sessions._framebuf_py import FrameRing  # noqa: E402
from capsule_sessions.redis import RedisDataError  # noqa: E402
from capsule_sessions.redis._frames import AsyncRedisFrameRing, RedisFrameRing, _prepare, frame_keys  # noqa: E402
from capsule_sessions.redis._keys import SessionKeys  # noqa: E402
from support import FakeClock, frame_key, outcome, payload, sub_books  # noqa: E402


def new_ring(url, session_id="s", namespace=None, clock=None, client=None):
    keys = SessionKeys(namespace or f"t{uuid.uuid4().hex[:10]}", session_id)
    client = client or client_for(url)
    return RedisFrameRing(client, keys, url, clock or FakeClock()), keys, client


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_the_keys_are_hash_tagged_and_hold_raw_bytes(redis_url):
    ring, keys, client = new_ring(redis_url, "cam/1 {x}")
    data = np.arange(256, dtype=np.uint8)
    assert ring.store_frame(data, source="cam", max_recent=2, now=5.0, mime_type="image/jpeg", width=16,
                            height=16, timestamp_ms=9, frame_seq=3)
    names = frame_keys(keys)
    assert sorted(k.decode() for k in client.keys(f"{keys.namespace}:*")) == sorted(names[:3])
    tags = {name[name.index("{") + 1:name.index("}")] for name in names}
    assert len(tags) == 1  # one hash tag: one Redis Cluster slot for a session's frames
    epoch = client.hget(names[1], "epoch")
    assert 2**62 <= int(epoch) < 2**63
    [(entry_id, fields)] = client.xrange(names[0])
    assert entry_id == epoch + b"-1"  # <epoch>-<accept number>
    assert fields.pop(b"d") == data.tobytes()  # the bytes as they are: no pickle, no encoding
    assert fields == {b"s": b"cam", b"m": b"image/jpeg", b"w": b"16", b"h": b"16", b"t": b"9", b"f": b"3",
                      b"r": b"5.0", b"n": b"5000000000"}
    assert client.lrange(names[2], 0, -1) == [b"256"]


def test_a_ring_without_local_subscribers_sends_the_callers_bytes_without_a_copy_of_its_own(redis_url, monkeypatch):
    """A store's bytes are copied into the command it sends; the frame's own copy (what
    local subscribers share) is made only when this ring has one. The caller's buffer is
    free again when the store returns, and what is stored is what it held then."""
    from capsule_sessions.redis import _frames

    copies = []
    real_copy = _frames.copy_bytes
    monkeypatch.setattr(_frames, "copy_bytes", lambda data: copies.append(1) or real_copy(data))
    ring, _, _ = new_ring(redis_url)
    grid = np.arange(48, dtype=np.uint16).reshape(4, 12)  # C-contiguous, 2-byte items
    held = bytearray(b"abcdefgh")
    assert ring.store_frame(grid, source="cam", max_recent=4, now=1.0)
    assert ring.store_frame(held, source="cam", max_recent=4, now=2.0)
    held.extend(b"!")  # resizable again: the store let go of it
    assert ring.store_frame(grid[:, ::2], source="cam", max_recent=4, now=3.0)  # strided: gathered by the copy
    assert len(copies) == 1
    sub = ring.subscribe_visual_frames(4)
    assert ring.store_frame(held, source="cam", max_recent=4, now=4.0)
    assert len(copies) == 2  # a local subscriber shares the frame: it is copied once
    held[:] = b"changed"
    assert bytes(sub.get(timeout=5).data) == b"abcdefgh!"
    assert [bytes(f.data) for f in ring.latest_visual_frames(10, now=4.0)] == [
        grid.tobytes(), b"abcdefgh", np.ascontiguousarray(grid[:, ::2]).tobytes(), b"abcdefgh!"]


def test_a_frame_the_socket_takes_in_parts_is_sent_whole(redis_url):
    """A store sends its frame's bytes from the caller's buffer with sendmsg; a socket
    with a small send buffer takes them in parts, and the rest follows from where the
    last part ended (a resend or a skip would corrupt the command or the frame)."""
    import socket

    ring, _, _ = new_ring(redis_url)
    assert ring.store_frame(b"first", source="cam", max_recent=4, now=1.0)
    conn = ring._own_connection
    conn._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    frames = [np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)
              for seed, size in enumerate((8 * 1024 * 1024 + 3, 1, 70_001))]
    for i, frame in enumerate(frames):
        assert ring.store_frame(frame, source="cam", max_recent=4, now=2.0 + i)
    assert ring._own_connection is conn  # the same connection throughout: nothing was dropped
    assert [bytes(f.data) for f in ring.latest_visual_frames(60, now=5.0)] == [b"first"] + [f.tobytes() for f in frames]


@settings(max_examples=150, deadline=None)
@given(stores=st.lists(st.tuples(
    st.sampled_from(["cam", "screen", "caméra", "\ud800"]), st.integers(1, 64), st.sampled_from([0.0, 0.033, 1e-9]),
    st.sampled_from(["", "image/jpeg"]), st.integers(0, 2**31 - 1), st.integers(0, 4),
    st.integers(-(2**63), 2**63 - 1), st.integers(-(2**63), 2**63 - 1),
    st.floats(-4.6e9, 4.6e9, allow_nan=False), st.binary(max_size=40)), min_size=1, max_size=6),
    incarnation=st.sampled_from([None, "inc-1"]))
def test_a_stores_packed_buffers_are_its_commands_packed_by_hiredis(stores, incarnation):
    # pack_store formats only what changes between stores into parts packed once per
    # shape of store; what it sends must be, byte for byte, the commands hiredis packs.
    import hiredis

    from capsule_sessions.redis import _frames, _frames_codec

    keys = SessionKeys("t", "packing")
    core = _frames._Core(object(), keys, "redis://x", FakeClock(), ("capsule:{packing}:session", "active"),
                         incarnation)
    original = _frames_codec.new_epoch
    try:
        _frames_codec.new_epoch = lambda: str(2**62 + 11)  # else each packing proposes its own
        for source, keep, interval, mime, width, height, ts, seq, now, data in stores:
            store = _prepare(core, data, source, keep, interval, mime, width, height, ts, seq, now, copy=False)
            assert store.error is None and store.packed is not None
            packed = b"".join(bytes(part) for part in store.packed)
            assert packed == b"".join(hiredis.pack_command(c) for c in store.commands)
            store.release()
    finally:
        _frames_codec.new_epoch = original


def test_a_store_prepared_without_a_copy_makes_one_for_a_subscriber_that_came_since(redis_url):
    ring, _, _ = new_ring(redis_url)
    data = np.arange(64, dtype=np.uint8)
    store = _prepare(ring._core, data, "cam", 2, 0.0, "", 0, 0, 0, 0, 1.0, copy=False)
    assert store.payload is None and store.view is not None
    frame = store.frame_bytes()
    assert bytes(frame) == data.tobytes() and not np.shares_memory(frame, data) and not frame.flags.writeable
    store.release()
    assert store.view is None


def test_a_thread_waiting_in_get_reads_the_stream_itself(redis_url, monkeypatch):
    """A frame stored on another node reaches a thread blocked in get() without a
    hand-over from the subscription's reader thread (a wake-up per frame, 40-90 us on a
    loaded machine): the waiting thread reads the stream while it waits. A thread that
    is not waiting leaves the reading to the reader thread, which keeps the books."""
    from capsule_sessions.redis._frames_queue import RedisQueue

    readers = []
    real_push = RedisQueue.push_read

    def push_read(self, frame, seq, epoch):
        readers.append(threading.current_thread().name)
        return real_push(self, frame, seq, epoch)

    monkeypatch.setattr(RedisQueue, "push_read", push_read)
    ring, keys, _ = new_ring(redis_url)
    other_node = RedisFrameRing(client_for(redis_url), keys, redis_url, FakeClock())
    sub = ring.subscribe_visual_frames(8)
    got = []

    def consume():
        for _ in range(20):
            got.append(bytes(sub.get(timeout=10).data))

    consumer = threading.Thread(target=consume, name="consumer")
    consumer.start()
    try:
        for seq in range(20):
            time.sleep(0.02)  # the consumer is back in get() by then
            assert other_node.store_frame(bytes([seq]) * 8, source="cam", max_recent=32, now=float(seq))
    finally:
        consumer.join(30)
    assert got == [bytes([seq]) * 8 for seq in range(20)]
    assert readers.count("consumer") >= 18, readers  # (the first may come before it waits)
    readers.clear()
    for seq in range(20, 25):  # nobody waits now: the reader thread books them
        assert other_node.store_frame(bytes([seq]) * 8, source="cam", max_recent=32, now=float(seq))
    wait_for(lambda: sub.qsize() == 5)
    assert readers and "consumer" not in readers
    assert sub.delivered == 20 and sub.dropped == 0


def test_an_interrupt_while_get_reads_the_stream_leaves_the_subscription_working(redis_url):
    """Ctrl-C lands while the waiting thread is inside its own read of the stream: the
    KeyboardInterrupt reaches the caller, the half-read connection is not reused, and
    the next get receives the next frame with the books balanced."""
    import signal

    ring, keys, _ = new_ring(redis_url)
    other_node = RedisFrameRing(client_for(redis_url), keys, redis_url, FakeClock())
    sub = ring.subscribe_visual_frames(8)

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(KeyboardInterrupt):
            sub.get(timeout=10)  # blocked in its XREAD when the signal comes
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert other_node.store_frame(b"after" * 2, source="cam", max_recent=4, now=1.0)
    assert bytes(sub.get(timeout=10).data) == b"after" * 2
    assert sub.delivered == 1 and sub.dropped == 0 and sub.qsize() == 0


def test_an_interrupt_as_get_counts_itself_in_leaves_the_reader_thread_reading(redis_url):
    """A waiting get counts itself so the reader thread stands aside; a KeyboardInterrupt
    as it leaves the lock after counting must not leave the count up, or no frame would
    be read again while nobody waits."""

    class InterruptOnce:
        def __init__(self, lock):
            self.lock, self.armed = lock, True

        def __enter__(self):
            return self.lock.__enter__()

        def __exit__(self, *exc):
            self.lock.__exit__(*exc)
            if self.armed:
                self.armed = False
                raise KeyboardInterrupt

    ring, keys, _ = new_ring(redis_url)
    other_node = RedisFrameRing(client_for(redis_url), keys, redis_url, FakeClock())
    sub = ring.subscribe_visual_frames(8)
    q = sub._queue
    real_lock = q.lock
    q.lock = InterruptOnce(real_lock)
    try:
        with pytest.raises(KeyboardInterrupt):
            sub.get(timeout=1)
    finally:
        q.lock = real_lock
    assert q.consumers == 0
    assert other_node.store_frame(b"read" * 2, source="cam", max_recent=4, now=1.0)
    wait_for(lambda: sub.qsize() == 1)  # the reader thread books it: nobody waits


def _wake_ups(thread):
    """How often ``thread`` has slept and woken so far (its voluntary context switches)."""
    with open(f"/proc/self/task/{thread.native_id}/status") as status:
        for line in status:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches in /proc")


def _reader_thread(keys):
    """The thread of the one subscription to the frames of ``keys``."""
    [reader] = [t for t in threading.enumerate() if t.name == f"capsule-redis-sub {keys.key('frames')}"]
    return reader


def _wake_ups_once_waiting(q, reader):
    """``reader``'s wake-ups so far, once a thread waits in get and the read the reader
    thread was in (READ_BLOCK_MS) is over."""
    wait_for(lambda: q.consumers == 1)
    time.sleep(0.25)
    return _wake_ups(reader)


def test_the_reader_thread_sleeps_while_a_thread_waits_in_get(redis_url):
    """While a thread waits in get (reading the stream itself), the reader thread stands
    aside asleep until it must read again, rather than waking every few ms to look."""
    import os
    import queue

    if not os.path.exists("/proc/self/task"):
        pytest.skip("a thread's wake-ups are counted in /proc")

    ring, keys, _ = new_ring(redis_url)
    sub = ring.subscribe_visual_frames(4)
    q = sub._queue
    reader = _reader_thread(keys)
    timed_out = []

    def consume():
        with pytest.raises(queue.Empty):
            sub.get(timeout=1.5)
        timed_out.append(True)

    consumer = threading.Thread(target=consume)
    consumer.start()
    try:
        before = _wake_ups_once_waiting(q, reader)
        time.sleep(0.5)
        woken = _wake_ups(reader) - before
    finally:
        consumer.join(10)
    assert timed_out == [True]
    assert woken <= 3, woken  # polling every CONSUMER_GRACE_S woke it 50 times or more
    sub.close()


def test_a_frame_loops_gets_do_not_wake_the_reader_thread_per_frame(redis_url):
    """A thread that calls get in a loop, each frame arriving while it waits, leaves and
    comes back once per frame: the reader thread is not woken for each (it looks again
    every READER_PARK_S), so a frame's get does not pay for waking it."""
    import os

    if not os.path.exists("/proc/self/task"):
        pytest.skip("a thread's wake-ups are counted in /proc")

    ring, keys, _ = new_ring(redis_url)
    other_node = RedisFrameRing(client_for(redis_url), keys, redis_url, FakeClock())
    sub = ring.subscribe_visual_frames(4)
    q = sub._queue
    reader = _reader_thread(keys)
    frames = 60
    got = []
    asking = threading.Event()

    def consume():
        for _ in range(frames):
            asking.set()
            got.append(sub.get(timeout=5).frame_seq)

    consumer = threading.Thread(target=consume)
    consumer.start()
    try:
        before = _wake_ups_once_waiting(q, reader)
        started = time.monotonic()
        for seq in range(frames):
            wait_for(lambda: q.consumers == 1)
            asking.clear()
            assert other_node.store_frame(b"x", source="cam", max_recent=2, frame_seq=seq, now=float(seq))
            if seq < frames - 1:
                wait_for(asking.is_set)  # it has the frame, and asks for the next
        consumer.join(10)
        woken = _wake_ups(reader) - before
        took = time.monotonic() - started
    finally:
        consumer.join(10)
    assert got == list(range(frames))
    # Once per READER_PARK_S of the loop (and the grace after its end) at most; a wake-up
    # per get was 60 or more.
    assert woken <= 3 + took / 0.25, (woken, took)
    sub.close()


def test_the_reader_thread_reads_again_once_the_waiting_thread_left(redis_url):
    """The reader thread, asleep while a thread waits in get, reads again once the last
    one left (with a frame or at its timeout; it looks within READER_PARK_S) and books
    what another node stores next."""
    import queue

    ring, keys, _ = new_ring(redis_url)
    other_node = RedisFrameRing(client_for(redis_url), keys, redis_url, FakeClock())
    sub = ring.subscribe_visual_frames(8)
    with pytest.raises(queue.Empty):
        sub.get(timeout=0.3)
    for seq in range(3):
        assert other_node.store_frame(bytes([seq]) * 4, source="cam", max_recent=8, now=float(seq))
    wait_for(lambda: sub.qsize() == 3, timeout=2)
    assert [bytes(sub.get(timeout=0).data) for _ in range(3)] == [bytes([seq]) * 4 for seq in range(3)]
    got = []
    consumer = threading.Thread(target=lambda: got.append(bytes(sub.get(timeout=5).data)))
    consumer.start()
    wait_for(lambda: sub._queue.consumers == 1)
    time.sleep(0.2)  # asleep by now
    assert other_node.store_frame(b"got", source="cam", max_recent=8, now=3.0)
    consumer.join(10)
    assert got == [b"got"]
    assert other_node.store_frame(b"then", source="cam", max_recent=8, now=4.0)
    wait_for(lambda: sub.qsize() == 1, timeout=2)
    assert sub.delivered == 4 and sub.dropped == 0


def test_a_waiting_get_whose_read_failed_leaves_reconnecting_to_the_reader_thread(redis_url):
    """The connection a waiting get reads on is cut while the reader thread sleeps beside
    it: the failure wakes the reader thread, which reconnects and reads, so the get still
    receives the next frame (it does not reconnect itself, nor wait for its timeout)."""
    ring, keys, client = new_ring(redis_url)
    other_node = RedisFrameRing(client_for(redis_url), keys, redis_url, FakeClock())
    sub = ring.subscribe_visual_frames(8)
    got = []
    consumer = threading.Thread(target=lambda: got.append(bytes(sub.get(timeout=5).data)))
    consumer.start()
    try:
        wait_for(lambda: sub._queue.consumers == 1)
        time.sleep(0.25)  # the reader thread stands aside: the waiting get reads
        wait_for(lambda: any(c["cmd"] == "xread" for c in client.client_list()))
        for blocked in [c for c in client.client_list() if c["cmd"] == "xread"]:
            client.client_kill_filter(_id=blocked["id"])
        wait_for(lambda: sub._queue.reader.failures > 0)
        assert other_node.store_frame(b"after", source="cam", max_recent=8, now=1.0)
    finally:
        consumer.join(10)
    assert got == [b"after"]
    assert sub.delivered == 1 and sub.dropped == 0


def test_an_xadd_the_script_did_not_open_adds_nothing(redis_url):
    # At rest the stream's last id is the last one there is: only a store's own MULTI
    # (its script first) can append, so a frame is never in the ring uncounted.
    ring, keys, client = new_ring(redis_url)
    assert ring.store_frame(b"one", source="cam", max_recent=4, now=1.0)
    with pytest.raises(redis.exceptions.ResponseError, match="exhausted"):
        client.xadd(frame_keys(keys)[0], {"d": b"stray"}, nomkstream=True)
    assert client.xadd(frame_keys(keys)[0] + "x", {"d": b"stray"}, nomkstream=True) is None
    assert [bytes(f.data) for f in ring.latest_visual_frames(10, now=1.0)] == [b"one"]


def test_scripts_the_server_lost_are_loaded_again(redis_url):
    ring, keys, client = new_ring(redis_url)
    sub = ring.subscribe_visual_frames(8)
    for n in range(3):
        client.script_flush()
        assert ring.store_frame(payload(n), source="cam", max_recent=4, frame_seq=n, now=float(n))
    client.script_flush()
    assert not ring.store_frame(b"x", source="cam", max_recent=4, min_interval=10.0, now=2.5)
    client.script_flush()
    assert ring.visual_stats() == {"accepted": 3, "rate_limited": 1, "source_resets": 0, "frames": 3,
                                   "bytes": sum(len(payload(n)) for n in range(3))}
    assert client.xlen(frame_keys(keys)[0]) == 3
    assert [sub.get(timeout=5).frame_seq for _ in range(3)] == [0, 1, 2] and sub.dropped == 0


def test_a_subscription_is_a_capsule_sessions_subscription(redis_url):
    ring, _, _ = new_ring(redis_url)
    sub = ring.subscribe_visual_frames(2)
    assert isinstance(sub, Subscription) and isinstance(sub, capsule_sessions.Subscription)
    sub.close()


@pytest.mark.parametrize("base", [0.0, 1.7e9, -4.6e9])
def test_the_rate_check_compares_int64_nanoseconds_exactly(redis_url, base):
    # Far from zero a double cannot hold an instant in ns; the script compares (s, ns) pairs.
    ring, _, _ = new_ring(redis_url)
    pure = FrameRing(FakeClock(), 0.0)
    step = math.ulp(base) if base else 1e-9
    interval = 2 * step
    for k in (0, 1, 2, 3, 5, 6, 7, 9):
        now = base + k * step
        args = {"source": "cam", "max_recent": 2, "min_interval": interval, "now": now}
        assert ring.store_frame(b"x", **args) is pure.store_frame(b"x", **args), (k, now)
    assert ring.visual_stats() == pure.visual_stats()


def test_instants_read_back_exactly(redis_url):
    ring, _, _ = new_ring(redis_url)
    for now in (1.7e9 + 0.123456789, -1e-300, 2**62 / 1e9 - 1e3, 0.1 + 0.2):
        assert ring.store_frame(b"x", source="cam", max_recent=1, now=now)
        [frame] = ring.latest_visual_frames(math.inf, now=now)
        assert frame.received_at == now


def test_text_of_any_str_is_stored_as_it_is(redis_url):
    ring, _, _ = new_ring(redis_url)
    for text in ("", "caméra", "\ud800 lone surrogate", "a\x00b", "🎥" * 50):
        assert ring.store_frame(b"x", source=text, max_recent=1, mime_type=text, now=1.0)
        [frame] = ring.latest_visual_frames(10, now=1.0)
        assert (frame.source, frame.mime_type) == (text, text)


EPOCH = str(2**62 + 7)


def _entry(client, key, entry_id=EPOCH + "-1", **changes):
    fields = {"d": b"abc", "s": "cam", "m": "", "w": "0", "h": "0", "t": "0", "f": "0", "r": "1.0",
              "n": "1000000000"}
    fields.update(changes)
    client.xadd(key, {k: v for k, v in fields.items() if v is not None}, id=entry_id)


@pytest.mark.parametrize("changes", [
    {"w": "-1"}, {"w": "abc"}, {"h": "2147483648"}, {"f": "1e3"}, {"t": "07"}, {"r": "1.00"},
    {"r": "nan"}, {"n": "999"}, {"n": None}, {"s": b"\xff\xfe"}, {"x": "extra"},
    {"entry_id": "5-1"}, {"entry_id": f"{2**63}-1"},
], ids=str)
def test_a_corrupted_entry_is_a_redis_data_error_naming_the_key(redis_url, changes):
    ring, keys, client = new_ring(redis_url)
    _entry(client, frame_keys(keys)[0], **changes)
    with pytest.raises(RedisDataError, match=re.escape(repr(frame_keys(keys)[0]))):
        ring.latest_visual_frames(math.inf, now=1.0)


# The order a store writes an entry's fields in (read without a dict), and another one.
_STORE_ORDER = ("s", "m", "w", "h", "t", "f", "r", "n", "d")
_OTHER_ORDER = ("d", "n", "r", "f", "t", "h", "w", "m", "s")


def _entry_in(client, key, order, entry_id, **changes):
    fields = {"d": b"abc", "s": "cam", "m": "", "w": "0", "h": "0", "t": "0", "f": "0", "r": "1.0",
              "n": "1000000000"}
    fields.update(changes)
    client.xadd(key, {k: fields[k] for k in order if fields.get(k) is not None}, id=entry_id)


@pytest.mark.parametrize("order", [_STORE_ORDER, _OTHER_ORDER], ids=["store-order", "other-order"])
@pytest.mark.parametrize("changes", [
    {"w": "-1"}, {"f": "1e3"}, {"t": "07"}, {"r": "1.00"}, {"n": "999"}, {"n": None}, {"s": b"\xff\xfe"},
    {"m": b"\xff"}, {"d": None},
], ids=str)
def test_a_subscriber_counts_an_entry_it_cannot_read_as_dropped(redis_url, order, changes):
    # Entries in the order a store writes them are read without a dict of their fields:
    # that way checks each field as the other does.
    ring, keys, client = new_ring(redis_url)
    sub = ring.subscribe_visual_frames(8)
    key = frame_keys(keys)[0]
    _entry_in(client, key, order, EPOCH + "-1", **changes)
    _entry_in(client, key, order, EPOCH + "-2", f="2")
    frame = sub.get(timeout=5)
    assert (bytes(frame.data), frame.frame_seq, frame.received_at) == (b"abc", 2, 1.0)
    assert sub.dropped == 1
    sub.close()


@pytest.mark.parametrize("order", [_STORE_ORDER, _OTHER_ORDER], ids=["store-order", "other-order"])
def test_a_subscriber_reads_an_entry_in_any_order_of_its_fields(redis_url, order):
    ring, keys, client = new_ring(redis_url)
    sub = ring.subscribe_visual_frames(8)
    _entry_in(client, frame_keys(keys)[0], order, EPOCH + "-1", s="caméra", m="image/jpeg", w="640", h="480",
              t="-5", f="9")
    frame = sub.get(timeout=5)
    assert (bytes(frame.data), frame.source, frame.mime_type, frame.width, frame.height, frame.timestamp_ms,
            frame.frame_seq, frame.received_at) == (b"abc", "caméra", "image/jpeg", 640, 480, -5, 9, 1.0)
    assert sub.dropped == 0 and not frame.data.flags.writeable
    sub.close()


def test_the_frame_cache_hands_out_a_held_array_and_forgets_dead_ones():
    import numpy as np

    from capsule_sessions.redis._frames_codec import SWEEP_MIN, Cache

    cache = Cache()
    held = cache.share(b"e", 1, np.frombuffer(b"abc", dtype=np.uint8))
    assert cache.share(b"e", 1, np.frombuffer(b"abc", dtype=np.uint8)) is held
    other = np.frombuffer(b"abcd", dtype=np.uint8)
    assert cache.share(b"e", 1, other) is other  # not the same bytes: the new array is the frame's
    for seq in range(2, 10 * SWEEP_MIN):
        cache.share(b"e", seq, np.frombuffer(b"x", dtype=np.uint8))  # dead as soon as shared
    assert len(cache) <= 2 * SWEEP_MIN + 1  # swept as it doubled, not one entry per frame ever read
    assert cache.share(b"e", 1, np.frombuffer(b"abcd", dtype=np.uint8)) is other  # still held: still shared


def test_an_entry_this_library_wrote_reads_back(redis_url):
    ring, keys, client = new_ring(redis_url)
    _entry(client, frame_keys(keys)[0])  # the helper above writes what a store writes
    [frame] = ring.latest_visual_frames(math.inf, now=1.0)
    assert bytes(frame.data) == b"abc" and frame.received_at == 1.0


# What a store with the keys corrupted is (after a first store at 1.0): accepted, then
# rate-limited (its count is its only write), then a source switch (which counts, and
# clears the stream and the sizes, so they are checked before).
_ACCEPTED = {"source": "cam", "now": 2.0}
_LIMITED = {"source": "cam", "now": 1.2}
_SWITCH = {"source": "screen", "now": 2.0}


@pytest.mark.parametrize("what, corrupt, store", [
    ("frames", lambda c, k: c.set(k[0], "x"), _ACCEPTED),
    ("frames:meta", lambda c, k: c.set(k[1], "x"), _ACCEPTED),
    ("frames:sizes", lambda c, k: c.set(k[2], "x"), _ACCEPTED),
    ("frames:meta", lambda c, k: c.hset(k[1], "accepted", "many"), _ACCEPTED),
    ("frames:meta", lambda c, k: c.hset(k[1], "accepted", "inf"), _ACCEPTED),
    ("frames:meta", lambda c, k: c.hset(k[1], "last_hi", "1.5"), _ACCEPTED),
    ("frames:meta", lambda c, k: c.hset(k[1], "epoch", "x"), _ACCEPTED),
    ("frames:meta", lambda c, k: c.set(k[1], "x"), _LIMITED),
    ("frames:meta", lambda c, k: c.hset(k[1], "rate_limited", "many"), _LIMITED),
    ("frames:meta", lambda c, k: c.hset(k[1], "source_resets", "1.5"), _SWITCH),
    ("frames", lambda c, k: c.set(k[0], "x"), _SWITCH),
    ("frames:sizes", lambda c, k: c.set(k[2], "x"), _SWITCH),
], ids=str)
def test_a_corrupted_key_fails_a_store_naming_it_and_changes_nothing(redis_url, what, corrupt, store):
    ring, keys, client = new_ring(redis_url)
    assert ring.store_frame(b"first", source="cam", max_recent=1, now=1.0)
    names = frame_keys(keys)
    corrupt(client, names)
    before = {name: client.dump(name) for name in names}
    with pytest.raises(RedisDataError, match=re.escape(keys.key(what))):
        ring.store_frame(b"second", max_recent=1, min_interval=0.5, **store)
    assert {name: client.dump(name) for name in names} == before  # nothing half-applied


@pytest.mark.parametrize("what, corrupt", [
    ("frames:sizes", lambda c, k: c.rpush(k[2], "big")),
    ("frames:sizes", lambda c, k: c.rpush(k[2], "-5")),
    ("frames:sizes", lambda c, k: c.rpush(k[2], "2.5")),
    ("frames:sizes", lambda c, k: c.set(k[2], "x")),
    ("frames:meta", lambda c, k: c.set(k[1], "x")),
    ("frames:meta", lambda c, k: c.hset(k[1], "accepted", "many")),
    ("frames", lambda c, k: c.set(k[0], "x")),
], ids=str)
def test_a_corrupted_key_fails_visual_stats_naming_it(redis_url, what, corrupt):
    # The ring's bytes are the sum of its sizes, taken when asked: a store never reads them.
    ring, keys, client = new_ring(redis_url)
    assert ring.store_frame(b"first", source="cam", max_recent=4, now=1.0)
    corrupt(client, frame_keys(keys))
    with pytest.raises(RedisDataError, match=re.escape(keys.key(what))):
        ring.visual_stats()


@pytest.mark.parametrize("configured", [None, 1 << 20])
def test_a_readers_connection_reads_a_frame_in_few_pieces(redis_url, configured):
    # A 64 KiB frame's reply is a little over redis-py's 64 KiB buffer: a reader read its
    # socket three times for it. A pool configured for more keeps its own.
    from capsule_sessions.redis._connect import READ_BUFFER_BYTES

    extra = {} if configured is None else {"socket_read_size": configured}
    client = redis.Redis.from_url(redis_url, **extra)
    ring, _, _ = new_ring(redis_url, client=client)
    conn = ring._core.reader_connection(None)
    try:
        conn.connect()
        want = max(READ_BUFFER_BYTES, configured or 0)
        assert len(conn._parser._buffer) == want >= 2 * (64 << 10)
    finally:
        conn.disconnect()
        client.close()


def test_a_managers_client_reads_a_frame_in_few_pieces(redis_url):
    from capsule_sessions.redis._connect import READ_BUFFER_BYTES, connect

    client = connect(redis_url)
    try:
        client.ping()
        conn = client.connection_pool.get_connection()
        try:
            assert len(conn._parser._buffer) == READ_BUFFER_BYTES >= 2 * (64 << 10)
        finally:
            client.connection_pool.release(conn)
    finally:
        client.close()


def test_nodes_share_one_ring_and_its_counts(redis_url):
    clock = FakeClock()
    a, keys, client = new_ring(redis_url, clock=clock)
    b = RedisFrameRing(client_for(redis_url), keys, redis_url, clock)
    assert a.store_frame(payload(1), source="cam", max_recent=2, min_interval=1.0, frame_seq=1)
    assert b.store_frame(payload(2), source="cam", max_recent=2, min_interval=1.0, frame_seq=2) is False
    clock.advance(1.0)
    assert b.store_frame(payload(3), source="screen", max_recent=2, min_interval=1.0, frame_seq=3)
    assert [f.frame_seq for f in a.latest_visual_frames(10)] == [3]
    assert a.visual_stats() == b.visual_stats() == {"accepted": 2, "rate_limited": 1, "source_resets": 1,
                                                    "frames": 1, "bytes": len(payload(3))}


def test_a_subscriber_of_another_ring_gets_the_frames_in_order_then_the_end(redis_url):
    a, keys, _ = new_ring(redis_url)
    b = RedisFrameRing(client_for(redis_url), keys, redis_url, FakeClock())
    sub = b.subscribe_visual_frames(64)
    for seq in range(20):
        assert a.store_frame(payload(seq), source="cam", max_recent=64, frame_seq=seq)
    a.close_subscriptions()  # the session ended on node a: node b's reader books, then closes
    got = [f.frame_seq for f in sub]  # iteration ends at SubscriptionClosed
    assert got == list(range(20)) and sub.dropped == 0 and sub.closed
    assert b.subscribe_visual_frames().closed  # made after the end: closed at once
    assert all(0 < t <= 600 for t in (a._core.client.ttl(k) for k in frame_keys(keys)[:2]))


def test_frames_trimmed_before_a_reader_read_them_count_as_dropped(redis_url):
    # Node a stores many frames in one pipeline (faster than any reader): node b's reader
    # finds the stream trimmed past where it was, and counts the gap.
    a, keys, client = new_ring(redis_url)
    b = RedisFrameRing(client_for(redis_url), keys, redis_url, FakeClock())
    sub = b.subscribe_visual_frames(1000)
    a.store_frame(b"", source="cam", max_recent=2, frame_seq=-1, now=1.0)  # the scripts are loaded
    commands = []
    for seq in range(499):
        commands += _prepare(a._core, payload(seq), "cam", 2, 0.0, "", 0, 0, 0, seq, 1.0).commands
    a._exchange(commands)  # 499 stores in one write
    wait_for(lambda: sub.delivered + sub.dropped + sub.qsize() == 500)
    got = [f.frame_seq for f in iter(lambda: sub.get(timeout=0) if sub.qsize() else None, None)]
    assert got == sorted(got) and got[-1] == 498
    assert sub.dropped == 500 - len(got) > 0
    assert a.visual_stats()["accepted"] == 500
    sub.close()


def test_a_store_through_an_unreachable_server_names_the_url_and_returns(redis_url):
    from capsule_sessions.redis import RedisUnavailableError

    dead = "redis://user:secret@127.0.0.1:1/0"
    ring, _, _ = new_ring(dead, client=client_for(dead, timeout=0.5))
    started = time.monotonic()
    with pytest.raises(RedisUnavailableError, match=re.escape("redis://user:***@127.0.0.1:1/0")) as err:
        ring.store_frame(b"x", source="cam", max_recent=1)
    assert "secret" not in str(err.value) and time.monotonic() - started < 5
    for call in (lambda: ring.latest_visual_frames(1), ring.visual_stats, ring.subscribe_visual_frames,
                 lambda: ring.start_visual_input("x")):
        with pytest.raises(RedisUnavailableError):
            call()


# -- the asyncio twin -------------------------------------------------------------------


def test_the_asyncio_twin_stores_subscribes_and_commits_loans(redis_url):
    import redis.asyncio

    async def main():
        client = redis.asyncio.Redis.from_url(redis_url)
        keys = SessionKeys(f"t{uuid.uuid4().hex[:10]}", "async")
        ring = AsyncRedisFrameRing(client, keys, redis_url, FakeClock())
        other = RedisFrameRing(client_for(redis_url), keys, redis_url, FakeClock())
        sub = await ring.subscribe_visual_frames(8)
        assert isinstance(sub, Subscription)
        assert await ring.store_frame(payload(1), source="cam", max_recent=4, frame_seq=1)
        loan = await ring.loan_frame(len(payload(2)))
        assert isinstance(loan, capsule_sessions.FrameLoan)
        loan.array[:] = np.frombuffer(payload(2), np.uint8)
        assert await loan.commit(source="cam", max_recent=4, frame_seq=2)
        await asyncio.to_thread(other.store_frame, payload(3), source="cam", max_recent=4, frame_seq=3)
        got = [(await sub.aget(timeout=5)).frame_seq for _ in range(3)]
        assert got == [1, 2, 3]
        assert [f.frame_seq for f in await ring.latest_visual_frames(10)] == [1, 2, 3]
        assert (await ring.visual_stats())["accepted"] == 3
        await asyncio.to_thread(other.close_subscriptions)
        with pytest.raises(SubscriptionClosed):
            await sub.aget(timeout=5)
        await client.aclose()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_the_asyncio_twin_sends_the_callers_bytes_without_a_copy_of_its_own(redis_url, monkeypatch):
    """As the sync ring: the frame's own copy is made only when the ring has a local
    subscriber (one that came while the store waited for the lock gets a copy made
    then), and the caller's buffer is free again once the store returned, failed too."""
    import redis.asyncio

    from capsule_sessions.redis import RedisUnavailableError, _frames

    copies = []
    real_copy = _frames.copy_bytes
    monkeypatch.setattr(_frames, "copy_bytes", lambda data: copies.append(1) or real_copy(data))

    async def main():
        client = redis.asyncio.Redis.from_url(redis_url)
        ring = AsyncRedisFrameRing(client, SessionKeys(f"t{uuid.uuid4().hex[:10]}", "async"), redis_url,
                                   FakeClock())
        held = bytearray(b"abcdefgh")
        numbers = np.arange(48, dtype=np.uint16)
        assert await ring.store_frame(held, source="cam", max_recent=8, now=1.0)
        held.extend(b"!")  # a bytearray with an exported view raises BufferError here
        assert await ring.store_frame(numbers, source="cam", max_recent=8, now=2.0)
        numbers.resize(60)  # numpy refuses while a view of it is alive
        assert copies == []
        # A subscriber that came while a store prepared without a copy waited for the lock.
        await ring._lock.acquire()
        subscribing = asyncio.create_task(ring.subscribe_visual_frames(8))
        await asyncio.sleep(0)  # waiting for the lock, first
        storing = asyncio.create_task(ring.store_frame(held, source="cam", max_recent=8, now=3.0))
        await asyncio.sleep(0)  # prepared, and waiting for the lock after it
        ring._lock.release()
        sub = await subscribing
        try:
            assert await storing
            held.extend(b"?")
            assert copies == []
            assert await ring.store_frame(held, source="cam", max_recent=8, now=4.0)  # a subscriber: one copy
            assert copies == [1]
            held[:] = b"changed"
            assert [bytes((await sub.aget(timeout=5)).data) for _ in range(2)] == [b"abcdefgh!", b"abcdefgh!?"]
            assert [bytes(f.data) for f in await ring.latest_visual_frames(10, now=4.0)] == [
                b"abcdefgh", np.arange(48, dtype=np.uint16).tobytes(), b"abcdefgh!", b"abcdefgh!?"]
        finally:
            sub.close()  # its reader ends, whatever failed here
        await client.aclose()
        dead = "redis://127.0.0.1:1/0"
        dead_client = redis.asyncio.Redis.from_url(dead, socket_connect_timeout=0.5)
        dead_ring = AsyncRedisFrameRing(dead_client, SessionKeys("t", "dead"), dead, FakeClock())
        try:
            await dead_ring.store_frame(held, source="cam", max_recent=8, now=5.0)
        except RedisUnavailableError:
            held.extend(b".")  # while the error's traceback holds the store's frames
        else:
            raise AssertionError("stored into a dead server")
        await dead_client.aclose()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_an_asyncio_reader_ends_when_a_send_swallowed_its_cancellation(redis_url, monkeypatch):
    """Python 3.11's asyncio.wait_for (redis-py's send, with a timeout) returns the send's
    result when a cancellation lands as the send completes. The reader task ends anyway,
    or a loop's shutdown would wait for it forever while its subscription is alive."""
    import redis.asyncio

    from capsule_sessions.redis import _frames_async

    if not hasattr(asyncio.Task, "cancelling"):
        pytest.skip("a task counts its cancellation requests from Python 3.11")
    real_command = _frames_async._command
    swallowed = []

    async def command(conn, *args):
        try:
            return await real_command(conn, *args)
        except asyncio.CancelledError:
            if swallowed:
                raise
            swallowed.append(args[0])
            return None  # as wait_for returns the result of a send that completed

    monkeypatch.setattr(_frames_async, "_command", command)

    async def main():
        client = redis.asyncio.Redis.from_url(redis_url)
        ring = AsyncRedisFrameRing(client, SessionKeys(f"t{uuid.uuid4().hex[:10]}", "async"), redis_url,
                                   FakeClock())
        sub = await ring.subscribe_visual_frames(4)
        [task] = ring._tasks
        await asyncio.sleep(0.2)  # in its blocking read
        task.cancel()
        ended, _ = await asyncio.wait({task}, timeout=2)
        sub.close()  # (ends it within a read, if the cancellation did not)
        await asyncio.wait({task}, timeout=5)
        await client.aclose()
        return ended

    ended = asyncio.run(asyncio.wait_for(main(), 30))
    assert swallowed and ended


# -- the pure ring and the Redis ring, driven alike -------------------------------------

SOURCES = st.sampled_from(["", "cam", "screen"])
DURATIONS = st.one_of(st.sampled_from([0.0, -1.0, 0.001, 0.5, 1.0, math.inf, -math.inf, math.nan, 10**400]),
                      st.floats(-2.0, 5.0, allow_nan=False))
STEPS = st.one_of(st.sampled_from([0.0, 1e-9, 0.001, 0.5, -0.5]), st.floats(-2.0, 5.0, allow_nan=False))
BASES = st.sampled_from([0.0, 1.7e9, -1e6])
SEQS = st.one_of(st.integers(0, 100), st.integers(-(2**63), 2**63 - 1))
WIDTHS = st.one_of(st.just(0), st.integers(0, 4000), st.integers(0, 2**31 - 1))
BAD_NUMBERS = st.sampled_from([-1, 2**31, 2**64, True, 1.5, "1", None])


def agreed(call):
    got = outcome(call, catch=Exception)
    if got[0] == "ok":
        result = got[1]
        if isinstance(result, list):
            return ("ok", [frame_key(f) for f in result])
        if isinstance(result, VisualFrame):
            return ("ok", frame_key(result))
        if isinstance(result, Subscription):
            return ("ok", ("subscription", result.maxsize, result.policy, result.closed))
    return got


class PureAndRedisAgree(RuleBasedStateMachine):
    subs = Bundle("subs")
    url = ""

    def __init__(self):
        super().__init__()
        self.pure = FrameRing(FakeClock(), 0.0)
        self.redis, _, self.client = new_ring(self.url)
        self.rings = (self.pure, self.redis)
        self.now = 0.0
        self.live = []

    def both(self, method, *args, **kwargs):
        a, b = (agreed(lambda r=r: getattr(r, method)(*args, **kwargs)) for r in self.rings)
        assert a == b, f"{method}{args!r:.200}{kwargs}: pure gave {a!r:.300}, redis gave {b!r:.300}"
        return a

    @rule(base=st.one_of(st.none(), BASES), step=STEPS)
    def time_moves(self, base, step):
        self.now = (self.now if base is None else base) + step

    @rule(size=st.sampled_from([0, 1, 8, 1000, 70_000]), seed=st.integers(0, 255), source=SOURCES,
          max_recent=st.integers(-1, 4), min_interval=DURATIONS, seq=SEQS, width=WIDTHS,
          mime=st.sampled_from(["", "image/jpeg"]), shaped=st.booleans())
    def store_frame(self, size, seed, source, max_recent, min_interval, seq, width, mime, shaped):
        data = np.full(size, seed, np.uint8)
        if shaped and size % 4 == 0:
            data = data.reshape(-1, 4)
        self.both("store_frame", data, source=source, max_recent=max_recent, min_interval=min_interval,
                  mime_type=mime, width=width, height=3, timestamp_ms=seed, frame_seq=seq, now=self.now)

    @rule(size=st.integers(0, 64), max_recent=st.sampled_from([2, 3, 3, 4, 4]), steps=st.integers(1, 6))
    def store_a_run(self, size, max_recent, steps):
        # A camera's stores: one source, a rate limit, the ring filling up and trimming.
        for n in range(steps):
            self.now += 0.004 * (n % 3)
            self.both("store_frame", payload(size + n), source="cam", max_recent=max_recent, frame_seq=n,
                      min_interval=0.005, now=self.now)

    @rule(name=st.sampled_from(["width", "height", "frame_seq", "timestamp_ms", "mime_type", "max_recent",
                                "min_interval", "now", "source"]), bad=BAD_NUMBERS)
    def store_with_a_bad_argument(self, name, bad):
        kwargs = {"source": "cam", "max_recent": 2, "now": self.now, name: bad}
        self.both("store_frame", b"bad", **kwargs)
        self.both("store_frame", bad, source="cam", max_recent=1, now=self.now)
        self.both("store_visual_frame", bad, 1, 0.0, self.now)

    @rule(source=SOURCES, max_recent=st.integers(-1, 4), min_interval=DURATIONS)
    def store_visual_frame(self, source, max_recent, min_interval):
        frame = VisualFrame(b"\xff\xd8\xff" + bytes(5), "image/jpeg", 4, 3, source, 7, 1)
        self.both("store_visual_frame", frame, max_recent, min_interval, self.now)

    @rule(ttl=DURATIONS, offset=st.sampled_from([0.0, -1.0, 1.0, math.nan]))
    def latest(self, ttl, offset):
        self.both("latest_visual_frames", ttl, now=self.now + offset)

    @rule(start=st.booleans(), source=st.one_of(SOURCES, st.sampled_from([5, b"cam"])))
    def start_or_stop(self, start, source):
        self.both("start_visual_input" if start else "stop_visual_input", source, now=self.now)

    @rule(nbytes=st.sampled_from([0, 5, 4096, -1, 2**41, 1.0]), source=SOURCES, min_interval=DURATIONS)
    def loan(self, nbytes, source, min_interval):
        loans = [agreed(lambda r=r: r.loan_frame(nbytes)) for r in self.rings]
        assert [x[0] for x in loans] == [loans[0][0]] * 2 and (loans[0][0] == "ok" or loans[0] == loans[1])
        if loans[0][0] == "ok":
            results = []
            for (_, held) in loans:
                held.array[:] = 9
                results.append(agreed(lambda h=held: h.commit(source=source, max_recent=2,
                                                              min_interval=min_interval, now=self.now)))
            assert results[0] == results[1]

    @rule(target=subs, buffer=st.integers(-1, 4), policy=st.sampled_from(["drop_newest", "drop_oldest", "x"]))
    def subscribe(self, buffer, policy):
        pair = [r.subscribe_visual_frames(buffer, policy=policy) if policy != "x" else None for r in self.rings]
        if policy == "x":
            self.both("subscribe_visual_frames", buffer, policy=policy)
            return ()  # nothing to read or close
        self.live.append(pair)
        return tuple(pair)

    @rule(pair=subs, close=st.booleans())
    def read_or_close(self, pair, close):
        for sub in pair if close else ():
            sub.close()
        if pair:
            results = [agreed(sub.get_nowait) for sub in pair]
            assert results[0] == results[1]

    @rule()
    def end(self):
        for ring in self.rings:
            ring.close_subscriptions()

    @invariant()
    def agree(self):
        assert self.pure.visual_stats() == self.redis.visual_stats()
        assert self.pure.subscriber_count == self.redis.subscriber_count
        for x, y in self.live:
            assert sub_books(x) == sub_books(y)

    def teardown(self):
        for pair in self.live:
            for sub in pair:
                sub.close()
        self.client.close()


def test_the_pure_ring_and_the_redis_ring_agree(redis_url):
    PureAndRedisAgree.url = redis_url
    run_state_machine_as_test(PureAndRedisAgree, settings=settings(
        max_examples=40, stateful_step_count=50, deadline=None, database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.function_scoped_fixture]))


@pytest.mark.parametrize("parser", ["hiredis", "python"])
def test_a_stores_replies_read_straight_from_hiredis_are_redis_pys_own(redis_url, parser):
    """_frames.read_replies (a store's five replies, read from hiredis's reader without
    redis-py's read_response): the same values as redis-py gives, an error reply as its
    exception (at the top and inside EXEC's array), and redis-py's ConnectionError when
    the server closes the connection mid-read; with redis-py's pure-Python parser it
    reads through read_response."""
    import redis._parsers as parsers
    import redis.exceptions as rx

    from capsule_sessions.redis._frames import read_replies

    parser_class = parsers._HiredisParser if parser == "hiredis" else parsers._RESP2Parser
    connections = [redis.Redis.from_url(redis_url, parser_class=parser_class).connection_pool.get_connection()
                   for _ in range(2)]
    commands = [("SET", "k", "v"), ("MULTI",), ("INCR", "k"), ("GET", "k"), ("EXEC",), ("NOSUCHCOMMAND",),
                ("EVALSHA", "0" * 40, "0"), ("GET", "k")]
    got = []
    for conn, read in zip(connections, ("ours", "redis-py"), strict=True):
        conn.send_packed_command(conn.pack_commands(commands))
        if read == "ours":
            replies = read_replies(conn, len(commands))
        else:
            replies = []
            for _ in commands:
                try:
                    replies.append(conn.read_response(disable_decoding=True))
                except rx.ResponseError as exc:
                    replies.append(exc)
        got.append([(type(r), str(r)) if isinstance(r, Exception) else r for r in replies])
        if isinstance(replies[4], list):
            got[-1][4] = [(type(r), str(r)) if isinstance(r, Exception) else r for r in replies[4]]
    assert got[0] == got[1]
    ours = got[0]
    assert ours[0] == b"OK" and ours[1] == b"OK" and ours[2] == ours[3] == b"QUEUED"
    assert ours[4][0][0] is rx.ResponseError and ours[4][1] == b"v"  # INCR of "v" failed inside EXEC
    assert ours[5][0] is rx.ResponseError and ours[6][0] is rx.NoScriptError and ours[7] == b"v"

    killed, killer = connections
    victim = _client_id(killed)
    killer.send_command("CLIENT", "KILL", "ID", victim)
    assert killer.read_response() == 1
    with pytest.raises(rx.ConnectionError):
        read_replies(killed, 1)  # the server closed it: nothing more comes
    for conn in connections:
        conn.disconnect()


def _client_id(conn) -> int:
    conn.send_command("CLIENT", "ID")
    return int(conn.read_response())
