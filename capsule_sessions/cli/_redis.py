"""``--redis URL``: the commands' sessions in Redis (``capsule_sessions.redis``, the
``redis`` extra) instead of this process's memory, so another process or machine can
read them (``attach --redis URL``). What demo, ingest and attach share: the flags'
checks, the manager, and the clock the frames are stamped with.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from ._errors import StoreError, UsageError
from ._extras import require

if TYPE_CHECKING:
    from ..redis import RedisSessionManager

# RedisSessionManager's own default, so the CLI and a program left at its default meet.
DEFAULT_NAMESPACE = "capsule"


def check_flags(url: str | None, namespace: str | None, conflicts: Mapping[str, str]) -> str:
    """The Redis namespace to use (the default without ``--redis``, where it is unused);
    UsageError for flags that cannot go with ``--redis`` (``conflicts``: a flag that was
    given -> why not), a bad namespace, or a missing ``redis`` extra, before anything
    connects."""
    if url is None:
        if namespace is not None:
            raise UsageError("--redis-namespace needs --redis URL")
        return DEFAULT_NAMESPACE
    if conflicts:
        flag, why = next(iter(conflicts.items()))
        raise UsageError(f"--redis and {flag} cannot be used together: {why}")
    require("redis", "--redis")
    from ..redis._keys import check_namespace

    try:
        return check_namespace(DEFAULT_NAMESPACE if namespace is None else namespace)
    except ValueError as exc:
        raise UsageError(f"--redis-namespace: {exc}") from None


def open_manager(url: str, max_concurrent: int, namespace: str, *,
                 cleanup_interval: float | None = 30.0) -> RedisSessionManager:
    """A RedisSessionManager on ``url``: UsageError for a URL that is not one, StoreError
    (naming the URL, its password masked) for a server that cannot be reached."""
    from ..redis import RedisSessionManager, SessionStoreError

    try:
        return RedisSessionManager(url, max_concurrent, namespace=namespace, cleanup_interval=cleanup_interval)
    except SessionStoreError as exc:
        raise StoreError(f"--redis: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise UsageError(f"--redis: {exc}") from None


def store_clock(manager: RedisSessionManager) -> Callable[[], float]:
    """The clock the manager's sessions stamp frames with (received_at, the TTL, idle
    time): by default the Redis server's, read through this process's offset to it. A
    latency must be taken on it, never on time.monotonic, which is another clock."""
    clock: Callable[[], float] = manager._ctx.clock  # the manager has no public accessor for it
    return clock


def store_errors(url: str | None) -> tuple[type[BaseException], ...]:
    """What a call on a Redis session raises when the server fails (nothing without
    ``--redis``, so that ``except store_errors(None)`` catches nothing)."""
    if url is None:
        return ()
    from ..redis import SessionStoreError

    return (SessionStoreError,)


def attach_hint(url: str, namespace: str) -> str:
    """The command that reads these sessions from another process (``url`` masked)."""
    flag = "" if namespace == DEFAULT_NAMESPACE else f" --redis-namespace {namespace}"
    return f"capsule-sessions attach --redis {url}{flag}"
