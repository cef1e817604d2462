"""A Redis session's frames across processes: what one node stores, another reads and
receives, with every frame it missed counted as dropped, through a slow reader and a
Redis restart, and never a hang.

Each node is a process of its own (a child interpreter started fresh, as another machine
would be), with its own client and its own RedisFrameRing on the same keys.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
import uuid

import pytest
from redis_frames_support import client_for

from capsule_sessions.redis import RedisUnavailableError
from capsule_sessions.redis._frames import RedisFrameRing
from capsule_sessions.redis._keys import SessionKeys
from redis_server import redis_server
from support import FakeClock, finish, payload, start_child

CHILD_SECONDS = 40.0

# The reader node: subscribes, says "ready", receives until the session's frames end
# (checking every frame's bytes), reports progress, then what it got as JSON.
READER = """
import json, sys, time
from capsule_sessions import SubscriptionClosed
from capsule_sessions.redis._frames import RedisFrameRing
from capsule_sessions.redis._keys import SessionKeys
from redis_frames_support import client_for
from support import FakeClock, payload

url, namespace, buffer, policy, slow = {args!r}
ring = RedisFrameRing(client_for(url, timeout=1.0), SessionKeys(namespace, "cam"), url, FakeClock())
sub = ring.subscribe_visual_frames(buffer, policy=policy)
print("ready", flush=True)
got, foreign = [], 0
for frame in sub:
    if bytes(frame.data) != payload(frame.frame_seq, 4096):
        foreign += 1
    got.append(frame.frame_seq)
    print("got", len(got), frame.frame_seq, flush=True)
    if slow:
        time.sleep(slow)
latest = [f.frame_seq for f in ring.latest_visual_frames(1e9, now=0.0)]
print(json.dumps({{"got": got, "foreign": foreign, "dropped": sub.dropped, "delivered": sub.delivered,
                   "latest": latest, "stats": ring.visual_stats()}}), flush=True)
