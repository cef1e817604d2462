"""What a manager shares with the sessions it hands out: the client, its scripts, the
namespace and the clock."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._clock import ServerClock
from ._keys import SessionKeys
from ._scripts import Scripts


def encoded(text: str) -> bytes:
    """A str as Redis gets it: UTF-8, lone surrogates included (a Python str may hold
    them, and the in-process session takes any str)."""
    return text.encode("utf-8", "surrogatepass")


@dataclass
class Context:
    url: str
    namespace: str
    client: Any  # redis.Redis, or redis.asyncio.Redis for the asyncio twin (or their cluster clients)
    scripts: Scripts
    clock: Callable[[], float]
    # The clock when it is the server's (instants are then the server's Unix time).
    server_clock: ServerClock | None
    # On Redis Cluster: the client of the node that serves a key (a frame ring talks to
    # its session's node directly, on connections of its own, as it does to one server).
    node_client: Callable[[bytes], Any] | None = None

    def client_for(self, key: bytes) -> Any:
        return self.client if self.node_client is None else self.node_client(key)


@functools.lru_cache(maxsize=4096)
def key_names(namespace: str, session_id: str) -> SessionKeyNames:
    """The (immutable) key names of a session, remembered for the sessions in use."""
    return SessionKeyNames(namespace, session_id)


class SessionKeyNames:
    """The keys of one session, encoded, and the pub/sub channel of its pipeline ends."""

    __slots__ = ("keys", "session", "history", "dialog", "channel")

    def __init__(self, namespace: str, session_id: str) -> None:
        self.keys = SessionKeys(namespace, session_id)
        prefix = encoded(self.keys.prefix)
        self.session = prefix + b"session"
        self.history = prefix + b"history"
        self.dialog = prefix + b"dialog"
        self.channel = prefix + b"pipeline-finished"

    def all(self, ring_keys: list[str]) -> list[bytes]:
        """Every key of the session, the session hash first (for CREATE and CLAIM)."""
        return [self.session, self.history, self.dialog, *(encoded(k) for k in ring_keys)]
