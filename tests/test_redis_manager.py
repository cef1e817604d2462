"""RedisSessionManager and RedisSession on one node, against a real redis-server
(tests/redis_server.py): the in-process SessionManager's semantics and results, call
for call, and what only a store has (incarnations, the server's clock, the keys).
The asyncio twin is held to the same results at the end. Across processes:
test_redis_cluster.py; faults and bad data: test_redis_faults.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import math
import random
import threading
import time
import types

import pytest
from redis.crc import key_slot

from capsule_sessions import (
    ChatMessage,
    DialogContextItem,
    MaxSessionsError,
    PipelineMode,
    SessionError,
    SessionExistsError,
    SessionManager,
    SessionNotFoundError,
    SessionState,
    SubscriptionClosed,
)
from capsule_sessions.redis import AsyncRedisSessionManager, RedisSession, RedisSessionManager
from capsule_sessions.redis import _session as redis_session
from support import FakeClock

frames_built = pytest.mark.skipif(redis_session.RedisFrameRing is None,
                                  reason="the frame streams (capsule_sessions/redis/_frames.py) are not in this tree")


@pytest.fixture
def make_redis(redis_url, clock):
    """``make_redis(max_concurrent=8, idle_timeout=300.0, **kw)``: a RedisSessionManager on
    the test's server with the fake clock and no cleanup thread; stopped at teardown."""
    made = []

    def make(max_concurrent=8, idle_timeout=300.0, *, cleanup_interval=None, on_session_end=None, clock=None,
             namespace="capsule", url=None, server_clock=False):
        manager = RedisSessionManager(url or redis_url, max_concurrent, idle_timeout, namespace=namespace,
                                      cleanup_interval=cleanup_interval, on_session_end=on_session_end,
                                      clock=None if server_clock else (clock or clock_))
        made.append(manager)
        return manager

    clock_ = clock
    yield make
    for manager in made:
        manager.stop()


@pytest.fixture
def fixed_wall(monkeypatch):
    """time.time() as the records module sees it, frozen: to_dict() renders instants
    against it, so two sessions' renderings can be compared string for string."""
    monkeypatch.setattr("capsule_sessions._records.time", types.SimpleNamespace(time=lambda: 2.0e9))


# -- the in-process twin, call for call ------------------------------------------------
def _outcome(fn, *args, **kwargs):
    try:
        return ("ok", fn(*args, **kwargs))
    except Exception as exc:  # the same error, with the same message, is the same outcome
        return ("raised", type(exc), str(exc))


def _views(s):
    return {
        "state": s.state, "owner": s.owner_id, "active": s.last_active_at, "turn": s.current_turn_seq,
        "history": s.history_snapshot(), "dialog": s.dialog_context_snapshot(),
        "snapshot": tuple(s.conversation_snapshot()), "dict": s.to_dict(),
    }


def _random_op(rng, clock):
    kind = rng.randrange(12)
    if kind == 0:
        return "set_state", (rng.choice(list(SessionState)),)
    if kind == 1:
        return "touch", (rng.choice([None, clock() + rng.uniform(-5, 5)]),)
    if kind == 2:
        return "set_owner_id", (rng.choice(["", "alice", "bob\u00e9", "\ud800odd"]),)
    if kind == 3:
        return "mark_pipeline_running", ()
    if kind == 4:
        return "mark_pipeline_finished", (rng.randrange(-1, 6),)
    if kind == 5:
        return "is_current_pipeline", (rng.randrange(-1, 6),)
    if kind == 6:
        return "wait_pipeline_done", (0,)
    if kind == 7:
        return "mark_turn_started", ()
    if kind == 8:
        return "try_start_voice_startup_greeting", ()
    if kind == 9:
        role = rng.choice(["user", "assistant", "assistant", "system"])
        stamp = rng.choice([None, None, clock() - rng.uniform(0, 100), 5])
        return "add_message", (ChatMessage(role, f"m{rng.randrange(1000)}", stamp, rng.randrange(0, 5)),)
    if kind == 10:
        items = [DialogContextItem(rng.choice(["user", "bot"]), f"t{i}", rng.randrange(10**12))
                 for i in range(rng.randrange(3))]
        return "set_dialog_context", (items,)
    return "is_current_turn", (rng.randrange(0, 5),)


