"""Faults and hostile data, against real redis-servers (tests/redis_server.py): a
server that is down, killed, restarted or frozen mid-run; nodes SIGKILLed mid-write and
mid-callback; keys holding what this library did not write; ACL users and TLS.

Each fault test has a server of its own (a restart empties it), with short timeouts in
the URL, so a hang would show as a slow test and a failed bound.
"""

from __future__ import annotations

import multiprocessing
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import redis

import redis_nodes
from capsule_sessions import ChatMessage, DialogContextItem, SessionNotFoundError, SessionState, SubscriptionClosed
from capsule_sessions.redis import (
    RedisDataError,
    RedisSessionManager,
    RedisUnavailableError,
    SessionStoreError,
)
from capsule_sessions.redis import _codec as codec
from capsule_sessions.redis._keys import registry_key
from redis_server import RedisServer, free_port, redis_server, sweep_orphaned_servers

TIMEOUTS = "?socket_timeout=0.5&socket_connect_timeout=0.5"
# A call against a dead or frozen server ends within this (the timeouts above, one retry
# of a refused connection, the backoff): far from a hang.
BOUND_SECONDS = 2.5
REGISTRY = registry_key("capsule")


@pytest.fixture
def server():
    with redis_server() as s:
        yield s


def url_of(server: RedisServer, namespace_db: int = 0) -> str:
    return f"redis://127.0.0.1:{server.port}/{namespace_db}{TIMEOUTS}"


def _session_calls(s):
    return [
        lambda: s.state, lambda: s.last_active_at, lambda: s.owner_id, lambda: s.current_turn_seq,
        lambda: s.set_state(SessionState.LISTENING), s.touch, lambda: s.set_owner_id("x"),
        s.mark_pipeline_running, lambda: s.mark_pipeline_finished(1), lambda: s.is_current_pipeline(1),
        lambda: s.wait_pipeline_done(5), s.mark_turn_started, lambda: s.is_current_turn(1),
        s.try_start_voice_startup_greeting, lambda: s.add_message(ChatMessage("user", "x")),
        s.history_snapshot, s.conversation_snapshot, lambda: s.set_dialog_context([]),
        s.dialog_context_snapshot, s.to_dict,
    ]


def _manager_calls(m):
    return [lambda: m.create("new"), lambda: m.get("a"), lambda: m.touch("a"), lambda: m.delete("a"), m.list,
            m.count, lambda: len(m), lambda: "a" in m, m.evict_idle]


def _assert_unavailable(call, url):
    started = time.monotonic()
    with pytest.raises(RedisUnavailableError) as info:
        call()
    took = time.monotonic() - started
    assert took < BOUND_SECONDS, f"took {took:.2f} s"
    assert f"127.0.0.1:{url.split(':')[2].split('/')[0]}" in str(info.value)
    assert isinstance(info.value, SessionStoreError)


def test_an_unreachable_server_is_a_clear_error_at_once():
    url = f"redis://user:topsecret@127.0.0.1:{free_port()}/0{TIMEOUTS}"
    started = time.monotonic()
    with pytest.raises(RedisUnavailableError, match=r"redis://user:\*\*\*@127\.0\.0\.1") as info:
        RedisSessionManager(url, 4, cleanup_interval=None)
    assert time.monotonic() - started < BOUND_SECONDS
    assert "topsecret" not in str(info.value) and "topsecret" not in repr(info.value)


def test_a_killed_server_fails_every_call_within_the_timeout(server):
    url = url_of(server)
    m = RedisSessionManager(url, 4, cleanup_interval=None)
    try:
        s = m.create("a")
        server.kill()
        for call in _session_calls(s) + _manager_calls(m):
            _assert_unavailable(call, url)
    finally:
        m.stop()


def test_a_wait_in_progress_ends_when_the_server_dies(server):
    url = url_of(server)
    m = RedisSessionManager(url, 4, cleanup_interval=None)
    try:
        s = m.create("a")
        s.mark_pipeline_running()
        outcome = []

        def wait():
            try:
                outcome.append(s.wait_pipeline_done(None))
            except RedisUnavailableError as exc:
                outcome.append(exc)

        waiter = threading.Thread(target=wait)
        waiter.start()
        time.sleep(0.3)
        killed = time.monotonic()
        server.kill()
        waiter.join(BOUND_SECONDS * 2)
        assert not waiter.is_alive() and time.monotonic() - killed < BOUND_SECONDS
        assert isinstance(outcome[0], RedisUnavailableError)
    finally:
        m.stop()


