"""RedisSessionManager on a real Redis Cluster of three masters (tests/redis_server.py):
sessions spread over the shards and work from every node, and the membership changes
made in steps of one slot each (docs/redis.md, "Redis Cluster") stay correct when a
node is SIGKILLed between two steps. The cross-node races run on the cluster too, in
test_redis_cluster.py.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import signal
import time

import pytest
from redis.crc import key_slot

import redis_nodes
from capsule_sessions import ChatMessage, MaxSessionsError, SessionExistsError, SessionNotFoundError, SubscriptionClosed
from capsule_sessions.redis import AsyncRedisSessionManager, RedisSessionManager
from capsule_sessions.redis import _manager as redis_manager
from capsule_sessions.redis._context import key_names
from capsule_sessions.redis._keys import incs_key, registry_key


@pytest.fixture
def redis_url(redis_cluster_url):
    """Every test here on the Redis Cluster (conftest's ``raw`` reads it too)."""
    return redis_cluster_url


@pytest.fixture
def url(redis_url):
    return redis_url


@pytest.fixture
def make(url):
    made = []

    def make_manager(max_concurrent=100, **kwargs):
        m = RedisSessionManager(url, max_concurrent, cleanup_interval=None, **kwargs)
        made.append(m)
        return m

    yield make_manager
    for m in made:
        m.stop()


def _node_of(raw, key: bytes) -> str:
    node = raw.get_node_from_key(key)
    return f"{node.host}:{node.port}"


def _killed_between_steps(url: str, step: str, id: str, max_concurrent: int,
                          pending_seconds: float = redis_manager.PENDING_SECONDS) -> None:
    proc = multiprocessing.get_context("spawn").Process(target=redis_nodes.die_between_steps,
                                                        args=(url, step, id, max_concurrent, pending_seconds))
    proc.start()
    proc.join(60)
    assert proc.exitcode == -signal.SIGKILL, f"the node was to die between two steps, it exited {proc.exitcode}"


def test_sessions_spread_over_the_shards_and_work_from_every_node(make, raw):
    a, b = make(), make()
    ids = [f"cam-{i}" for i in range(12)]
    ended = []
    a.on_session_end = lambda s: ended.append(s.id)
    for id in ids:
        a.create(id)
    assert len({_node_of(raw, key_names("capsule", id).session) for id in ids}) == 3
    assert [s.id for s in b.list()] == ids and b.count() == 12 and all(id in b for id in ids)
    for i, id in enumerate(ids):
        mine, theirs = a.get(id), b.get(id)
        theirs.add_message(ChatMessage("user", f"q{i}", turn_seq=1))
        assert mine.mark_turn_started() == 1 and [m.content for m in mine.history_snapshot()] == [f"q{i}"]
        sub = theirs.subscribe_visual_frames(4)
        assert mine.store_frame(bytes([i]) * 64, source="cam", max_recent=2)
        assert bytes(sub.get(timeout=5).data) == bytes([i]) * 64
        assert [bytes(f.data) for f in theirs.latest_visual_frames(60)] == [bytes([i]) * 64]
        assert theirs.visual_stats()["accepted"] == 1
        a.delete(id)
        with pytest.raises(SubscriptionClosed):
            sub.get(timeout=5)
        assert id not in b
    assert ended == ids and b.count() == 0 and b.list() == []
    assert raw.zcard(registry_key("capsule")) == 0 and raw.hlen(incs_key("capsule")) == 0


def test_the_limit_and_the_ids_hold_across_shards(make):
    a, b = make(2), make(2)
    a.create("x")
    with pytest.raises(SessionExistsError):
        b.create("x")
    b.create("y")
    with pytest.raises(MaxSessionsError):
        a.create("z")
    b.delete("x")
    a.create("z")
    assert sorted(s.id for s in b.list()) == ["y", "z"]


def test_a_node_killed_after_taking_its_place_leaves_nothing_visible_and_the_place_is_freed(make, raw, url):
    _killed_between_steps(url, "confirm", "half-made", 1, pending_seconds=2.0)
    m = make(1)
    # Pending: the id is taken, nobody sees the session, and its place is held.
    assert "half-made" not in m and m.list() == [] and m.count() == 1
    with pytest.raises(SessionNotFoundError):
        m.get("half-made")
    with pytest.raises(SessionNotFoundError):
        m.touch("half-made")
    with pytest.raises(SessionExistsError):
        m.create("half-made")
    # The pending hash expires (the dead node's 2 s); a create at the limit repairs.
    _wait_gone(raw, key_names("capsule", "half-made").session)
    made = m.create("next")
    assert [s.id for s in m.list()] == ["next"] and m.count() == 1 and made.state.name == "INIT"


def test_a_node_killed_after_its_claim_leaves_the_session_ended_and_the_place_is_freed(make, raw, url):
    m = make(1)
    s = m.create("ending")
    _killed_between_steps(url, "release", "ending", 1)
    assert "ending" not in m and m.list() == []
    with pytest.raises(SessionNotFoundError):
        m.get("ending")
    assert m.count() == 1  # the dead node's place, until someone looks
    assert m.evict_idle() == [] and m.count() == 0  # the cleanup pass frees it
    assert s.state.name == "CLOSED"
    m.create("again")
    assert m.count() == 1


def test_a_create_at_the_limit_frees_a_dead_nodes_place_first(make, url):
    m = make(1)
    m.create("ending")
    _killed_between_steps(url, "release", "ending", 1)
    m.create("next")  # at the limit: the registry is repaired once, then the place is taken
    with pytest.raises(MaxSessionsError):
        m.create("one-too-many")
    assert [s.id for s in m.list()] == ["next"]


def test_creates_refused_at_the_limit_repair_the_registry_at_most_once_a_second(make, monkeypatch):
    """Each repair reads every session's hash: at the limit under load, every refused
    create would run one."""
    m = make(1)
    m.create("a")
    repairs = []
    real = m._repair
    monkeypatch.setattr(m, "_repair", lambda: repairs.append(1) or real())
    for _ in range(3):
        with pytest.raises(MaxSessionsError):
            m.create("b")
    assert len(repairs) == 1
    monkeypatch.setattr(redis_manager, "REPAIR_AT_LIMIT_SECONDS", 0.0)
    with pytest.raises(MaxSessionsError):
        m.create("b")
    assert len(repairs) == 2


def test_a_stale_place_of_an_id_is_taken_over_by_its_next_incarnation(make, raw, url):
    m = make(5)
    m.create("cam")
    _killed_between_steps(url, "release", "cam", 5)
    stale = raw.hget(incs_key("capsule"), "cam")
    fresh = m.create("cam")  # the id's registry place is another (ended) incarnation's
    assert raw.hget(incs_key("capsule"), "cam") == fresh._inc.encode() != stale
    assert m.count() == 1 and [s.id for s in m.list()] == ["cam"]


def test_the_asyncio_twin_on_the_cluster(url, raw):
    async def run():
        ended = []
        async with AsyncRedisSessionManager(url, 2, cleanup_interval=None, on_session_end=ended.append) as a, \
                AsyncRedisSessionManager(url, 2, cleanup_interval=None) as b:
            x = await a.create("x")
            with pytest.raises(SessionExistsError):
                await b.create("x")
            await b.create("y")
            with pytest.raises(MaxSessionsError):
                await a.create("z")
            assert await b.contains("x") and await b.count() == 2
            sub = await (await b.get("x")).subscribe_visual_frames(4)
            assert await x.store_frame(b"f" * 64, source="cam", max_recent=2)
            assert bytes((await asyncio.wait_for(sub.__anext__(), 5)).data) == b"f" * 64
            assert [bytes(f.data) for f in await (await b.get("x")).latest_visual_frames(60)] == [b"f" * 64]
            seq = await x.mark_pipeline_running()
            waiter = asyncio.create_task((await b.get("x")).wait_pipeline_done(10))
            await asyncio.sleep(0.3)  # subscribed to the pipeline's channel on its node
            assert not waiter.done()
            await x.mark_pipeline_finished(seq)
            assert await asyncio.wait_for(waiter, 5)  # woken across nodes on the cluster
            await b.delete("x")
            assert not await a.contains("x") and await a.count() == 1
            await a.create("z")
            assert sorted(s.id for s in await b.list()) == ["y", "z"]
        assert raw.zcard(registry_key("capsule")) == 0

    asyncio.run(run())


def test_nodes_killed_mid_churn_leave_a_registry_that_agrees_with_the_live_sessions(make, raw, url):
    """Four nodes create, write and delete 40 ids against a limit of 20 as fast as they
    can, and are SIGKILLed mid-way (between two steps, some of them): the limit held
    throughout, and once the pending hashes expired and a cleanup pass ran, the registry
    lists exactly the live sessions, each with its incarnation."""
    ctx = multiprocessing.get_context("spawn")
    nodes = [ctx.Process(target=redis_nodes.churn, args=(url, 30.0, 0.5)) for _ in range(4)]
    for node in nodes:
        node.start()
    try:
        deadline = time.monotonic() + 60
        while int(raw.get("test:churned") or 0) < 200:  # under way on every node
            assert time.monotonic() < deadline and all(node.is_alive() for node in nodes)
            assert raw.zcard(registry_key("capsule")) <= 20
            time.sleep(0.01)
    finally:
        for node in nodes:
            node.kill()
            node.join()
    assert raw.zcard(registry_key("capsule")) <= 20
    time.sleep(1.0)  # the dead nodes' pending hashes expire
    m = make(20)
    m.evict_idle()  # the cleanup pass: frees the places no live session holds
    registered = {id.decode(): inc for id, inc in raw.hgetall(incs_key("capsule")).items()}
    assert sorted(registered) == sorted(member.decode() for member in raw.zrange(registry_key("capsule"), 0, -1))
    live = {}
    for id in (f"s{i}" for i in range(40)):
        inc, ended, pending = raw.hmget(key_names("capsule", id).session, ["inc", "ended", "pending"])
        if inc is not None and ended == b"0" and pending is None:
            live[id] = inc
    assert registered == live and len(live) == m.count() == len(m.list())
    for id in live:
        m.get(id).add_message(ChatMessage("user", "still works"))


def _wait_gone(raw, key: bytes, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while raw.exists(key):
        assert time.monotonic() < deadline, f"{key!r} did not expire"
        time.sleep(0.05)


def test_the_registry_and_a_sessions_keys_are_in_different_slots():
    """What makes the steps necessary: the registry's slot is its own."""
    names = key_names("capsule", "cam")
    assert key_slot(registry_key("capsule").encode()) == key_slot(incs_key("capsule").encode())
    assert key_slot(registry_key("capsule").encode()) != key_slot(names.session)
    assert {key_slot(k) for k in names.all([])} == {key_slot(names.session)}