@pytest.mark.parametrize("seed", range(3))
def test_a_random_run_gives_the_in_process_results(make_redis, clock, seed, fixed_wall):
    rng = random.Random(seed)
    local = SessionManager(8, clock=clock, cleanup_interval=None, backend="python").create("s", PipelineMode.STANDARD,
                                                                                           "char")
    remote = make_redis().create("s", PipelineMode.STANDARD, "char")
    assert (remote.id, remote.mode, remote.character_id, remote.created_at) == \
        (local.id, local.mode, local.character_id, local.created_at)
    for step in range(120):
        name, args = _random_op(rng, clock)
        assert _outcome(getattr(remote, name), *args) == _outcome(getattr(local, name), *args), (step, name, args)
        if rng.random() < 0.3:
            clock.advance(rng.uniform(0, 2))
        if step % 10 == 0:
            assert _views(remote) == _views(local), step
    assert _views(remote) == _views(local)


BAD_CALLS = [
    ("set_state", (9,)), ("set_state", ("listening",)), ("set_owner_id", (5,)),
    ("mark_pipeline_finished", ("1",)), ("mark_pipeline_finished", (True,)), ("touch", (math.inf,)),
    ("touch", ("now",)), ("touch", (1e300,)), ("wait_pipeline_done", (-1,)), ("wait_pipeline_done", (math.nan,)),
    ("add_message", ("hello",)), ("add_message", (ChatMessage(1, "x"),)),  # type: ignore[arg-type]
    ("add_message", (ChatMessage("u", b"x"),)), ("add_message", (ChatMessage("u", "x", math.nan),)),  # type: ignore
    ("add_message", (ChatMessage("u", "x", None, 1.5),)), ("set_dialog_context", (5,)),  # type: ignore[arg-type]
    ("set_dialog_context", ([1],)),
]


@pytest.mark.parametrize("name,args", BAD_CALLS, ids=[f"{n}{a!r}"[:60] for n, a in BAD_CALLS])
def test_bad_arguments_raise_what_the_in_process_session_raises(make_redis, clock, name, args):
    local = SessionManager(8, clock=clock, cleanup_interval=None, backend="python").create("s")
    remote = make_redis().create("s")
    expected = _outcome(getattr(local, name), *args)
    assert expected[0] == "raised"
    assert _outcome(getattr(remote, name), *args) == expected
    assert remote.history_snapshot() == [] and remote.state is SessionState.INIT  # nothing was stored


def test_dialog_items_must_be_json_values(make_redis):
    s = make_redis().create("s")
    with pytest.raises(TypeError, match="item.timestamp must be an int"):
        s.set_dialog_context([DialogContextItem("u", "t", 1.5)])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="item.role must be a str"):
        s.set_dialog_context([DialogContextItem(object(), "t")])  # type: ignore[arg-type]
    assert s.dialog_context_snapshot() == []


def test_messages_are_copies_and_keep_their_order_per_turn(make_redis):
    s = make_redis().create("s")
    msg = ChatMessage("user", "q1", turn_seq=1)
    s.add_message(msg)
    msg.content = "changed"
    s.add_message(ChatMessage("user", "q2", turn_seq=2))
    s.add_message(ChatMessage("assistant", "a1", turn_seq=1))
    s.add_message(ChatMessage("assistant", "a1b", turn_seq=1))
    s.add_message(ChatMessage("assistant", "a9", turn_seq=9))  # no message of turn 9: appended
    assert [m.content for m in s.history_snapshot()] == ["q1", "a1", "a1b", "q2", "a9"]
    many = [ChatMessage("user", f"x{i}", turn_seq=1) for i in range(2500)]  # a tail longer than Lua's unpack
    for m in many:
        s.add_message(m)
    s.add_message(ChatMessage("user", "q3", turn_seq=3))
    s.add_message(ChatMessage("assistant", "late", turn_seq=1))
    contents = [m.content for m in s.history_snapshot()]
    assert contents[-3:] == ["x2499", "late", "q3"] and len(contents) == 5 + 2500 + 2


# -- the manager -----------------------------------------------------------------------
def test_create_get_touch_list_count(make_redis, clock):
    m = make_redis(3)
    a = m.create("a", PipelineMode.STANDARD, "char")
    b = m.create("b")
    assert isinstance(a, RedisSession) and a.backend == "redis" and a.shared is None
    assert m.get("a") is a and m.list() == [a, b] and m.count() == len(m) == 2
    assert "a" in m and "c" not in m and 5 not in m and [] not in m
    clock.advance(7)
    m.touch("a")
    assert a.last_active_at == clock() and b.last_active_at == clock() - 7
    for missing in ("c", 5, None, ["a"]):
        with pytest.raises(SessionNotFoundError, match="not found"):
            m.get(missing)  # type: ignore[arg-type]
        with pytest.raises(SessionNotFoundError):
            m.touch(missing)  # type: ignore[arg-type]
    m.delete("missing")
    m.delete(["unhashable"])  # type: ignore[arg-type]
    assert m.count() == 2