def test_a_frozen_server_fails_calls_after_the_timeout_not_never(server):
    url = url_of(server)
    m = RedisSessionManager(url, 4, cleanup_interval=None)
    try:
        s = m.create("a")
        seq = s.mark_pipeline_running()
        server.proc.send_signal(signal.SIGSTOP)  # accepts connections, answers nothing
        try:
            for call in (lambda: m.get("a"), lambda: s.add_message(ChatMessage("user", "x")),
                         lambda: s.wait_pipeline_done(None), lambda: m.create("b")):
                _assert_unavailable(call, url)
        finally:
            server.proc.send_signal(signal.SIGCONT)
        # Nothing half-done: the calls that timed out either ran whole or not at all.
        assert s.is_current_pipeline(seq) and m.count() in (1, 2)
        assert [x.content for x in s.history_snapshot()] in ([], ["x"])
    finally:
        m.stop()


def test_after_a_restart_the_manager_carries_on(server):
    url = url_of(server)
    m = RedisSessionManager(url, 4, cleanup_interval=None)
    try:
        old = m.create("a")
        server.restart()  # empty: persistence is off
        # The pooled connections are dead and the server forgot the scripts: one retry
        # reconnects, EVALSHA falls back to EVAL.
        assert m.count() == 0 and "a" not in m
        with pytest.raises(SessionNotFoundError):
            m.get("a")
        assert old.state is SessionState.CLOSED  # its record is gone
        with pytest.raises(SessionNotFoundError):
            old.add_message(ChatMessage("user", "x"))
        fresh = m.create("a")
        fresh.add_message(ChatMessage("user", "y"))
        assert [x.content for x in m.get("a").history_snapshot()] == ["y"]
    finally:
        m.stop()


def test_a_restart_that_lost_the_session_closes_its_subscriptions_on_every_node(server):
    """The session is gone with the empty server: its subscriptions here and on another
    node close (queued frames first) instead of waiting on a stream nobody writes, and
    a new session of the id is not theirs."""
    url = url_of(server)
    m, other = (RedisSessionManager(url, 4, cleanup_interval=None) for _ in range(2))
    try:
        s = m.create("a")
        here, there = s.subscribe_visual_frames(4), other.get("a").subscribe_visual_frames(4)
        assert s.store_frame(b"1" * 8, source="cam", max_recent=2)
        assert bytes(there.get(timeout=5).data) == b"1" * 8
        server.restart()  # empty: persistence is off
        fresh = m.create("a")
        assert fresh.store_frame(b"2" * 8, source="cam", max_recent=2)
        assert bytes(here.get(timeout=5).data) == b"1" * 8  # queued before the restart
        for sub in (here, there):
            with pytest.raises(SubscriptionClosed):
                sub.get(timeout=5)
    finally:
        m.stop()
        other.stop()


def _invariants(client, url, namespace="capsule", max_concurrent=None):
    """What must hold whatever was interrupted: the registry and the session hashes
    agree, and everything stored reads back."""
    members = {x.decode() for x in client.zrange(registry_key(namespace), 0, -1)}
    if max_concurrent is not None:
        assert len(members) <= max_concurrent
    live = set()
    for key in client.scan_iter(f"{namespace}:*:session"):
        id = key.decode()[len(namespace) + 2:-len("}:session")]
        record = codec.record_of(client.hgetall(key), key.decode(), id)
        if not record.ended:
            live.add(id)
        else:
            assert client.pttl(key) > 0
    assert members == live
    checker = RedisSessionManager(url, 10 ** 6, namespace=namespace, cleanup_interval=None)
    try:
        for s in checker.list():
            s.history_snapshot()
            s.dialog_context_snapshot()
    finally:
        checker.stop()


