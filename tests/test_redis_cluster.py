"""The semantics across nodes (issue 13), each with real processes: up to 8 spawned
nodes (tests/redis_nodes.py), each with its own manager and connections, racing on one
real redis-server, and again on a real Redis Cluster of three masters (where membership
changes in steps of one slot each: docs/redis.md, "Redis Cluster"). A node is a process
here; on several machines it is the same code.
"""

from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor

import pytest

import redis_nodes
from capsule_sessions import ChatMessage, SessionNotFoundError, SessionState
from capsule_sessions.redis import RedisSessionManager
from capsule_sessions.redis._keys import registry_key

NODES = 8


@pytest.fixture(scope="module")
def pool():
    """Eight spawned node processes for the whole module (started once: a spawn costs
    an interpreter and the imports)."""
    with ProcessPoolExecutor(NODES, mp_context=multiprocessing.get_context("spawn")) as executor:
        yield executor


@pytest.fixture(params=["one-server", "redis-cluster"])
def redis_url(request):
    """Each test on one redis-server and on a Redis Cluster."""
    return request.getfixturevalue("redis_cluster_url" if request.param == "redis-cluster" else "redis_url")


@pytest.fixture
def parent(redis_url):
    m = RedisSessionManager(redis_url, 1000, cleanup_interval=None)
    yield m
    m.stop()


@pytest.fixture
def race(pool, raw, redis_url):
    """``race(fn, per_node_args)``: ``fn(url, node, *args)`` on every node at once
    (through the gate); their results."""

    def run(fn, per_node_args):
        futures = [pool.submit(fn, redis_url, node, *args) for node, args in enumerate(per_node_args)]
        deadline = time.monotonic() + 60
        while int(raw.get(redis_nodes.GATE_READY) or 0) < len(futures):
            assert time.monotonic() < deadline, "the nodes did not get ready"
            for f in futures:
                if f.done():
                    f.result()  # a node that failed before the gate says why
            time.sleep(0.005)
        raw.set(redis_nodes.GATE_OPEN, 1)
        return [f.result(timeout=60) for f in futures]

    return run


def test_max_concurrent_holds_across_nodes(race, raw):
    results = race(redis_nodes.create_many,
                   [([f"n{node}-{i}" for i in range(100)], 50) for node in range(NODES)])
    created = [id for r in results for id in r["created"]]
    assert len(created) == 50 and sum(len(r["max"]) for r in results) == NODES * 100 - 50
    assert raw.zcard(registry_key("capsule")) == 50
    assert sorted(m.decode() for m in raw.zrange(registry_key("capsule"), 0, -1)) == sorted(created)


def test_an_id_is_made_once_whichever_node_asks(race, raw):
    ids = [f"shared-{i}" for i in range(30)]
    results = race(redis_nodes.create_many, [(ids, 1000) for _ in range(NODES)])
    winners = [id for r in results for id in r["created"]]
    assert sorted(winners) == sorted(ids)  # each exactly once
    assert all(sorted(r["created"] + r["exists"]) == sorted(ids) and not r["max"] for r in results)


def test_ending_runs_the_callback_exactly_once_in_the_cluster(race, raw, parent):
    ids = [f"s{i}" for i in range(24)]
    sessions = [parent.create(id) for id in ids]
    for s in sessions:
        s.set_state(SessionState.SPEAKING)
    race(redis_nodes.end_all, [(ids, 1e6) for _ in range(NODES)])
    ended = [e.decode().split(":", 1) for e in raw.lrange("test:ended", 0, -1)]
    assert sorted(id for _, id in ended) == sorted(ids)  # every session once, on one node
    assert len({node for node, _ in ended}) > 1  # and the work was spread (the claims raced)
    assert all(s.state is SessionState.CLOSED for s in sessions) and parent.count() == 0
    for id in ids:
        with pytest.raises(SessionNotFoundError):
            parent.get(id)