def test_the_limit_is_checked_first_then_the_id(make_redis):
    m = make_redis(2)
    m.create("a")
    with pytest.raises(SessionExistsError, match="'a' already exists"):
        m.create("a")
    m.create("b")
    with pytest.raises(MaxSessionsError, match=r"max concurrent sessions reached \(2\)"):
        m.create("a")
    with pytest.raises(MaxSessionsError):  # before the bad mode, as in-process
        m.create("c", mode=7)  # type: ignore[arg-type]
    m.delete("b")
    with pytest.raises(SessionExistsError):
        m.create("a", character_id=5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mode must be a PipelineMode"):
        m.create("c", mode=7)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="character_id must be a str"):
        m.create("c", character_id=5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="id must be a str"):
        m.create(5)  # type: ignore[arg-type]
    assert m.count() == 1
    assert make_redis(0).count() == 1
    with pytest.raises(MaxSessionsError):
        make_redis(0).create("z")


@pytest.mark.parametrize("kwargs,error", [
    ({"max_concurrent": -1}, ValueError), ({"max_concurrent": 1.5}, TypeError),
    ({"idle_timeout": math.nan}, ValueError), ({"cleanup_interval": 0}, ValueError),
    ({"cleanup_interval": -1}, ValueError), ({"on_session_end": 5}, TypeError), ({"clock": 5}, TypeError),
    ({"namespace": "a b"}, ValueError), ({"namespace": 5}, TypeError), ({"namespace": ""}, ValueError),
    ({"url": "http://127.0.0.1:1"}, ValueError), ({"url": 5}, TypeError),
    ({"url": "redis://127.0.0.1:notaport"}, ValueError),
    ({"url": "redis://127.0.0.1:1/zz"}, ValueError), ({"url": "unix:///tmp/r.sock?db=x"}, ValueError),
])
def test_bad_manager_arguments(redis_url, kwargs, error):
    args = {"url": redis_url, "max_concurrent": 4, "cleanup_interval": None, **kwargs}
    with pytest.raises(error):
        RedisSessionManager(args.pop("url"), args.pop("max_concurrent"), **args)


def test_delete_ends_once_and_the_callback_sees_the_state_before_closed(make_redis):
    ended = []
    m = make_redis(on_session_end=lambda s: ended.append((s.id, s.state, other_view.state)))
    other = make_redis()  # a second node
    s = m.create("a")
    other_view = other.get("a")
    s.set_state(SessionState.SPEAKING)
    m.delete("a")
    m.delete("a")
    other.delete("a")  # ended already: no second callback anywhere
    # The callback sees the state from before CLOSED (as in-process); the other node
    # sees CLOSED from the claim on.
    assert ended == [("a", SessionState.SPEAKING, SessionState.CLOSED)]
    assert s.state is SessionState.CLOSED and other_view.state is SessionState.CLOSED
    assert "a" not in m and m.count() == 0
    with pytest.raises(SessionNotFoundError):
        m.get("a")


def test_an_ended_session_works_until_its_id_is_used_again(make_redis, clock):
    m = make_redis()
    old = m.create("a")
    old.add_message(ChatMessage("user", "before"))
    m.delete("a")
    old.add_message(ChatMessage("user", "after the end"))  # as on an ended in-process session
    assert old.mark_turn_started() == 1 and [x.content for x in old.history_snapshot()] == ["before", "after the end"]
    fresh = m.create("a")
    assert fresh is not old and m.get("a") is fresh and fresh.history_snapshot() == []
    assert fresh.state is SessionState.INIT and fresh.current_turn_seq == 0
    assert old.state is SessionState.CLOSED  # another incarnation: the old one stays ended
    for call in (lambda: old.add_message(ChatMessage("user", "x")), old.mark_turn_started, old.touch,
                 lambda: old.last_active_at, old.history_snapshot, lambda: old.set_state(SessionState.LISTENING)):
        with pytest.raises(SessionNotFoundError, match="has ended and its record is gone"):
            call()
    assert fresh.history_snapshot() == [] and fresh.state is SessionState.INIT


