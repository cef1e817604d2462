"""The transports W10-W12 compare (docs/bench.md, "Peers across processes"), behind one
small interface, so that one producer loop and one reader loop (``ipc.py``) drive them all.

A peer is set up in three places. ``prepare`` runs in the benchmark's own process and
makes what the children share (queues, shared-memory segments, names): it returns the
*wiring*, a picklable dict handed to every child. ``producer`` and ``reader`` run in the
spawned children and open their end of the wiring. ``cleanup`` runs in the benchmark's
process once every child has been joined (or killed), and removes whatever ``prepare``
made, so that nothing is left in /dev/shm whatever happened to the children.

A reader's ``receive(timeout)`` returns the next frame as a 1-D ``uint8`` numpy array that
the reader can use as it stands (no copy beyond what the transport itself makes), with
the sequence number the transport says it carries (-1 where it carries none), or
``None`` after ``timeout`` seconds without one; ``release()`` gives back the frame
received last (a loaned sample, a frame the library leases).

This module holds the peers built on the standard library and ``faster_fifo``;
``ipc_iceoryx2.py`` and ``ipc_shm.py`` (the library's own shared memory) hold the rest.
"""

from __future__ import annotations

import contextlib
import importlib
import queue
import threading
from multiprocessing import shared_memory
from multiprocessing.context import SpawnContext
from typing import Any, Protocol, TypeAlias

import numpy as np
import numpy.typing as npt

from .._json import JsonObject

Frame: TypeAlias = npt.NDArray[np.uint8]
# What every child gets: made by Peer.prepare in the benchmark's process, pickled to the
# children by multiprocessing (queues and names; never a frame).
Wiring: TypeAlias = dict[str, Any]


class Producer(Protocol):
    def publish(self, frame: Frame, seq: int) -> None: ...
    def counters(self) -> JsonObject: ...
    def close(self) -> None: ...


class Reader(Protocol):
    def receive(self, timeout: float) -> tuple[Frame, int] | None: ...
    def release(self) -> None: ...
    def counters(self) -> JsonObject | None: ...
    def close(self) -> None: ...


class Peer:
    """One contender of W10/W11 (and W12 where it has ``latest_visual_frames``)."""

    name = ""
    description = ""
    # The in-process subscription runs its producer and readers as threads of one child.
    single_process = False
    # The modules it needs beyond numpy, and the extra that brings them.
    modules: tuple[str, ...] = ()

    def unavailable(self) -> str | None:
        """Why this peer cannot run here, or None."""
        for module in self.modules:
            try:
                importlib.import_module(module)
            except ImportError:
                return f"unavailable ({module} is not installed: pip install 'capsule_sessions[bench]')"
        return None

    def prepare(self, ctx: SpawnContext, size: int, readers: int, buffer: int, tag: str) -> Wiring:
        return {"size": size, "readers": readers, "buffer": buffer, "tag": tag}

    def producer(self, wiring: Wiring) -> Producer:
        raise NotImplementedError

    def reader(self, wiring: Wiring, index: int) -> Reader:
        raise NotImplementedError

    def cleanup(self, wiring: Wiring) -> list[str]:
        """Remove what ``prepare`` made; the /dev/shm names this had to remove itself."""
        return []


# -- multiprocessing.Queue: a pickled copy of the frame's bytes per reader ---------------

class _QueueProducer:
    """Puts the frame's bytes into each reader's bounded queue; a full queue drops the
    frame for that reader (``put_nowait``), and the producer counts it."""

    def __init__(self, queues: list[Any]) -> None:
        self.queues = queues
        self.dropped = [0] * len(queues)

    def publish(self, frame: Frame, seq: int) -> None:
        message = frame.tobytes()  # the frame as the bytes a user would send
        for i, q in enumerate(self.queues):
            try:
                q.put_nowait(message)
            except queue.Full:
                self.dropped[i] += 1

    def counters(self) -> JsonObject:
        return {"dropped": self.dropped}

    def close(self) -> None:
        for q in self.queues:
            cancel = getattr(q, "cancel_join_thread", None)
            if cancel is not None:
                cancel()  # a reader that is gone must not keep the producer from exiting


