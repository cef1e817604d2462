"""Where ``attach`` finds another process's sessions: in shared memory (``--namespace``)
or in Redis (``--redis``). Both give the attacher the same few calls: list the sessions
there, open one, subscribe to it, read its counters, let go of it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import SessionNotFoundError, SharedMemoryError, Subscription, attach, list_shared
from ._redis import DEFAULT_NAMESPACE, open_manager, store_clock

if TYPE_CHECKING:
    from ..redis import RedisSession


class Gone(Exception):
    """The session ended between its listing and the attach (or the subscription)."""


class Unusable(Exception):
    """The session, or the listing, cannot be read; str() says why."""


class SharedSessions:
    """Sessions shared in this machine's memory under a namespace (``list_shared``,
    ``attach``); instants are ``time.monotonic``, one clock for every process."""

    redis_url: str | None = None

    def __init__(self, namespace: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.namespace = namespace
        self.clock = clock
        self.where = f"namespace {namespace}"

    def listed(self) -> list[tuple[object, str]]:
        """(key, session id) of every session there; a session's key is new when it is."""
        return [(session_id, session_id) for session_id in list_shared(self.namespace)]

    def open(self, key: Any, session_id: str) -> Any:
        try:
            return attach(session_id, namespace=self.namespace)
        except SessionNotFoundError:
            raise Gone(session_id) from None
        except SharedMemoryError as exc:
            raise Unusable(f"cannot attach: {exc}") from None

    def subscribe(self, handle: Any, buffer: int, policy: str) -> Subscription:
        try:
            sub: Subscription = handle.subscribe_visual_frames(buffer, policy=policy)
        except (SharedMemoryError, ValueError) as exc:  # e.g. all 32 subscription slots taken
            raise Unusable(f"cannot subscribe: {exc}") from None
        return sub

    def stats(self, handle: Any) -> tuple[dict[str, int], dict[str, int]]:
        """The owner's counters as it published them: readable after the session ended."""
        return dict(handle.visual_stats()), dict(handle.shared_stats())

    def owner_pid(self, handle: Any) -> int | None:
        return int(getattr(handle, "owner_pid", 0) or 0)

    def release(self, handle: Any) -> None:
        handle.close()

    def close(self) -> None:
        pass


class RedisSessions:
    """Sessions in Redis at a URL, under a namespace, read as a node of their cluster: a
    ``RedisSessionManager`` of this process's own, which only lists and subscribes.

    The node never ends a session: no eviction thread (``cleanup_interval=None``, so an
    idle session is never evicted from here and ``on_session_end`` never runs here), no
    ``delete``, and ``close()`` stops it without ``RedisSessionManager.close()``, which
    would end every session of the namespace on every node. Its instants are the Redis
    server's clock, read through this process's offset to it, measured when it connects
    and again each minute by its list() (the polling below); the producer's frames are
    stamped on the same server clock, so a latency is one clock minus itself.
    """

    def __init__(self, url: str, namespace: str = DEFAULT_NAMESPACE) -> None:
        from ..redis import SessionStoreError

        # max_concurrent bounds create(), which this node never calls.
        self.manager = open_manager(url, 0, namespace, cleanup_interval=None)
        self.namespace = namespace
        self.redis_url: str | None = self.manager.url  # the password masked
        self.clock = store_clock(self.manager)
        self.where = f"Redis at {self.manager.url}, namespace {namespace}"
        self._errors = (SessionStoreError,)

    def listed(self) -> list[tuple[object, str]]:
        # The manager keeps one object per session incarnation: an id that ended and was
        # made again is a new object, so a new key, and is attached to again.
        try:
            return [(session, session.id) for session in self.manager.list()]
        except self._errors as exc:
            raise Unusable(f"cannot list the sessions: {exc}") from None

    def open(self, key: Any, session_id: str) -> RedisSession:
        session: RedisSession = key  # listed() made each session its own key
        return session

    def subscribe(self, handle: RedisSession, buffer: int, policy: str) -> Subscription:
        try:
            sub = handle.subscribe_visual_frames(buffer, policy=policy)
        except SessionNotFoundError:  # it ended, and its id was made again, since it was listed
            raise Gone(handle.id) from None
        except self._errors as exc:
            raise Unusable(f"cannot subscribe: {exc}") from None
        if sub.closed:  # a subscription to a session that ended starts closed
            raise Gone(handle.id)
        return sub

    def stats(self, handle: RedisSession) -> tuple[dict[str, int], dict[str, int]]:
        """The session's counts, the cluster's; readable after it ended (its keys are
        kept for a while, docs/redis.md)."""
        return dict(handle.visual_stats()), {}

    def owner_pid(self, handle: Any) -> int | None:
        return None  # a session in Redis belongs to no process

    def release(self, handle: Any) -> None:
        pass  # the session is the producer's; this node's subscription was closed already

    def close(self) -> None:
        self.manager.stop()


Store = SharedSessions | RedisSessions