def test_ended_keys_expire(make_redis, raw):
    m = make_redis()
    s = m.create("a")
    s.add_message(ChatMessage("user", "x"))
    m.delete("a")
    s.set_dialog_context([DialogContextItem("u", "t")])  # made after the end: the same TTL
    keys = raw.keys("capsule:{a}:*")
    assert {b"capsule:{a}:session", b"capsule:{a}:history", b"capsule:{a}:dialog"} <= set(keys)
    for key in keys:
        assert 0 < raw.pttl(key) <= redis_session.RETENTION_SECONDS * 1000


def test_evict_idle_as_in_go(make_redis, clock):
    ended = []
    m = make_redis(idle_timeout=10, on_session_end=lambda s: ended.append(s.id))
    a, b = m.create("a"), m.create("b")
    clock.advance(5)
    b.touch()
    clock.advance(5)
    assert m.evict_idle() == []  # exactly idle_timeout: not evicted (strictly longer)
    clock.advance(0.5)
    assert m.evict_idle() == [a] and ended == ["a"] and a.state is SessionState.CLOSED
    assert m.evict_idle(now=clock() + 100) == [b] and m.count() == 0
    zero = make_redis(idle_timeout=0, namespace="zero")
    s = zero.create("s")
    assert zero.evict_idle(now=clock()) == [] and zero.evict_idle(now=clock() + 1e-6) == [s]
    never = make_redis(idle_timeout=math.inf, namespace="never")
    never.create("s")
    assert never.evict_idle(now=clock() + 1e9) == []
    always = make_redis(idle_timeout=-math.inf, namespace="always")
    s = always.create("s")
    assert always.evict_idle(now=clock() - 1e6) == [s]
    with pytest.raises(ValueError):
        m.evict_idle(now=math.nan)


def test_a_frame_or_message_keeps_a_session_alive(make_redis, clock):
    m = make_redis(idle_timeout=10)
    s = m.create("a")
    clock.advance(8)
    s.add_message(ChatMessage("user", "x", timestamp=1.0))  # the message's own time is not the touch
    clock.advance(8)
    assert m.evict_idle() == [] and s.last_active_at == clock() - 8


def test_callback_errors_are_raised_after_every_session_ended(make_redis):
    seen = []

    def on_end(session):
        seen.append(session.id)
        if session.id == "a":
            raise ValueError("a failed")
        if session.id == "b":
            raise KeyboardInterrupt

    m = make_redis(on_session_end=on_end)
    sessions = [m.create(i) for i in "abc"]
    with pytest.raises(KeyboardInterrupt):
        m.close()
    assert seen == ["a", "b", "c"] and all(s.state is SessionState.CLOSED for s in sessions)
    with pytest.raises(SessionError, match="closed"):
        m.create("d")
    m.close()  # idempotent, and there is nothing left to end
    assert seen == ["a", "b", "c"]


def test_close_ends_every_session_of_the_namespace_and_with_calls_it(make_redis, redis_url, clock):
    ended = []
    other = make_redis(namespace="other")
    kept = other.create("x")
    node_b = make_redis()
    b = node_b.create("b")
    with RedisSessionManager(redis_url, 8, cleanup_interval=None, clock=clock, on_session_end=ended.append) as m:
        a = m.create("a")
    assert [s.id for s in ended] == ["b", "a"]  # in the order they were made, whichever node made them
    assert b.state is SessionState.CLOSED and a.state is SessionState.CLOSED and node_b.count() == 0
    assert kept.state is SessionState.INIT and other.count() == 1  # another namespace is another cluster


def test_stop_leaves_the_sessions(make_redis):
    m = make_redis(cleanup_interval=0.05)
    s = m.create("a")
    m.stop()
    m.stop()
    assert m._thread is not None and not m._thread.is_alive()
    assert m.get("a") is s and s.state is SessionState.INIT


def test_the_cleanup_thread_evicts(redis_url):
    ended = threading.Event()
    m = RedisSessionManager(redis_url, 4, idle_timeout=0.05, cleanup_interval=0.05,
                            on_session_end=lambda s: ended.set())
    try:
        m.create("a")
        assert ended.wait(5) and m.count() == 0
    finally:
        m.stop()


def test_ids_are_any_str(make_redis, raw):
    m = make_redis(16)
    ids = ["", "{", "}", "a{b}c", "\\(", "caf\u00e9", "\ud800", "x" * 1000, "a:b:registry"]
    sessions = [m.create(i) for i in ids]
    assert [s.id for s in m.list()] == ids and all(m.get(i) is s for i, s in zip(ids, sessions, strict=True))
    class Sub(str):
        def __hash__(self):
            return 1
    assert m.get(Sub("caf\u00e9")) is sessions[5]
    # Each session's keys share one hash slot, and no two sessions' tags collide.
    for s in sessions:
        s.add_message(ChatMessage("user", "x"))
        s.set_dialog_context([])
        keys = s._names.all([])
        assert len({key_slot(k) for k in keys}) == 1
        assert all(raw.exists(k) for k in keys)
    assert len({s._names.session for s in sessions}) == len(ids)


