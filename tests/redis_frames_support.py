"""Sessions whose frames are in Redis, for the frame tests (tests/test_redis_frames*.py).

``RingSession`` is the smallest session object around a ``RedisFrameRing``: the visual
methods, ``last_active_at`` (kept in Redis by the ring's activity hook, as a Redis
session keeps it) and ``_ring``. tests/conftest.py's ``make_session`` makes these for the
"redis" kind of its ``sharing`` fixture, so the in-process frame tests run on Redis too.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from capsule_sessions.redis._frames import RedisFrameRing
from capsule_sessions.redis._keys import SessionKeys

ACTIVITY_FIELD = "last_active_at"


def client_for(url: str, timeout: float = 2.0, retries: int = 1) -> redis.Redis:
    """A client as a node would make one: a bounded timeout, few retries."""
    return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), retries))


class RingSession:
    """A session of one id in ``namespace`` whose frames are a RedisFrameRing."""

    shared = None
    backend = "redis"

    def __init__(self, id: str, client: redis.Redis, url: str, clock: Callable[[], float],
                 namespace: str | None = None) -> None:
        self.id = id
        self.namespace = namespace or f"test-{uuid.uuid4().hex[:12]}"
        self._client = client
        self._clock = clock
        self.created_at = clock()
        keys = SessionKeys(self.namespace, id)
        self._activity_key = keys.key("activity")
        client.hset(self._activity_key, ACTIVITY_FIELD, repr(self.created_at))
        self._ring = RedisFrameRing(client, keys, url, clock, activity=(self._activity_key, ACTIVITY_FIELD))

    @property
    def last_active_at(self) -> float:
        return float(self._client.hget(self._activity_key, ACTIVITY_FIELD))  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        if name in ("store_frame", "store_visual_frame", "latest_visual_frames", "subscribe_visual_frames",
                    "visual_stats", "start_visual_input", "stop_visual_input", "loan_frame"):
            return getattr(self._ring, name)
        raise AttributeError(name)

    def close(self) -> None:
        self._ring.close_subscriptions()


class AsyncRingSession:
    """A RingSession on the asyncio twin: an ``AsyncRedisFrameRing`` on an event loop of
    its own (a thread), each visual method a blocking call of its coroutine there, so the
    same tests drive it. Its subscriptions' readers are tasks on that loop."""

    shared = None
    backend = "redis-async"

    def __init__(self, id: str, url: str, clock: Callable[[], float], namespace: str | None = None) -> None:
        import asyncio
        import threading

        import redis.asyncio
        from redis.asyncio.retry import Retry as AsyncRetry

        from capsule_sessions.redis._frames import AsyncRedisFrameRing

        self.id = id
        self.namespace = namespace or f"test-{uuid.uuid4().hex[:12]}"
        self._clock = clock
        self.created_at = clock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="async-ring-loop", daemon=True)
        self._thread.start()
        self._client = redis.asyncio.Redis.from_url(
            url, socket_timeout=2.0, socket_connect_timeout=2.0,
            retry=AsyncRetry(ExponentialBackoff(cap=0.05, base=0.01), 1))
        keys = SessionKeys(self.namespace, id)
        self._activity_key = keys.key("activity")
        self._call(self._client.hset(self._activity_key, ACTIVITY_FIELD, repr(self.created_at)))
        self._ring = AsyncRedisFrameRing(self._client, keys, url, clock,
                                         activity=(self._activity_key, ACTIVITY_FIELD))

    def _call(self, coro: Any) -> Any:
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=30)

    @property
    def last_active_at(self) -> float:
        return float(self._call(self._client.hget(self._activity_key, ACTIVITY_FIELD)))

    def __getattr__(self, name: str) -> Any:
        if name in ("store_frame", "store_visual_frame", "latest_visual_frames", "subscribe_visual_frames",
                    "visual_stats", "start_visual_input", "stop_visual_input"):
            method = getattr(self._ring, name)

            def blocking(*args: Any, **kwargs: Any) -> Any:
                return self._call(method(*args, **kwargs))

            return blocking
        raise AttributeError(name)

    def close(self) -> None:
        import asyncio

        async def finish() -> None:
            await self._ring.close_subscriptions()
            if self._ring._tasks:  # the readers see their queue closed within a read
                await asyncio.wait(set(self._ring._tasks), timeout=5)
            await self._client.aclose()

        try:
            self._call(finish())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()