def test_no_half_applied_change_when_the_server_dies_mid_run(tmp_path):
    # With every write on disk (appendfsync always), a server killed mid-run comes back
    # with what it had: whole scripts only, whatever was cut off.
    with redis_server("--appendonly", "yes", "--appendfsync", "always") as server:
        url = url_of(server)
        ctx = multiprocessing.get_context("spawn")
        client = redis.Redis.from_url(url)
        for round in range(3):
            worker = ctx.Process(target=redis_nodes.churn, args=(url, 30.0))
            worker.start()
            deadline = time.monotonic() + 60
            while int(client.get("test:churned") or 0) < 20 * (round + 1):  # under way
                assert time.monotonic() < deadline and worker.is_alive()
                time.sleep(0.005)
            time.sleep(0.05 * round)
            server.kill()
            worker.kill()
            worker.join()
            server.start()
            assert client.zcard(REGISTRY) > 0
            _invariants(client, url, max_concurrent=20)
        client.close()


def test_a_node_killed_mid_write_loses_nothing_it_stored(redis_url):
    ctx = multiprocessing.get_context("spawn")
    node = ctx.Process(target=redis_nodes.store_until_killed, args=(redis_url, "s"))
    node.start()
    client = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + 60
    while int(client.get("test:acked") or 0) < 50:
        assert time.monotonic() < deadline and node.is_alive()
        time.sleep(0.01)
    node.kill()
    node.join()
    acked = int(client.get("test:acked"))
    m = RedisSessionManager(redis_url, 4, cleanup_interval=None)
    try:
        s = m.get("s")
        history = s.history_snapshot()
        # Every acknowledged write is there, in order; at most the one in flight beyond.
        assert [x.content for x in history[:acked]] == [f"m{n}" for n in range(1, acked + 1)]
        assert len(history) - acked in (0, 1) and s.current_turn_seq in (acked, acked + 1)
        _invariants(client, redis_url)
    finally:
        m.stop()
        client.close()


def test_a_node_killed_in_on_session_end_leaves_the_session_ended(redis_url):
    m = RedisSessionManager(redis_url, 4, cleanup_interval=None, on_session_end=lambda s: ended.append(s))
    ended = []
    try:
        s = m.create("a")
        s.set_state(SessionState.SPEAKING)
        ctx = multiprocessing.get_context("spawn")
        node = ctx.Process(target=redis_nodes.end_and_die, args=(redis_url, "a"))
        node.start()
        node.join(60)
        assert node.exitcode == -signal.SIGKILL
        # The claim was whole: out of the registry, CLOSED for everyone, and nobody
        # else will end it again.
        assert "a" not in m and s.state is SessionState.CLOSED
        m.delete("a")
        assert m.evict_idle(now=s.last_active_at + 10 ** 6) == [] and ended == []
    finally:
        m.stop()


# -- hostile data -----------------------------------------------------------------------
@pytest.fixture
def planted(redis_url):
    """A manager with sessions a and b, and a raw client to corrupt their keys."""
    m = RedisSessionManager(redis_url, 8, idle_timeout=1, cleanup_interval=None)
    client = redis.Redis.from_url(redis_url)
    a, b = m.create("a"), m.create("b")
    a.add_message(ChatMessage("user", "x"))
    a.set_dialog_context([DialogContextItem("u", "t")])
    yield m, client, a, b
    m.stop()
    client.close()


GARBAGE = [b"", b"\xff\xfe", b"garbage", b"1e3", b" 1", b"nan", b"inf", b"1" * 30, b"9" * 400]


@pytest.mark.parametrize("field", [f for f in codec.FIELDS])
def test_a_corrupted_field_is_a_data_error_naming_the_key(planted, field):
    m, client, a, _ = planted
    for garbage in GARBAGE:
        if field in ("character_id", "owner") and garbage != b"\xff\xfe":
            continue  # any UTF-8 text is a valid id, owner or character
        client.hset("capsule:{a}:session", field, garbage)
        with pytest.raises(RedisDataError, match=r"capsule:\{a\}:session") as info:
            m.get("a")
        assert isinstance(info.value, SessionStoreError) and isinstance(info.value, ValueError)
        with pytest.raises(RedisDataError):
            m.list()
    with pytest.raises((RedisDataError, SessionNotFoundError)):
        m.get("a").history_snapshot()