@pytest.mark.skipif(redis_session.RedisFrameRing is None,
                    reason="the frame streams (capsule_sessions/redis/_frames.py) are not in this tree")
@pytest.mark.parametrize("session_id", ["\ud800", "a\udfffb{c}", "caf\u00e9"])
def test_any_str_id_stores_reads_and_subscribes_frames(make_redis, redis_url, clock, session_id):
    """The frame ring named its keys in str, which a lone surrogate cannot be encoded
    from: every visual call of such a session raised UnicodeEncodeError."""
    m = make_redis(4)
    s = m.create(session_id)
    sub = s.subscribe_visual_frames(4)
    clock.advance(1)
    assert s.store_frame(b"f" * 8, source="cam", max_recent=2)
    assert [bytes(f.data) for f in s.latest_visual_frames(10)] == [b"f" * 8]
    assert s.visual_stats()["accepted"] == 1
    assert bytes(sub.get(timeout=5).data) == b"f" * 8
    m.delete(session_id)
    with pytest.raises(SubscriptionClosed):
        sub.get(timeout=5)

    async def run():
        async with AsyncRedisSessionManager(redis_url, 4, cleanup_interval=None,
                                            clock=clock, namespace="async-ids") as am:
            a = await am.create(session_id)
            clock.advance(1)
            assert await a.store_frame(b"g" * 8, source="cam", max_recent=2)
            assert [bytes(f.data) for f in await a.latest_visual_frames(10)] == [b"g" * 8]
            assert (await a.visual_stats())["accepted"] == 1

    asyncio.run(run())


@frames_built
def test_an_ended_sessions_frames_stay_its_own_once_its_id_is_used_again(make_redis, clock):
    """The frame ring's keys are the id's, whichever incarnation: an old object stored
    into, read, counted and ended the frames of a new session made under its id."""
    m = make_redis()
    other_node = make_redis()
    old = m.create("a")
    old_elsewhere = other_node.get("a")
    clock.advance(1)
    assert old.store_frame(b"1" * 8, source="cam", max_recent=4)
    m.delete("a")
    clock.advance(1)
    assert old.store_frame(b"2" * 8, source="cam", max_recent=4)  # as on an ended in-process session
    assert [bytes(f.data) for f in old.latest_visual_frames(10)] == [b"1" * 8, b"2" * 8]
    fresh = m.create("a")
    sub = fresh.subscribe_visual_frames(4)
    stale = (lambda: old.store_frame(b"x" * 8, source="cam", max_recent=4),
             lambda: old_elsewhere.store_frame(b"x" * 8, source="cam", max_recent=4),
             lambda: old.latest_visual_frames(10), old.visual_stats, old.subscribe_visual_frames,
             lambda: old.start_visual_input("other"), old.stop_visual_input,
             lambda: old.loan_frame(8).commit(source="cam", max_recent=4))
    for call in stale:
        clock.advance(1)
        with pytest.raises(SessionNotFoundError, match="has ended and its record is gone"):
            call()
    old._ring.close_subscriptions()  # a late end of the old incarnation (the ending node was slow)
    assert fresh.visual_stats() == {"accepted": 0, "rate_limited": 0, "source_resets": 0, "frames": 0, "bytes": 0}
    assert fresh.latest_visual_frames(10) == []
    clock.advance(1)
    assert fresh.store_frame(b"3" * 8, source="cam", max_recent=4)
    assert bytes(sub.get(timeout=5).data) == b"3" * 8 and not sub.closed


@frames_built
def test_a_subscription_ends_when_its_session_is_made_again_without_its_end(make_redis, clock):
    """A node that claimed the session died before it ended the frames (or its end came
    after the id was used again): the other nodes' readers of the old incarnation went
    on reading the new one's frames."""
    m = make_redis()
    other_node = make_redis()
    old = other_node.create("a")
    sub = m.get("a").subscribe_visual_frames(4)
    clock.advance(1)
    assert old.store_frame(b"1" * 8, source="cam", max_recent=4)
    assert bytes(sub.get(timeout=5).data) == b"1" * 8
    other_node._end = lambda sessions: None  # the ending node dies after its claim
    other_node.delete("a")
    fresh = other_node.create("a")
    clock.advance(1)
    assert fresh.store_frame(b"2" * 8, source="cam", max_recent=4)
    with pytest.raises(SubscriptionClosed):
        sub.get(timeout=5)
    assert sub.delivered == 1