"""


def start_reader(url, namespace, buffer=1000, policy="drop_newest", slow=0.0):
    proc = start_child(READER.format(args=(url, namespace, buffer, policy, slow)), "python", CHILD_SECONDS)
    line = proc.stdout.readline()
    assert line == "ready\n", f"{line!r} {proc.stderr.read() if not line else ''}"
    return proc


def wait_for(proc, done):
    """Read the reader's progress lines ("got <count> <frame_seq>") until ``done(count,
    frame_seq)``; the reader ending first fails the test."""
    while True:
        line = proc.stdout.readline()
        assert line.startswith("got "), f"the reader ended early: {line!r} {proc.stderr.read()}"
        count, seq = map(int, line.split()[1:])
        if done(count, seq):
            return


def wait_got(proc, count):
    wait_for(proc, lambda got, seq: got >= count)


def report(proc):
    code, out, err = finish(proc)
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])


def store(ring, seq, **kwargs):
    kwargs.setdefault("max_recent", 8)
    return ring.store_frame(payload(seq, 4096), source="cam", frame_seq=seq, now=kwargs.pop("now", 0.0), **kwargs)


def new_namespace():
    return f"n{uuid.uuid4().hex[:10]}"


def test_what_one_node_stores_another_receives_and_reads(redis_url):
    namespace = new_namespace()
    ring = RedisFrameRing(client_for(redis_url), SessionKeys(namespace, "cam"), redis_url, FakeClock())
    reader = start_reader(redis_url, namespace)
    # The ring keeps all 100 (max_recent=128), so even a reader that is not reading yet
    # (its thread still connecting) finds every frame: none is dropped.
    for seq in range(100):
        assert store(ring, seq, max_recent=128)
    wait_got(reader, 100)
    assert store(ring, 100, max_recent=8)  # and now it keeps the newest 8
    wait_got(reader, 101)
    ring.close_subscriptions()  # the reader's iteration ends: it got every frame first
    got = report(reader)
    assert got["got"] == list(range(101)) and got["foreign"] == 0
    assert (got["dropped"], got["delivered"]) == (0, 101)
    assert got["latest"] == [f.frame_seq for f in ring.latest_visual_frames(math.inf, now=0.0)] == list(range(93, 101))
    assert got["stats"] == ring.visual_stats() == {"accepted": 101, "rate_limited": 0, "source_resets": 0,
                                                   "frames": 8, "bytes": 8 * 4096}


def test_a_slow_reader_counts_every_frame_it_missed(redis_url):
    # The reader node is stopped (SIGSTOP) while 200 frames are stored into a ring of 4:
    # what the stream trimmed before it read it is counted as dropped, by sequence number.
    namespace = new_namespace()
    ring = RedisFrameRing(client_for(redis_url), SessionKeys(namespace, "cam"), redis_url, FakeClock())
    reader = start_reader(redis_url, namespace)
    try:
        os.kill(reader.pid, signal.SIGSTOP)
        for seq in range(200):
            assert store(ring, seq, max_recent=4)
    finally:
        os.kill(reader.pid, signal.SIGCONT)
    for seq in range(200, 210):
        assert store(ring, seq, max_recent=4)
        time.sleep(0.002)
    wait_for(reader, lambda count, seq: seq == 209)
    ring.close_subscriptions()
    got = report(reader)
    assert got["foreign"] == 0 and got["got"] == sorted(got["got"]) and got["got"][-1] == 209
    assert got["delivered"] + got["dropped"] == 210 and got["dropped"] >= 190


def test_a_slow_consumer_drops_from_its_own_queue_by_its_policy(redis_url):
    namespace = new_namespace()
    ring = RedisFrameRing(client_for(redis_url), SessionKeys(namespace, "cam"), redis_url, FakeClock())
    reader = start_reader(redis_url, namespace, buffer=2, policy="drop_oldest", slow=0.01)
    for seq in range(40):
        assert store(ring, seq, max_recent=64)
    time.sleep(0.2)
    ring.close_subscriptions()
    got = report(reader)
    assert got["delivered"] + got["dropped"] == 40 and got["dropped"] > 0
    assert got["got"][-1] == 39  # drop_oldest keeps the newest


@pytest.mark.timeout(120)
def test_a_store_after_a_restart_while_idle_reconnects_as_a_pooled_call_does():
    """A ring stores on a connection of its own (no pool checkout per store); one the
    server closed while the ring was idle is made again before the store, as the pool
    does for the other calls, instead of failing the first store after a restart."""
    with redis_server() as server:
        url = server.url
        ring = RedisFrameRing(client_for(url, timeout=1.0), SessionKeys(new_namespace(), "cam"), url, FakeClock())
        assert store(ring, 0)
        server.restart()  # nothing was sent in between: the ring's connection is dead
        assert store(ring, 1)
        assert ring.visual_stats()["accepted"] == 1  # restarted empty: a new life of the keys


def test_a_redis_restart_is_a_clear_error_for_stores_and_readers_reconnect():
    with redis_server() as server:
        url = server.url
        namespace = new_namespace()
        ring = RedisFrameRing(client_for(url, timeout=1.0), SessionKeys(namespace, "cam"), url, FakeClock())
        reader = start_reader(url, namespace)
        try:
            for seq in range(20):
                assert store(ring, seq, max_recent=32)  # all kept: the reader gets every one
            wait_for(reader, lambda count, seq: seq == 19)
            server.kill()
            started = time.monotonic()
            with pytest.raises(RedisUnavailableError, match=url.replace(".", r"\.")):
                store(ring, 20)
            assert time.monotonic() - started < 5.0  # the client's timeout, not a hang
            for call in (ring.visual_stats, lambda: ring.latest_visual_frames(1, now=0.0)):
                with pytest.raises(RedisUnavailableError):
                    call()
            # Restarted empty (the session's frames start a new epoch) and 30 frames
            # stored into a ring of 4 while the reader node is stopped: it comes back to
            # the newest 4 and counts the other 26 as dropped.
            os.kill(reader.pid, signal.SIGSTOP)
            try:
                server.restart()
                for seq in range(20, 50):
                    assert store(ring, seq, max_recent=4)
            finally:
                os.kill(reader.pid, signal.SIGCONT)
            assert ring.visual_stats()["accepted"] == 30
            wait_for(reader, lambda count, seq: seq == 49)  # the reader is back: it has the newest
            ring.close_subscriptions()
            got = report(reader)
        finally:
            if reader.poll() is None:
                reader.kill()
                reader.wait()
    assert got["foreign"] == 0 and got["got"][:20] == list(range(20))
    assert got["got"] == sorted(got["got"]) and got["got"][-1] == 49
    # Every frame stored was received or counted: the new epoch's trimmed ones as dropped.
    assert (got["delivered"], got["dropped"]) == (24, 26) and got["got"][20:] == [46, 47, 48, 49]


@pytest.mark.timeout(120)
def test_an_asyncio_reader_reconnects_too():
    import asyncio

    import redis.asyncio

    from capsule_sessions.redis._frames import AsyncRedisFrameRing

    async def main(server):
        keys = SessionKeys(new_namespace(), "cam")
        client = redis.asyncio.Redis.from_url(server.url, socket_timeout=1.0, socket_connect_timeout=1.0)
        ring = AsyncRedisFrameRing(client, keys, server.url, FakeClock())
        producer = RedisFrameRing(client_for(server.url, timeout=1.0), keys, server.url, FakeClock())
        sub = await ring.subscribe_visual_frames(1000)
        for seq in range(10):
            assert await asyncio.to_thread(store, producer, seq, max_recent=32)  # all kept
        got = [(await sub.aget(timeout=10)).frame_seq for _ in range(10)]
        # Restarted, and 20 frames stored into a ring of 2, with the loop blocked: the
        # reader comes back to the newest two and counts the other 18 as dropped.
        server.restart()
        for seq in range(10, 30):
            assert store(producer, seq, max_recent=2)
        while not got or got[-1] != 29:
            got.append((await sub.aget(timeout=10)).frame_seq)
        await asyncio.to_thread(producer.close_subscriptions)
        async for frame in sub:
            got.append(frame.frame_seq)
        await client.aclose()
        return got, sub

    with redis_server() as server:
        got, sub = asyncio.run(asyncio.wait_for(main(server), 60))
    assert got[:10] == list(range(10)) and got == sorted(got) and got[-1] == 29
    assert (sub.delivered, sub.dropped) == (12, 18)


@pytest.mark.timeout(180)
def test_the_frame_benchmarks_run_side_by_side_and_are_judged():
    """W14-W16 with tiny settings: every figure of both contenders is there, every frame
    W16 stored was received or counted, the report has the sections and the verdicts."""
    from capsule_sessions.bench import redis_frames, report, runner

    settings = runner.Settings("tiny", repeats=2, min_batch_s=0.0005, alloc_stores=1, w8_seconds=0.01,
                               w8_repeats=1, w9_frames=10, w9_paced_frames=2, w9_interval_s=0.001,
                               w9_repeats=1, redis_frames=40, redis_warmup=10, redis_rounds=1)
    selection = runner.select("W14,W15,W16", None)
    steps = []
    results = runner.run(selection, settings, steps.append)
    assert len(steps) == runner.total_steps(selection, settings)
    json.dumps(results, allow_nan=False)
    w14, w15, w16 = (results["redis"][wid] for wid in redis_frames.IDS)
    for size in ("4096", "65536"):
        assert set(w14["results"][size]) == {"library", "redis-py", "redis-py pipelined"}
        assert w14["ratios"][size] > 0
    assert w15["aux"] == ["4096"] and set(w15["results"]["65536"]) == {"library", "redis-py"}
    for target in ("library", "redis-py"):
        r = w16["results"][target]
        assert r["missing"] == r["dropped"] and r["received"] + r["dropped"] == 50, (target, r)
    checks = [(c["workload"], c["met"]) for c in results["checks"]]
    assert [wid for wid, _ in checks] == ["W14_redis_store"] * 2 + ["W15_redis_latest"] + ["W16_redis_fanout"] * 3
    assert checks[3] == ("W16_redis_fanout", True)  # nothing lost uncounted
    text = report.markdown(results)
    assert "### W14, W15" in text and "### W16" in text and "### Targets" in text
