"""The library's own shared-memory sessions as the W10-W12 target.

Written against the API that docs/bench.md's W10-W12 measure (the producer's
``SessionManager(max_concurrent=16, shared=namespace)``; a reader's
``capsule_sessions.attach(session_id, namespace=..., timeout=...)`` and its
``subscribe_visual_frames(buffer=..., policy="drop_oldest")``, ``latest_visual_frames``).
Where this installation has no ``capsule_sessions.attach`` the target is reported as
unavailable (not built), and without the compiled backend (whose shared memory it is) as
unavailable too; nothing here runs then. The library cleans up its own shared
memory: ``cleanup`` removes nothing, so that the /dev/shm check sees what it leaves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import capsule_sessions

from .._json import JsonObject
from .ipc_peers import Frame, Peer, Producer, Reader, SubscriptionReader, Wiring

ATTACH_TIMEOUT_S = 10.0
SESSION_ID = "cam-1"
UNAVAILABLE = "unavailable (not built)"


def _api() -> tuple[Any, Any]:
    """(SessionManager, attach), typed loosely: ``shared=`` and ``attach`` are the
    shared-memory API, which this module must import without."""
    module: Any = capsule_sessions
    return module.SessionManager, module.attach


class _Producer:
    def __init__(self, wiring: Wiring) -> None:
        manager_class, _ = _api()
        self.manager = manager_class(max_concurrent=16, shared=wiring["namespace"])
        self.session = self.manager.create(SESSION_ID)
        self.store = self.session.store_frame

    def publish(self, frame: Frame, seq: int) -> None:
        self.store(frame, source="camera", max_recent=2, frame_seq=seq)

    def counters(self) -> JsonObject:
        stats: JsonObject = dict(self.session.visual_stats())
        return {"accepted": stats.get("accepted"), "visual_stats": stats}

    def close(self) -> None:
        self.manager.close()


class _Reader(SubscriptionReader):
    def __init__(self, wiring: Wiring) -> None:
        _, attach = _api()
        self.attached = attach(SESSION_ID, namespace=wiring["namespace"], timeout=ATTACH_TIMEOUT_S)
        super().__init__(self.attached.subscribe_visual_frames(buffer=wiring["buffer"], policy="drop_oldest"))

    def close(self) -> None:
        super().close()
        self.attached.close()


class ShmPeer(Peer):
    name = "shm"
    description = ("capsule_sessions shared memory: SessionManager(shared=namespace).create() stores, each "
                   "reader attach()es and subscribe_visual_frames(buffer, policy='drop_oldest')")

    def unavailable(self) -> str | None:
        if not hasattr(capsule_sessions, "attach"):
            return UNAVAILABLE
        if "cython" not in capsule_sessions.available_backends():
            # The pure backend's shared= and attach() raise ImportError (no shared memory).
            return "unavailable (the compiled backend is not built)"
        return None

    def prepare(self, ctx: Any, size: int, readers: int, buffer: int, tag: str) -> Wiring:
        wiring = super().prepare(ctx, size, readers, buffer, tag)
        wiring["namespace"] = tag
        return wiring

    def producer(self, wiring: Wiring) -> Producer:
        return _Producer(wiring)

    def reader(self, wiring: Wiring, index: int) -> Reader:
        return _Reader(wiring)


# -- W12: latest_visual_frames from another process --------------------------------------

def latest_session_id(size: int) -> str:
    return f"latest-{size}"


class LatestProducer:
    """One shared session per frame size, each holding ``frames`` frames (max_recent=frames)."""

    def __init__(self, namespace: str, sizes: list[int], frames: int, make: Callable[[int, int], Frame]) -> None:
        manager_class, _ = _api()
        self.manager = manager_class(max_concurrent=16, shared=namespace)
        for size in sizes:
            session = self.manager.create(latest_session_id(size))
            for seq in range(frames):
                session.store_frame(make(size, seq), source="camera", max_recent=frames, frame_seq=seq)

    def close(self) -> None:
        self.manager.close()


def attach_latest(namespace: str, size: int) -> tuple[Any, Callable[[], Any]]:
    """(the attached session, a zero-argument latest_visual_frames(ttl=10))."""
    _, attach = _api()
    session = attach(latest_session_id(size), namespace=namespace, timeout=ATTACH_TIMEOUT_S)
    latest = session.latest_visual_frames

    def call() -> Any:
        return latest(10.0)

    return session, call