@frames_built
def test_an_ended_asyncio_sessions_frames_stay_its_own_once_its_id_is_used_again(redis_url, clock):
    async def run():
        async with AsyncRedisSessionManager(redis_url, 4, cleanup_interval=None, clock=clock,
                                            namespace="async-inc") as m:
            old = await m.create("a")
            await m.delete("a")
            fresh = await m.create("a")
            sub = await fresh.subscribe_visual_frames(4)
            stale = (lambda: old.store_frame(b"x" * 8, source="cam", max_recent=4),
                     lambda: old.latest_visual_frames(10), old.visual_stats, old.subscribe_visual_frames,
                     lambda: old.start_visual_input("other"), old.stop_visual_input)
            for call in stale:
                clock.advance(1)
                with pytest.raises(SessionNotFoundError, match="has ended and its record is gone"):
                    await call()
            await old._ring.close_subscriptions()
            assert (await fresh.visual_stats())["accepted"] == 0
            clock.advance(1)
            assert await fresh.store_frame(b"3" * 8, source="cam", max_recent=4)
            assert bytes((await asyncio.wait_for(sub.__anext__(), 5)).data) == b"3" * 8 and not sub.closed

    asyncio.run(run())


def test_namespaces_keep_deployments_apart(make_redis):
    a = make_redis(1, namespace="one")
    b = make_redis(1, namespace="two")
    a.create("s")
    b.create("s")
    assert a.count() == b.count() == 1 and a.get("s") is not b.get("s")


def test_nothing_is_pickled(make_redis, raw):
    from pathlib import Path

    import capsule_sessions.redis as package

    for path in Path(package.__file__).parent.glob("*.py"):
        assert "import pickle" not in path.read_text() and "pickle." not in path.read_text(), path
    s = make_redis().create("s", character_id="c")
    s.add_message(ChatMessage("user", "hi \u00e9", turn_seq=2))
    s.set_dialog_context([DialogContextItem("user", "t", 3)])
    for key in raw.keys("*"):
        kind = raw.type(key)
        if kind == b"hash":
            assert all(value.decode() is not None for value in raw.hgetall(key).values())
        elif kind == b"list":
            assert json.loads(raw.lrange(key, 0, -1)[0]) == ["2", "user", "hi \u00e9", repr(s.last_active_at)]
        elif kind == b"string":
            assert json.loads(raw.get(key)) == [["user", "t", "3"]]
        else:
            assert kind == b"zset"


# -- time --------------------------------------------------------------------------------
def test_the_default_clock_is_the_servers(make_redis, raw):
    m = make_redis(server_clock=True)
    secs, usecs = raw.time()
    s = m.create("a")
    assert abs(s.created_at - (secs + usecs / 1e6)) < 0.5
    before = s.last_active_at
    s.touch()
    assert s.last_active_at >= before
    wall = datetime.datetime.fromtimestamp(s.created_at, tz=datetime.timezone.utc)
    assert s.to_dict()["created_at"] == wall.isoformat().replace("+00:00", "Z")
    clock = m._ctx.clock
    readings = [clock() for _ in range(1000)]
    assert readings == sorted(readings)
    clock.update(clock.offset - 10)  # a new measurement that is behind: never backwards
    assert clock() >= readings[-1]


def test_a_node_without_eviction_measures_the_servers_clock_again_in_get_and_list(make_redis, monkeypatch):
    """The offset to the server's clock was measured again only by the cleanup loop: a
    node made with cleanup_interval=None (a worker that only reads) kept its first
    offset forever, and its local clock's drift with it."""
    from capsule_sessions.redis import _clock, _manager

    m = make_redis(server_clock=True, cleanup_interval=None)
    m.create("a")
    measured = []
    real = _manager.measure
    monkeypatch.setattr(_manager, "measure", lambda client: measured.append(1) or real(client))
    m.get("a")
    m.list()
    assert measured == []  # not due yet
    monkeypatch.setattr(_clock, "REFRESH_SECONDS", 0.0)
    m.get("a")
    m.list()
    assert len(measured) == 2


def test_an_injected_clock_drives_everything(make_redis):
    clock = FakeClock(50.0)
    m = make_redis(idle_timeout=1, clock=clock)
    s = m.create("a")
    assert s.created_at == 50.0
    clock.advance(2)
    assert m.evict_idle() == [s]