def test_a_missing_field_is_a_data_error(planted):
    m, client, *_ = planted
    client.hdel("capsule:{a}:session", "pseq")
    with pytest.raises(RedisDataError, match="no pseq"):
        m.get("a")


def test_eviction_skips_a_corrupted_session_then_says_so(planted):
    m, client, a, b = planted
    client.hset("capsule:{a}:session", "active", b"soon")
    with pytest.raises(RedisDataError, match="active"):
        m.evict_idle(now=b.created_at + 100)
    assert b.state is SessionState.CLOSED and "a" in m  # the other was ended


@pytest.mark.parametrize("garbage", [b"not json", b"{}", b'["1","u","c"]', b'[1,"u","c","1.0"]',
                                     b'["x","u","c","1.0"]', b'["1","u","c","nan"]', b"\xff"])
def test_a_corrupted_message_is_a_data_error(planted, garbage):
    m, client, a, _ = planted
    client.rpush("capsule:{a}:history", garbage)
    for call in (a.history_snapshot, a.conversation_snapshot, a.to_dict):
        with pytest.raises(RedisDataError, match=r"capsule:\{a\}:history"):
            call()


@pytest.mark.parametrize("garbage", [b"not json", b"{}", b"[[1,2]]", b'[["u","t"]]', b'[["u","t","x"]]'])
def test_a_corrupted_dialog_context_is_a_data_error(planted, garbage):
    m, client, a, _ = planted
    client.set("capsule:{a}:dialog", garbage)
    with pytest.raises(RedisDataError, match=r"capsule:\{a\}:dialog"):
        a.dialog_context_snapshot()


def test_keys_of_another_type_are_data_errors(planted):
    m, client, a, b = planted
    client.delete("capsule:{b}:session")
    client.set("capsule:{b}:session", "a string")
    with pytest.raises(RedisDataError):
        m.get("b")
    with pytest.raises(RedisDataError):
        b.state  # noqa: B018
    client.delete("capsule:{a}:history")
    client.set("capsule:{a}:history", "a string")
    with pytest.raises(RedisDataError):
        a.history_snapshot()
    client.delete(REGISTRY)
    client.set(REGISTRY, "a string")
    for call in (m.count, m.list, lambda: "a" in m, lambda: m.create("c"), m.evict_idle):
        with pytest.raises(RedisDataError):
            call()


def test_a_foreign_key_under_a_new_id_is_not_overwritten(planted):
    m, client, *_ = planted
    client.hset("capsule:{c}:session", mapping={"someone": "else"})
    with pytest.raises(RedisDataError, match="did not write"):
        m.create("c")
    assert client.hgetall("capsule:{c}:session") == {b"someone": b"else"}
    client.hset("capsule:{d}:session", mapping={"kind": codec.KIND, "id": "not-d"})
    client.zadd(REGISTRY, {"d": 99})
    with pytest.raises(RedisDataError, match="the session 'not-d'"):
        m.get("d")


def test_a_registry_member_that_is_not_text(planted):
    m, client, *_ = planted
    client.zadd(REGISTRY, {b"\xff\xfe": 100})
    with pytest.raises(RedisDataError, match=re.escape(REGISTRY)):
        m.list()


# -- credentials and TLS ------------------------------------------------------------------
ACL_RULE = ("on", ">s3cret", "resetkeys", "~capsule:*", "resetchannels", "&capsule:*", "-@all", "+@read",
            "+@write", "+@scripting", "+@pubsub", "+@connection", "+time", "-@dangerous")


