"""W17 (docs/bench.md): ``create``, ``get`` and ``touch`` of ``RedisSessionManager``
against the bare redis-py round trip that does the same storage work, on one private
redis-server on loopback (``redis_local``), side by side in interleaved rounds.

- create: ``manager.create(id)`` (a fresh id each time: the script checks the limit and
  the id, writes the session hash and the registry) against ``HSET`` of the same 15
  fields.
- get: ``manager.get(id)`` (the hash read and checked, this node's object returned)
  against ``HGETALL`` of the same hash.
- touch: ``manager.touch(id)`` (a script that checks the session is live, then sets its
  ``active``) against ``HSET`` of that one field.

Timed as W1-W7 are (``harness.interleaved``): calibrated batches, rounds in a shuffled
order, the median, and the ratio as the median of per-round ratios. The managers use the
server's clock, as a deployment does.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

from .._json import JsonObject
from . import harness, redis_local
from .workloads import Case

W17_ID = "W17_redis_session_ops"
IDS = (W17_ID,)
DESCRIPTION = "create, get and touch of RedisSessionManager against bare HSET and HGETALL round trips"
OPS = ("create", "get", "touch")
LIBRARY, BARE = "redis", "bare"
TARGETS = (LIBRARY, BARE)
BARE_COMMAND = {"create": "HSET of the 15 fields", "get": "HGETALL", "touch": "HSET of one field"}


def _loop(op: Callable[[], object]) -> Case:
    def run(n: int) -> None:
        for _ in itertools.repeat(None, n):
            op()

    return Case(op, run)


def _cases(url: str) -> tuple[dict[tuple[str, str], Case], Callable[[], None]]:
    import redis

    from ..redis import RedisSessionManager

    manager = RedisSessionManager(url, 10**9, cleanup_interval=None, namespace="bench")
    client = redis.Redis.from_url(url)
    manager.create("s")
    key = "bench:{s}:session"
    stored: dict[bytes, bytes] = client.hgetall(key)  # type: ignore[assignment]
    fields: Any = {k.decode(): v for k, v in stored.items()}  # as redis-py's mapping= types it
    ids = (f"c{n}" for n in itertools.count())
    bare_ids = (f"bench:{{b{n}}}:session" for n in itertools.count())
    active = fields["active"]
    create, get, touch = manager.create, manager.get, manager.touch
    hset, hgetall = client.hset, client.hgetall

    cases = {
        ("create", LIBRARY): _loop(lambda: create(next(ids))),
        ("create", BARE): _loop(lambda: hset(next(bare_ids), mapping=fields)),
        ("get", LIBRARY): _loop(lambda: get("s")),
        ("get", BARE): _loop(lambda: hgetall(key)),
        ("touch", LIBRARY): _loop(lambda: touch("s")),
        ("touch", BARE): _loop(lambda: hset(key, "active", active)),
    }

    def close() -> None:
        manager.stop()
        client.close()

    return cases, close


def steps(selected: bool, repeats: int) -> int:
    return harness.steps(len(OPS) * len(TARGETS), repeats) if selected else 0


def run(repeats: int, min_batch_s: float, progress: Callable[[str], None] | None = None) -> JsonObject:
    """W17's figures: {"results": {op: {target: summary}}, "ratios": {op: redis/bare}},
    or {"unavailable": why}."""
    reason = redis_local.unavailable()
    if reason is not None:
        return {"description": DESCRIPTION, "unavailable": reason}
    tick = progress or (lambda label: None)
    with redis_local.server() as url:
        cases, close = _cases(url)
        try:
            measured = harness.interleaved(cases, repeats, min_batch_s,
                                           progress=lambda key: tick(f"{W17_ID} {key[0]} {key[1]}"))
        finally:
            close()
    results = {op: {target: measured[(op, target)] for target in TARGETS} for op in OPS}
    return {
        "description": DESCRIPTION,
        "bare": BARE_COMMAND,
        "results": results,
        "ratios": {op: harness.paired_ratio(results[op][LIBRARY], results[op][BARE]) for op in OPS},
    }