# -- pipelines ---------------------------------------------------------------------------
def test_wait_pipeline_done_wakes_on_finish_from_another_object(make_redis, redis_url):
    a = make_redis().create("a")
    b = make_redis().get("a")  # another manager: another node, as far as the session knows
    assert b.wait_pipeline_done(0) and b.wait_pipeline_done(None)  # none started
    seq = a.mark_pipeline_running()
    assert not b.wait_pipeline_done(0) and not b.wait_pipeline_done(0.05)
    timer = threading.Timer(0.2, a.mark_pipeline_finished, (seq,))
    started = time.monotonic()
    timer.start()
    assert b.wait_pipeline_done(5)
    assert time.monotonic() - started < 2
    a.mark_pipeline_finished(seq - 1)  # stale: ignored
    seq2 = a.mark_pipeline_running()
    threading.Timer(0.1, a.mark_pipeline_finished, (seq2 - 1,)).start()  # stale: the wait times out
    assert not b.wait_pipeline_done(0.4)
    assert b.is_current_pipeline(seq2) and not b.is_current_pipeline(seq)
    assert b.wait_pipeline_done(datetime.timedelta(0)) is False


def test_greeting_once(make_redis, clock):
    s = make_redis().create("a")
    clock.advance(3)
    assert s.try_start_voice_startup_greeting() and s.last_active_at == clock()
    clock.advance(3)
    assert not s.try_start_voice_startup_greeting() and s.last_active_at == clock() - 3


# -- the frame streams (RedisFrameRing, _frames.py) -----------------------------------------
@frames_built
def test_visual_calls_reach_the_ring(make_redis, clock):
    m = make_redis()
    a = m.create("a")
    b = make_redis().get("a")
    clock.advance(1)
    assert a.store_frame(b"x" * 10, source="cam", max_recent=2)
    assert b.last_active_at == clock()  # an accepted frame touches the session, for every node
    frames = b.latest_visual_frames(10)
    assert [bytes(f.data) for f in frames] == [b"x" * 10]
    assert b.visual_stats()["accepted"] == 1


@frames_built
def test_ending_closes_subscriptions_on_every_node(make_redis):
    from capsule_sessions import SubscriptionClosed

    a = make_redis()
    node_b = make_redis()
    s = a.create("a")
    sub = node_b.get("a").subscribe_visual_frames(4)
    assert s.store_frame(b"z" * 4, source="cam", max_recent=2)
    a.delete("a")
    assert bytes(sub.get(timeout=5).data) == b"z" * 4  # what was accepted first, then the end
    with pytest.raises(SubscriptionClosed):
        sub.get(timeout=5)


@pytest.mark.skipif(redis_session.AsyncRedisFrameRing is None,
                    reason="the asyncio frame streams (capsule_sessions/redis/_frames_async.py) are not in this tree")
def test_asyncio_visual_calls_reach_the_ring(redis_url, clock):
    async def run():
        async with AsyncRedisSessionManager(redis_url, 4, cleanup_interval=None, clock=clock) as m:
            s = await m.create("a")
            sub = await s.subscribe_visual_frames(4)
            clock.advance(1)
            assert await s.store_frame(b"y" * 8, source="cam", max_recent=2)
            assert await s.last_active_at == clock()  # an accepted frame touches the session
            assert [bytes(f.data) for f in await s.latest_visual_frames(10)] == [b"y" * 8]
            assert (await s.visual_stats())["accepted"] == 1
            await m.delete("a")
            assert bytes((await sub.aget(timeout=5)).data) == b"y" * 8

    asyncio.run(run())


def test_visual_calls_without_frame_streams_say_so(make_redis, monkeypatch):
    monkeypatch.setattr(RedisSession, "_ring_class", None)
    s = make_redis().create("a")
    with pytest.raises(RuntimeError, match="no frame streams"):
        s.store_frame(b"x", source="cam", max_recent=1)
    with pytest.raises(ValueError, match="not shared"):
        s.shared_stats()