def test_counters_and_the_greeting_are_atomic(race, raw, parent):
    s = parent.create("s")
    results = race(redis_nodes.bump, [("s", 40) for _ in range(NODES)])
    pipelines = sorted(seq for r in results for seq in r["pipelines"])
    turns = sorted(seq for r in results for seq in r["turns"])
    assert pipelines == turns == list(range(1, NODES * 40 + 1))  # no number twice, none skipped
    assert sum(g for r in results for g in r["greetings"]) == 1  # the greeting: once in the cluster
    assert s.current_turn_seq == NODES * 40 and s.is_current_pipeline(NODES * 40)


def test_wait_pipeline_done_on_other_nodes_returns_when_this_one_finishes(pool, raw, parent, redis_url):
    s = parent.create("s")
    seq = s.mark_pipeline_running()
    waiters = [pool.submit(redis_nodes.wait_done, redis_url, node, "s", 20.0) for node in range(3)]
    deadline = time.monotonic() + 60
    while raw.llen("test:waiting") < 3:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.3)  # they are waiting (subscribed or about to be)
    s.mark_pipeline_finished(seq - 1)  # stale: wakes nobody
    time.sleep(0.2)
    assert not any(w.done() for w in waiters)
    finished = time.monotonic()
    s.mark_pipeline_finished(seq)
    for w in waiters:
        done, waited = w.result(timeout=20)
        assert done and waited < 20
    assert time.monotonic() - finished < 2.0  # woken by the notice, not by a timeout


def test_a_stale_finish_from_another_node_is_ignored(parent, redis_url):
    s = parent.create("s")
    first = s.mark_pipeline_running()
    second = parent.get("s").mark_pipeline_running()
    other = RedisSessionManager(redis_url, 10, cleanup_interval=None)
    try:
        other.get("s").mark_pipeline_finished(first)
        assert not s.wait_pipeline_done(0.2)
        other.get("s").mark_pipeline_finished(second)
        assert s.wait_pipeline_done(0)
    finally:
        other.stop()


def test_an_answer_lands_after_its_turn_whatever_the_other_nodes_append(race, raw, parent):
    s = parent.create("s")
    for turn in range(1, NODES + 1):
        s.add_message(ChatMessage("user", f"q{turn}", turn_seq=turn))
    race(redis_nodes.answer, [("s", node + 1, 30) for node in range(NODES)])
    contents = [m.content for m in s.history_snapshot()]
    expected_head = [x for turn in range(1, NODES + 1) for x in (f"q{turn}", f"a{turn}")]
    assert contents[:2 * NODES] == expected_head
    assert sorted(contents[2 * NODES:]) == sorted(f"noise-{n}-{i}" for n in range(NODES) for i in range(30))


def test_nodes_with_skewed_clocks_agree_on_time(pool, parent):
    theirs = parent.create("parent")
    parent.evict_idle()  # nothing is idle
    url = parent._url
    report = pool.submit(redis_nodes.skewed_node, url, 3600.0, "skewed").result(timeout=60)
    mine = parent._ctx.clock()
    # The node's own clocks were an hour off; its instants are the server's, as ours are.
    assert abs(report["created_at"] - mine) < 5 and 0 <= report["parent_age"] < 5
    assert abs(parent.get("skewed").last_active_at - mine) < 5
    evicting = RedisSessionManager(url, 10, idle_timeout=60, cleanup_interval=None)
    try:
        assert evicting.evict_idle() == []  # neither session looks an hour idle
    finally:
        evicting.stop()
    assert theirs.state is SessionState.INIT


def test_a_cluster_client_reads_a_frame_in_few_pieces(redis_cluster_url):
    from capsule_sessions.redis._connect import READ_BUFFER_BYTES, connect_cluster

    client = connect_cluster(redis_cluster_url)
    try:
        node = client.get_default_node()
        assert node.redis_connection.connection_pool.connection_kwargs["socket_read_size"] == READ_BUFFER_BYTES
    finally:
        client.close()