class _QueueReader:
    def __init__(self, q: Any) -> None:
        self.q = q

    def receive(self, timeout: float) -> tuple[Frame, int] | None:
        try:
            message = self.q.get(timeout=timeout)
        except queue.Empty:
            return None
        return np.frombuffer(message, dtype=np.uint8), -1  # a view of the unpickled bytes

    def release(self) -> None:
        pass

    def counters(self) -> JsonObject | None:
        return None

    def close(self) -> None:
        pass


class MpQueuePeer(Peer):
    name = "mp_queue"
    description = "multiprocessing.Queue(maxsize=buffer) per reader, pickled bytes, put_nowait drops"

    def prepare(self, ctx: SpawnContext, size: int, readers: int, buffer: int, tag: str) -> Wiring:
        wiring = super().prepare(ctx, size, readers, buffer, tag)
        wiring["queues"] = [ctx.Queue(maxsize=buffer) for _ in range(readers)]
        return wiring

    def producer(self, wiring: Wiring) -> Producer:
        return _QueueProducer(wiring["queues"])

    def reader(self, wiring: Wiring, index: int) -> Reader:
        return _QueueReader(wiring["queues"][index])

    def cleanup(self, wiring: Wiring) -> list[str]:
        for q in wiring["queues"]:
            q.close()
            q.cancel_join_thread()
        return []


class FasterFifoPeer(Peer):
    name = "faster_fifo"
    description = "faster_fifo.Queue per reader sized for buffer frames, pickled bytes, put_nowait drops"
    modules = ("faster_fifo",)

    def prepare(self, ctx: SpawnContext, size: int, readers: int, buffer: int, tag: str) -> Wiring:
        import faster_fifo

        wiring = super().prepare(ctx, size, readers, buffer, tag)
        # Room for `buffer` pickled frames (the pickle and faster_fifo's length prefix add
        # a few dozen bytes each), and at most `buffer` messages.
        wiring["queues"] = [faster_fifo.Queue(max_size_bytes=buffer * (size + 256), maxsize=buffer)
                            for _ in range(readers)]
        return wiring

    def producer(self, wiring: Wiring) -> Producer:
        return _QueueProducer(wiring["queues"])

    def reader(self, wiring: Wiring, index: int) -> Reader:
        return _QueueReader(wiring["queues"][index])

    def cleanup(self, wiring: Wiring) -> list[str]:
        for q in wiring["queues"]:
            q.close()
        return []


# -- The Frigate NVR pattern: shared_memory slots + an index queue per reader -------------

FRIGATE_SLOTS = 10  # shared-memory frames the producer writes in turn


def _slot_views(segments: list[shared_memory.SharedMemory], size: int) -> list[Frame]:
    return [np.ndarray((size,), dtype=np.uint8, buffer=seg.buf) for seg in segments]


def _attach(names: list[str]) -> list[shared_memory.SharedMemory]:
    # Spawned children share the benchmark process's resource tracker, which only
    # unlinks what is still registered when it exits; cleanup() unlinks them first.
    return [shared_memory.SharedMemory(name=name) for name in names]


class _FrigateProducer:
    """Copies each frame into the next of a fixed ring of shared-memory slots, then puts
    (slot, seq) into every reader's index queue (a full queue drops the frame for that
    reader, counted). The producer never waits for a reader, and nothing stops it from
    overwriting a slot that a slow reader was told about: the pattern's torn frames."""

    def __init__(self, wiring: Wiring) -> None:
        self.segments = _attach(wiring["slots"])
        self.views = _slot_views(self.segments, wiring["size"])
        self.queues = wiring["queues"]
        self.dropped = [0] * len(self.queues)

    def publish(self, frame: Frame, seq: int) -> None:
        slot = seq % len(self.views)
        np.copyto(self.views[slot], frame)
        for i, q in enumerate(self.queues):
            try:
                q.put_nowait((slot, seq))
            except queue.Full:
                self.dropped[i] += 1

    def counters(self) -> JsonObject:
        return {"dropped": self.dropped}

    def close(self) -> None:
        for q in self.queues:
            q.cancel_join_thread()
        self.views = []
        for seg in self.segments:
            seg.close()