# -- the asyncio twin ----------------------------------------------------------------------
def test_the_asyncio_twin_gives_the_same_results(redis_url, clock, fixed_wall):
    rng = random.Random(7)
    local = SessionManager(8, clock=clock, cleanup_interval=None, backend="python").create("s")
    ops = [_random_op(rng, clock) for _ in range(80)]

    async def run():
        ended = []

        async def on_end(s):
            ended.append((s.id, await s.state))

        async with AsyncRedisSessionManager(redis_url, 2, idle_timeout=10, cleanup_interval=None, clock=clock,
                                            on_session_end=on_end) as m:
            s = await m.create("s")
            for name, args in ops:
                expected = _outcome(getattr(local, name), *args)
                try:
                    got = ("ok", await getattr(s, name)(*args))
                except Exception as exc:
                    got = ("raised", type(exc), str(exc))
                assert got == expected, (name, args)
            assert await s.state == local.state and await s.owner_id == local.owner_id
            assert await s.last_active_at == local.last_active_at
            assert await s.current_turn_seq == local.current_turn_seq
            assert await s.history_snapshot() == local.history_snapshot()
            assert await s.dialog_context_snapshot() == local.dialog_context_snapshot()
            assert tuple(await s.conversation_snapshot()) == tuple(local.conversation_snapshot())
            assert await s.to_dict() == local.to_dict()
            assert await m.get("s") is s and await m.list() == [s] and await m.count() == 1
            assert await m.contains("s") and not await m.contains(5)
            with pytest.raises(TypeError, match="await manager.count"):
                len(m)
            with pytest.raises(TypeError, match="await manager.contains"):
                "s" in m  # noqa: B015
            with pytest.raises(SessionExistsError):
                await m.create("s")
            await m.create("t")
            with pytest.raises(MaxSessionsError):
                await m.create("u")
            with pytest.raises(MaxSessionsError):  # the limit first, as in-process
                await m.create("s")
            with pytest.raises(SessionNotFoundError):
                await m.get("u")
            await m.touch("t")
            clock.advance(11)
            await m.touch("t")
            assert [x.id for x in await m.evict_idle()] == ["s"]
            await m.delete("t")
            await m.delete("t")
            seq = await (t2 := await m.create("w")).mark_pipeline_running()
            waiter = asyncio.ensure_future(t2.wait_pipeline_done(5))
            await asyncio.sleep(0.1)
            assert not waiter.done()
            await t2.mark_pipeline_finished(seq)
            assert await waiter
        assert ended == [("s", local.state), ("t", SessionState.INIT), ("w", SessionState.INIT)]
        with pytest.raises(SessionError, match="closed"):
            await m.create("x")

    asyncio.run(run())


def test_the_asyncio_cleanup_task_evicts(redis_url):
    async def run():
        ended = asyncio.Event()
        m = AsyncRedisSessionManager(redis_url, 4, idle_timeout=0.05, cleanup_interval=0.05,
                                     on_session_end=lambda s: ended.set())
        try:
            await m.create("a")
            await asyncio.wait_for(ended.wait(), 5)
            assert await m.count() == 0
        finally:
            await m.stop()
            await m.stop()
            await m.aclose()

    asyncio.run(run())


def test_dataclass_copies_are_not_shared(make_redis):
    s = make_redis().create("a")
    item = DialogContextItem("u", "t", 1)
    s.set_dialog_context([item])
    item.text = "changed"
    got = s.dialog_context_snapshot()
    got[0].text = "mine"
    assert s.dialog_context_snapshot() == [DialogContextItem("u", "t", 1)] != [dataclasses.replace(item)]


# -- the benchmark (W17) ---------------------------------------------------------------------
def test_w17_runs_on_a_private_server_and_is_judged():
    from capsule_sessions.bench import redis_ops, report, runner, targets

    assert redis_ops.W17_ID in runner.ALL_IDS
    selection = runner.select("W17")
    settings = dataclasses.replace(runner.QUICK, repeats=2, min_batch_s=0.002)
    ticks = []
    results = runner.run(selection, settings, ticks.append)
    assert len(ticks) == runner.total_steps(selection, settings)
    w17 = results["redis"][redis_ops.W17_ID]
    assert set(w17["results"]) == set(redis_ops.OPS) and all(r > 0 for r in w17["ratios"].values())
    checks = [c for c in results["checks"] if c["workload"] == redis_ops.W17_ID]
    assert [c["target"].split(":")[0] for c in checks] == list(redis_ops.OPS)
    assert all(c["met"] in (True, False) for c in checks)
    assert "### W17" in report.markdown(results)
    assert targets.evaluate_redis({"redis": {redis_ops.W17_ID: {"unavailable": "no server"}}})[0]["met"] is None


def test_the_typed_program_runs(redis_url):
    """tests/typing/redis_program.py is what mypy --strict checks; it runs too."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent / "typing" / "redis_program.py"
    spec = importlib.util.spec_from_file_location("redis_program", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(redis_url)