def test_an_acl_user_in_the_url(server):
    admin = redis.Redis.from_url(server.url)
    admin.execute_command("ACL", "SETUSER", "capsule", *ACL_RULE)  # the README's rule
    admin.execute_command("ACL", "SETUSER", "default", "off")
    url = f"redis://capsule:s3cret@127.0.0.1:{server.port}/0{TIMEOUTS}"
    m = RedisSessionManager(url, 4, idle_timeout=0, cleanup_interval=None)
    try:
        s = m.create("a")
        s.add_message(ChatMessage("user", "x"))
        seq = s.mark_pipeline_running()
        assert not s.wait_pipeline_done(0.1)  # SUBSCRIBE on the namespace's channels
        s.mark_pipeline_finished(seq)
        assert s.wait_pipeline_done(1) and m.list() == [s]
        assert m.evict_idle(now=s.last_active_at + 1) == [s]
        with pytest.raises(RedisUnavailableError, match="refused"):  # another namespace is off limits
            RedisSessionManager(url, 4, namespace="other", cleanup_interval=None).create("x")
    finally:
        m.stop()
    wrong = f"redis://capsule:nope@127.0.0.1:{server.port}/0{TIMEOUTS}"
    with pytest.raises(RedisUnavailableError, match=r"capsule:\*\*\*@") as info:
        RedisSessionManager(wrong, 4, cleanup_interval=None)
    assert "nope" not in str(info.value)
    with pytest.raises(RedisUnavailableError):  # the default user is off
        RedisSessionManager(url_of(server), 4, cleanup_interval=None)


@pytest.fixture
def tls_files(tmp_path):
    def run(*args):
        subprocess.run(["openssl", *args], cwd=tmp_path, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", "/CN=capsule-test-ca")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj",
        "/CN=127.0.0.1")
    (tmp_path / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-out",
        "server.crt", "-days", "2", "-extfile", "ext.cnf")
    return tmp_path


@pytest.mark.skipif(subprocess.run(["which", "openssl"], capture_output=True).returncode != 0,
                    reason="needs the openssl command to make a certificate")
def test_rediss_with_a_ca_in_the_url(tls_files):
    port = free_port()
    with redis_server("--tls-port", str(port), "--tls-cert-file", str(tls_files / "server.crt"),
                      "--tls-key-file", str(tls_files / "server.key"),
                      "--tls-ca-cert-file", str(tls_files / "ca.crt"), "--tls-auth-clients", "no"):
        url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={tls_files / 'ca.crt'}&socket_timeout=2"
        m = RedisSessionManager(url, 4, cleanup_interval=None)
        try:
            s = m.create("a")
            s.add_message(ChatMessage("user", "over TLS"))
            assert m.get("a").history_snapshot()[0].content == "over TLS"
            # A TLS socket has no sendmsg: a store joins its buffers into one write.
            frame = np.arange(300_000, dtype=np.uint32).view(np.uint8)
            assert s.store_frame(frame, source="cam", max_recent=2)
            assert [bytes(f.data) for f in s.latest_visual_frames(60)] == [frame.tobytes()]
        finally:
            m.stop()
        with pytest.raises(RedisUnavailableError):  # without the CA, the certificate is refused
            RedisSessionManager(f"rediss://127.0.0.1:{port}/0?socket_timeout=2", 4, cleanup_interval=None)



def test_close_ends_the_others_then_says_one_was_corrupted(planted):
    m, client, a, b = planted
    client.hset("capsule:{a}:session", "state", b"9")
    with pytest.raises(RedisDataError, match="state"):
        m.close()
    assert b.state is SessionState.CLOSED and m.count() == 0


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # killed, not reaped yet
    except FileNotFoundError:
        return True


def test_a_server_whose_test_process_was_killed_is_swept_by_the_next_run():
    """A test's redis-server runs in a session of its own, so it outlives a test process
    killed by a timeout; the next run's start kills it (and only such orphans)."""
    import os
    from pathlib import Path

    code = ("import os, sys; sys.path.insert(0, sys.argv[1]); from redis_server import RedisServer; "
            "s = RedisServer(); print(s.proc.pid, s.dir, flush=True); os._exit(0)")
    out = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)], capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()
    pid, directory = int(out[0]), out[1]
    mine = RedisServer()  # a live run's server: not an orphan
    try:
        assert not _gone(pid), "the orphan should have outlived its test process"
        swept = sweep_orphaned_servers()
        assert pid in swept and mine.proc.pid not in swept
        deadline = time.monotonic() + 10
        while not _gone(pid):
            assert time.monotonic() < deadline, "the orphaned redis-server is still running"
            time.sleep(0.01)
        assert not os.path.exists(directory)
        assert mine.proc.poll() is None
    finally:
        mine.close()
        if not _gone(pid):
            os.kill(pid, signal.SIGKILL)
