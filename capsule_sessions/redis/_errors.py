"""The errors a Redis-backed manager raises, and the one place redis-py's become them.

Every failure to reach the server is a ``RedisUnavailableError`` naming the URL (with
the password masked), raised after the configured timeout at most; a value read back
that is not what this library wrote is a ``RedisDataError`` naming the key.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TypeVar

from ..errors import SessionError

T = TypeVar("T")


class SessionStoreError(SessionError):
    """The session store (the Redis server) failed a call: unreachable, or holding data
    this library did not write. Its subclasses say which."""


class RedisUnavailableError(SessionStoreError, ConnectionError):
    """The Redis server could not be reached, or did not answer within the timeout."""


class RedisDataError(SessionStoreError, ValueError):
    """A key holds something this library did not write (corrupted, or another program's)."""


def masked(url: str) -> str:
    """``url`` without its password: redis://user:secret@host -> redis://user:***@host."""
    return re.sub(r"(//[^:/@]*:)[^@/]*@", r"\1***@", url)


class translated:
    """``with translated(url):`` around a block of Redis calls: connection failures and
    timeouts become RedisUnavailableError naming ``url`` (with its password masked), a
    key of the wrong type a RedisDataError. (A class, not a generator: it is on every
    call's path.)"""

    __slots__ = ("url",)

    def __init__(self, url: str) -> None:
        self.url = url

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc is None or isinstance(exc, RedisUnavailableError) or not isinstance(exc, Exception):
            return  # nothing happened, already translated (an OSError too), or not an error
        import redis.exceptions as rx

        if isinstance(exc, (rx.ConnectionError, rx.TimeoutError, ConnectionError, TimeoutError, OSError)):
            raise RedisUnavailableError(f"Redis at {masked(self.url)} is unavailable: {exc}") from exc
        if isinstance(exc, rx.ResponseError):
            if str(exc).startswith("WRONGTYPE"):  # a key of ours holds another program's kind of value
                raise RedisDataError(f"Redis at {masked(self.url)} holds a key of the wrong type: {exc}") from exc
            raise RedisUnavailableError(f"Redis at {masked(self.url)} refused a command: {exc}") from exc


def call(url: str, fn: Callable[[], T]) -> T:
    with translated(url):
        return fn()
