"""The single-threaded workloads of docs/bench.md (W1..W7, W13), one definition for every target.

A target is a library backend (``"python"``, ``"cython"``: whatever
``capsule_sessions.available_backends()`` lists, driven through ``Session(backend=...)``),
the naive port (``"naive"``, ``naive.py``) or the physical limit (``"memcpy"``:
``np.copyto`` of the same bytes into a preallocated buffer). ``Workload.setup(target)``
builds a ``Case`` (``None`` where the workload has no figure for that target): ``op()`` does
one operation, ``run(n)`` does ``n`` in a tight loop (the CLI times that, so the loop
costs the same few ns for every target), ``close()`` releases what the case holds.

Every store goes through the hot path a camera loop uses,
``store_frame(data, source=..., max_recent=..., min_interval=..., now=t)``, with ``t`` a
fake clock advanced 1 ms per store; ``now`` is passed rather than read from an injected
clock so that no target pays for a Python clock callback. Payloads are random bytes in
numpy uint8 arrays. Workloads marked ``aux`` are not in the workload table: they are the extra
points the size-independence targets of W2 and W5 are judged by.

W13 takes a ``loan_frame``, writes an 8-byte tag through ``loan.array`` and commits it
with the same keywords: the frame's pixels are the caller's to write (a decoder's
output), so the figure is what the library adds per frame, against one memcpy of it.
The naive port has no loans: no figure.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

import capsule_sessions
from capsule_sessions import Session, Subscription

from .._json import JsonObject
from .naive import NaiveSession, NaiveSubscription

FRAME_1080P_RGB = 1920 * 1080 * 3
TICK = 0.001  # the fake clock's step per store, seconds

LIBRARY_ORDER = ("python", "cython")
REFERENCE_TARGETS = ("naive", "memcpy")


def backends() -> list[str]:
    """The library backends this installation runs, in a stable display order."""
    available = capsule_sessions.available_backends()
    return [name for name in LIBRARY_ORDER if name in available] + [
        name for name in available if name not in LIBRARY_ORDER
    ]


def targets() -> list[str]:
    return backends() + list(REFERENCE_TARGETS)


def is_backend(target: str) -> bool:
    return target not in REFERENCE_TARGETS


def make_session(target: str) -> Session | NaiveSession:
    """A fresh session of ``target`` (a backend or ``"naive"``)."""
    if target == "naive":
        return NaiveSession(clock=lambda: 0.0)
    return Session(f"bench-{target}", clock=lambda: 0.0, backend=target)


def payload(size: int, seed: int = 0) -> npt.NDArray[np.uint8]:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)


class FakeClock:
    """Seconds on a clock that only moves when a workload steps it."""

    __slots__ = ("t",)

    def __init__(self, t: float = 0.0) -> None:
        self.t = t


@dataclass
class Case:
    op: Callable[[], object]
    run: Callable[[int], None]
    close: Callable[[], None] = lambda: None
    # What the case keeps alive (sessions, subscriptions): a dropped subscription closes.
    keep: Sequence[object] = field(default_factory=list)


@dataclass(frozen=True)
class Workload:
    id: str
    description: str
    build: Callable[[str, JsonObject], Case | None]
    params: JsonObject
    aux: bool = False
    no_figure: tuple[str, ...] = ()  # targets that have nothing to run

    def applies_to(self, target: str) -> bool:
        # A rate-limited call copies nothing: W6 has no memcpy figure.
        if target in self.no_figure:
            return False
        return not (target == "memcpy" and self.params.get("min_interval", 0.0) > 0)

    def setup(self, target: str) -> Case | None:
        return self.build(target, self.params) if self.applies_to(target) else None


# -- builders ------------------------------------------------------------------------

def _copy_case(sources: list[npt.NDArray[np.uint8]]) -> Case:
    """The memcpy limit: copy each source array into its own preallocated buffer."""
    pairs = [(np.empty_like(src), src) for src in sources]
    copyto = np.copyto
    if len(pairs) == 1:
        (dst, src), = pairs

        def op() -> None:
            copyto(dst, src)

        def run(n: int) -> None:
            for _ in itertools.repeat(None, n):
                copyto(dst, src)
    else:
        def op() -> None:
            for dst, src in pairs:
                copyto(dst, src)

        def run(n: int) -> None:
            for _ in itertools.repeat(None, n):
                for dst, src in pairs:
                    copyto(dst, src)
    return Case(op, run, keep=pairs)


def _close_all(subs: Sequence[Subscription | NaiveSubscription]) -> Callable[[], None]:
    def close() -> None:
        for sub in subs:
            sub.close()
    return close


def build_store(target: str, p: JsonObject) -> Case | None:
    data = payload(p["size"])
    if target == "memcpy":
        return _copy_case([data])
    session = make_session(target)
    subs = [session.subscribe_visual_frames(p["buffer"]) for _ in range(p["subscribers"])]
    store = session.store_frame
    clock = FakeClock()
    keep, min_interval = p["max_recent"], p["min_interval"]
    sources = itertools.cycle(p["sources"])

    def op() -> bool:
        clock.t = t = clock.t + TICK
        return store(data, source=next(sources), max_recent=keep, min_interval=min_interval, now=t)

    def run(n: int) -> None:
        t = clock.t
        for source in itertools.islice(sources, n):
            t += TICK
            store(data, source=source, max_recent=keep, min_interval=min_interval, now=t)
        clock.t = t

    return Case(op, run, _close_all(subs), keep=[session, subs])


def build_latest(target: str, p: JsonObject) -> Case | None:
    frames = [payload(p["size"], seed) for seed in range(p["frames"])]
    if target == "memcpy":
        # What the Go original does per read: copy every frame it returns.
        return _copy_case(frames)
    session = make_session(target)
    now = 0.0
    for data in frames:
        now += TICK
        session.store_frame(data, source="camera", max_recent=p["frames"], min_interval=0.0, now=now)
    latest = session.latest_visual_frames
    ttl = p["ttl"]
    if len(latest(ttl, now=now)) != p["frames"]:
        raise AssertionError(f"{target}: the ring does not hold the {p['frames']} frames W5 reads")

    def op() -> object:
        return latest(ttl, now=now)

    def run(n: int) -> None:
        for _ in itertools.repeat(None, n):
            latest(ttl, now=now)

    return Case(op, run, keep=[session])


def build_loan_commit(target: str, p: JsonObject) -> Case | None:
    if target == "memcpy":
        return _copy_case([payload(p["size"])])
    session = make_session(target)
    if not isinstance(session, Session):
        return None
    lend = session.loan_frame
    clock = FakeClock()
    size, keep = p["size"], p["max_recent"]
    tag = np.arange(8, dtype=np.uint8)

    def op() -> bool:
        clock.t = t = clock.t + TICK
        loan = lend(size)
        loan.array[:8] = tag
        return loan.commit(source="camera", max_recent=keep, now=t)

    def run(n: int) -> None:
        t = clock.t
        for _ in itertools.repeat(None, n):
            t += TICK
            loan = lend(size)
            loan.array[:8] = tag
            loan.commit(source="camera", max_recent=keep, now=t)
        clock.t = t

    return Case(op, run, keep=[session, []])


def _store(size: int, subscribers: int = 0, buffer: int = 1, max_recent: int = 2,
           min_interval: float = 0.0, sources: tuple[str, ...] = ("camera",)) -> JsonObject:
    return {"size": size, "subscribers": subscribers, "buffer": buffer, "max_recent": max_recent,
            "min_interval": min_interval, "sources": sources}


TIMED = [
    Workload("W1_store_4k_0sub", "store a 4,096-byte frame, max_recent=2, no subscribers",
             build_store, _store(4096)),
    Workload("W2_store_64k_4sub", "store a 65,536-byte frame, max_recent=2, 4 subscribers (buffer=8) never drained",
             build_store, _store(65536, subscribers=4, buffer=8)),
    Workload("W3_store_6m_0sub", "store a 6,220,800-byte frame (1920x1080 RGB), max_recent=2, no subscribers",
             build_store, _store(FRAME_1080P_RGB)),
    Workload("W4_store_6m_4sub", "as W3 with 4 subscribers (buffer=2) never drained",
             build_store, _store(FRAME_1080P_RGB, subscribers=4, buffer=2)),
    Workload("W5_latest_8x64k", "latest_visual_frames(ttl=10) over a ring of 8 frames of 65,536 bytes",
             build_latest, {"size": 65536, "frames": 8, "ttl": 10.0}),
    Workload("W6_rate_limited_reject",
             "min_interval=0.033, clock +1 ms per call, 4,096-byte frame (most calls rejected)",
             build_store, _store(4096, min_interval=0.033)),
    Workload("W7_source_switch", "source alternates camera/screen on every store, 4,096-byte frame, max_recent=2",
             build_store, _store(4096, sources=("camera", "screen"))),
    Workload("W13_loan_commit_6m",
             "loan_frame, an 8-byte write through loan.array, and commit of a 6,220,800-byte frame (1920x1080 "
             "RGB), max_recent=2, no subscribers: the library's cost per commit",
             build_loan_commit, {"size": FRAME_1080P_RGB, "max_recent": 2}, no_figure=("naive",)),
    # Size-independence points for the W2 and W5 targets (not in the workload table).
    Workload("W2_aux_store_4k_4sub", "W2 with 4,096-byte frames (per-subscriber cost at 4 KiB)",
             build_store, _store(4096, subscribers=4, buffer=8), aux=True),
    Workload("W2_aux_store_64k_0sub", "W2 without subscribers (per-subscriber cost at 64 KiB)",
             build_store, _store(65536), aux=True),
    Workload("W5_aux_latest_8x4k", "W5 with 4,096-byte frames (read cost independent of frame size)",
             build_latest, {"size": 4096, "frames": 8, "ttl": 10.0}, aux=True),
]
BY_ID = {w.id: w for w in TIMED}
