"""What the nodes of the multi-process Redis tests run: each function runs in a spawned
process of its own (a node: its own manager, its own connections), against the test's
real redis-server. Nodes start together at a gate (``gate``): each says it is ready, then
waits for the test to open it, so the calls race for real.
"""

from __future__ import annotations

import os
import signal
import time

from capsule_sessions import ChatMessage, DialogContextItem, MaxSessionsError, SessionError, SessionExistsError
from capsule_sessions.redis import RedisSessionManager
from redis_server import raw_client

GATE_READY = "test:gate:ready"
GATE_OPEN = "test:gate:open"


def gate(url: str) -> None:
    client = raw_client(url)
    client.incr(GATE_READY)
    deadline = time.monotonic() + 60
    while not client.exists(GATE_OPEN):
        if time.monotonic() > deadline:
            raise TimeoutError("the gate was never opened")
        time.sleep(0.001)
    client.close()


def manager(url: str, max_concurrent: int = 1000, **kwargs: object) -> RedisSessionManager:
    return RedisSessionManager(url, max_concurrent, cleanup_interval=None, **kwargs)  # type: ignore[arg-type]


def create_many(url: str, node: int, ids: list[str], max_concurrent: int) -> dict[str, list[str]]:
    m = manager(url, max_concurrent)
    out: dict[str, list[str]] = {"created": [], "max": [], "exists": []}
    gate(url)
    for id in ids:
        try:
            m.create(id)
            out["created"].append(id)
        except MaxSessionsError:
            out["max"].append(id)
        except SessionExistsError:
            out["exists"].append(id)
    return out


def end_all(url: str, node: int, ids: list[str], idle_now_offset: float) -> list[str]:
    """Delete or evict every id (half the nodes evict), recording each callback in Redis."""
    client = raw_client(url)

    def on_end(session: object) -> None:
        client.rpush("test:ended", f"{node}:{session.id}")  # type: ignore[attr-defined]

    m = manager(url, on_session_end=on_end)
    gate(url)
    ended = []
    if node % 2:
        ended = [s.id for s in m.evict_idle(now=m._ctx.clock() + idle_now_offset)]
    else:
        for id in ids[node % len(ids):] + ids[:node % len(ids)]:
            m.delete(id)
    return ended


def bump(url: str, node: int, id: str, times: int) -> dict[str, list[int]]:
    m = manager(url)
    s = m.get(id)
    gate(url)
    out: dict[str, list[int]] = {"pipelines": [], "turns": [], "greetings": []}
    for _ in range(times):
        out["pipelines"].append(s.mark_pipeline_running())
        out["turns"].append(s.mark_turn_started())
        out["greetings"].append(int(s.try_start_voice_startup_greeting()))
    return out


def wait_done(url: str, node: int, id: str, timeout: float) -> tuple[bool, float]:
    m = manager(url)
    s = m.get(id)
    client = raw_client(url)
    client.rpush("test:waiting", node)
    started = time.monotonic()
    done = s.wait_pipeline_done(timeout)
    return done, time.monotonic() - started


def answer(url: str, node: int, id: str, turn: int, noise: int) -> None:
    m = manager(url)
    s = m.get(id)
    gate(url)
    for i in range(noise):
        s.add_message(ChatMessage("user", f"noise-{node}-{i}"))
        if i == noise // 2:
            s.add_message(ChatMessage("assistant", f"a{turn}", turn_seq=turn))


def skewed_node(url: str, skew: float, id: str) -> dict[str, float]:
    """A node whose own clocks (wall and monotonic) are ``skew`` seconds off."""
    real_time, real_monotonic = time.time, time.monotonic
    time.time = lambda: real_time() + skew  # type: ignore[assignment]
    time.monotonic = lambda: real_monotonic() + skew  # type: ignore[assignment]
    m = manager(url)
    s = m.create(id)
    theirs = m.get("parent")
    return {"created_at": s.created_at, "parent_age": m._ctx.clock() - theirs.last_active_at,
            "pid": float(os.getpid())}


def store_until_killed(url: str, id: str) -> None:
    """Write and acknowledge, forever: the test SIGKILLs this node mid-way."""
    client = raw_client(url)
    m = manager(url)
    s = m.create(id)
    n = 0
    while True:
        n += 1
        s.add_message(ChatMessage("user", f"m{n}", turn_seq=n))
        s.mark_turn_started()
        client.set("test:acked", n)  # after the call returned: stored


def end_and_die(url: str, id: str) -> None:
    """Claim a session, then die (SIGKILL) inside on_session_end."""

    def on_end(session: object) -> None:
        os.kill(os.getpid(), 9)

    manager(url, on_session_end=on_end).delete(id)


def churn(url: str, seconds: float, pending_seconds: float | None = None) -> None:
    """Create, write and delete sessions as fast as it can (the test kills the server, or
    this node, mid-way); counts its rounds in test:churned. ``pending_seconds``: how long
    its pending hashes last on Redis Cluster."""
    if pending_seconds is not None:
        from capsule_sessions.redis import _manager

        _manager.PENDING_SECONDS = pending_seconds
    client = raw_client(url)
    m = RedisSessionManager(url, 20, cleanup_interval=None)
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        n += 1
        try:
            s = m.create(f"s{n % 40}")
            s.add_message(ChatMessage("user", "q", turn_seq=1))
            s.add_message(ChatMessage("user", "q2", turn_seq=2))
            s.add_message(ChatMessage("assistant", "a", turn_seq=1))
            s.set_dialog_context([DialogContextItem("u", "t", n)])
        except SessionError:
            pass
        try:
            m.delete(f"s{(n * 7) % 40}")
            client.incr("test:churned")
        except SessionError:
            pass


def die_between_steps(url: str, step: str, id: str, max_concurrent: int, pending_seconds: float) -> None:
    """On Redis Cluster: create (``step="confirm"``) or delete (``step="release"``)
    session ``id``, SIGKILLed just before that step's script runs, as a node that dies
    between two steps of a membership change (its pending hashes last
    ``pending_seconds``)."""
    from capsule_sessions.redis import _manager

    def die(**kwargs: object) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    _manager.PENDING_SECONDS = pending_seconds
    m = manager(url, max_concurrent)
    setattr(m._ctx.scripts, step, die)
    if step == "confirm":
        m.create(id)
    else:
        m.delete(id)