class _FrigateReader:
    """Reads the slot it is told about in place: the array is a view of the shared memory."""

    def __init__(self, wiring: Wiring, index: int) -> None:
        self.segments = _attach(wiring["slots"])
        self.views = _slot_views(self.segments, wiring["size"])
        self.q = wiring["queues"][index]

    def receive(self, timeout: float) -> tuple[Frame, int] | None:
        try:
            slot, seq = self.q.get(timeout=timeout)
        except queue.Empty:
            return None
        return self.views[slot], seq

    def release(self) -> None:
        pass

    def counters(self) -> JsonObject | None:
        return None

    def close(self) -> None:
        self.views = []
        for seg in self.segments:
            seg.close()


class FrigatePeer(Peer):
    name = "frigate"
    description = (f"multiprocessing.shared_memory ring of {FRIGATE_SLOTS} frame slots + a multiprocessing.Queue"
                   "(maxsize=buffer) of slot numbers per reader; readers copy nothing")

    def prepare(self, ctx: SpawnContext, size: int, readers: int, buffer: int, tag: str) -> Wiring:
        wiring = super().prepare(ctx, size, readers, buffer, tag)
        segments = []
        try:
            for i in range(FRIGATE_SLOTS):
                segments.append(shared_memory.SharedMemory(name=f"{tag}_frigate_{i}", create=True, size=size))
        except BaseException:
            for seg in segments:
                seg.close()
                seg.unlink()
            raise
        for seg in segments:
            seg.close()  # the children map them; this process only unlinks them in cleanup
        wiring["slots"] = [seg.name for seg in segments]
        wiring["queues"] = [ctx.Queue(maxsize=buffer) for _ in range(readers)]
        return wiring

    def producer(self, wiring: Wiring) -> Producer:
        return _FrigateProducer(wiring)

    def reader(self, wiring: Wiring, index: int) -> Reader:
        return _FrigateReader(wiring, index)

    def cleanup(self, wiring: Wiring) -> list[str]:
        for q in wiring["queues"]:
            q.close()
            q.cancel_join_thread()
        for name in wiring["slots"]:
            with contextlib.suppress(FileNotFoundError):
                seg = shared_memory.SharedMemory(name=name)
                seg.close()
                seg.unlink()
        return []


# -- The in-process subscription: one process, the readers are threads -----------------

class _SessionProducer:
    def __init__(self, session: Any) -> None:
        self.session = session
        self.store = session.store_frame

    def publish(self, frame: Frame, seq: int) -> None:
        self.store(frame, source="camera", max_recent=2, frame_seq=seq)

    def counters(self) -> JsonObject:
        stats: dict[str, int] = self.session.visual_stats()
        return {"accepted": stats.get("accepted")}

    def close(self) -> None:
        pass


class SubscriptionReader:
    """A library subscription (in-process, or attached from another process: ipc_shm.py)."""

    def __init__(self, sub: Any) -> None:
        self.sub = sub
        self.frame: Any = None
        self.closed = False
        from capsule_sessions import SubscriptionClosed

        self._closed_error = SubscriptionClosed

    def receive(self, timeout: float) -> tuple[Frame, int] | None:
        if self.closed:
            return None
        try:
            self.frame = frame = self.sub.get(timeout=timeout)
        except queue.Empty:
            return None
        except self._closed_error:
            self.closed = True
            return None
        return frame.data, frame.frame_seq

    def release(self) -> None:
        self.frame = None

    def counters(self) -> JsonObject | None:
        return {"delivered": int(self.sub.delivered), "dropped": int(self.sub.dropped)}

    def close(self) -> None:
        self.frame = None
        self.sub.close()


class InProcessPeer(Peer):
    name = "in_process"
    description = ("the library's in-process subscription: Session.subscribe_visual_frames(buffer, "
                   "policy='drop_oldest'), each reader a thread of the producer's process")
    single_process = True

    def producer(self, wiring: Wiring) -> Producer:
        from capsule_sessions import Session

        session = Session("bench-in-process")
        wiring["session"] = session  # the reader threads subscribe to it (same process)
        return _SessionProducer(session)

    def reader(self, wiring: Wiring, index: int) -> Reader:
        return SubscriptionReader(wiring["session"].subscribe_visual_frames(wiring["buffer"], policy="drop_oldest"))


def run_threads(targets: list[Any]) -> list[threading.Thread]:
    """Start one daemon thread per zero-argument callable."""
    threads = [threading.Thread(target=t, daemon=True, name=f"ipc-reader-{i}") for i, t in enumerate(targets)]
    for thread in threads:
        thread.start()
    return threads
