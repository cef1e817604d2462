"""The default clock of a Redis-backed manager: the Redis server's, read locally.

Nodes whose own clocks disagree must still agree on how old a frame is and how long a
session has been idle, so every node reads the server's ``TIME`` once at start (the
sample with the shortest round trip of a few), keeps the offset to its own
``time.monotonic`` and adds it on every read: an instant costs no round trip. The
offset is measured again every ``REFRESH_SECONDS`` by the cleanup loop, and by a
manager's ``get`` and ``list`` (a node without eviction), so the local clock's drift
(parts per million) does not pile up. A new offset never makes the clock
go backwards: instants read on one node never decrease.

Instants are seconds since the Unix epoch on the server's clock, so ``to_dict()`` on
any node renders them as the server's wall time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import redis
    import redis.asyncio

SAMPLES = 3
REFRESH_SECONDS = 60.0


def offset_of(samples: Sequence[tuple[float, tuple[int, int], float]]) -> float:
    """The server's clock minus time.monotonic(), from (sent, TIME reply, received)
    triples: the one with the shortest round trip, taken at its midpoint."""
    sent, (secs, usecs), received = min(samples, key=lambda s: s[2] - s[0])
    return secs + usecs / 1e6 - (sent + received) / 2


class ServerClock:
    """A callable returning the server's time in float seconds (see the module docstring)."""

    def __init__(self, offset: float) -> None:
        self._offset = offset
        self._measured_at = time.monotonic()
        self._last = float("-inf")
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            now = time.monotonic() + self._offset
            if now < self._last:
                now = self._last
            self._last = now
            return now

    def due(self) -> bool:
        """True when the offset should be measured again."""
        return time.monotonic() - self._measured_at >= REFRESH_SECONDS

    def update(self, offset: float) -> None:
        with self._lock:
            self._offset = offset
            self._measured_at = time.monotonic()

    @property
    def offset(self) -> float:
        return self._offset


def _reply(raw: Any) -> tuple[int, int]:
    secs, usecs = raw  # redis-py's TIME reply: (seconds, microseconds)
    return int(secs), int(usecs)


def measure(client: redis.Redis) -> float:
    """The offset, measured with a sync client's ``time()``."""
    samples = []
    for _ in range(SAMPLES):
        sent = time.monotonic()
        reply = client.time()
        samples.append((sent, _reply(reply), time.monotonic()))
    return offset_of(samples)


async def measure_async(client: redis.asyncio.Redis) -> float:
    """The offset, measured with an asyncio client's ``time()``."""
    samples = []
    for _ in range(SAMPLES):
        sent = time.monotonic()
        reply = await client.time()
        samples.append((sent, _reply(reply), time.monotonic()))
    return offset_of(samples)
