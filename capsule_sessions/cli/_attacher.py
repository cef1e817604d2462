"""The engine behind ``attach``: this process as a reader of another one's sessions.

It waits for sessions to appear in a store (``_attach_stores``: shared memory, listed by
``list_shared(namespace)``, or Redis, listed by a ``RedisSessionManager``'s ``list()``),
attaches to each (and to ones that appear later, asked every ``poll`` seconds),
subscribes once per session, and receives on one thread per session until the session
ends (``SubscriptionClosed``: its owner deleted it or, in shared memory, died),
``seconds`` have passed since the first attach, or the run is interrupted. Then each
subscription is closed and drained, so at the end its ``delivered`` is exactly the
frames this process received.

Per frame it measures the store-to-receive latency, the store's clock at receipt minus
the frame's ``received_at`` (the producer's reading of the same clock at the store:
``time.monotonic()``, one clock for every process of a Linux machine, or the Redis
server's), and checks the bytes (``frame_problem``).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .. import Subscription, SubscriptionClosed, VisualFrame
from ._attach_stores import Gone, Store, Unusable
from ._consumers import stamp_matches
from ._latency import LatencyHistogram

RAW_MIME = "video/x-raw-rgb"
JPEG_MIME = "image/jpeg"
# The command line's synthetic sources (demo, ingest synthetic:...) store frames under
# this source label and stamp each with its frame_seq (_sources.SyntheticSource).
STAMPED_SOURCE_PREFIX = "synthetic:"


def frame_problem(frame: VisualFrame) -> tuple[bool, str]:
    """(whether the frame carried a stamp that was checked, what is wrong with its bytes
    or ""). Raw RGB must be width x height x 3 bytes and a synthetic frame's first 8
    bytes its frame_seq (little-endian); a JPEG must start with its SOI marker."""
    data = frame.data
    size = memoryview(data).nbytes
    what = f"frame {frame.frame_seq}"
    if frame.mime_type == RAW_MIME:
        if frame.width > 0 and frame.height > 0 and size != frame.width * frame.height * 3:
            return False, f"{what}: {size} bytes, not {frame.width}x{frame.height}x3"
        if frame.source.startswith(STAMPED_SOURCE_PREFIX) and size >= 8:
            if not stamp_matches(frame):
                stamp = int.from_bytes(bytes(data[:8]), "little")
                return True, f"{what}: its first 8 bytes say frame {stamp}"
            return True, ""
    elif frame.mime_type == JPEG_MIME and bytes(data[:2]) != b"\xff\xd8":
        return False, f"{what}: not a JPEG (no start-of-image marker)"
    return False, ""


@dataclass
class AttachOptions:
    # The shared-memory namespace, or with ``redis`` the Redis one.
    namespace: str
    # Set: the sessions are in Redis at this URL (its password masked).
    redis: str | None = None
    # From the first attach; None: until every session ended.
    seconds: float | None = None
    # How long to wait for the first session to appear.
    wait: float = 5.0
    buffer: int = 16
    policy: str = "drop_oldest"
    # Seconds of simulated work per frame (a model's), so a slow reader's drops show.
    work: float = 0.0
    poll: float = 0.2  # how often the store is asked for sessions that appeared since
    refresh: float = 0.25
    # The store's clock, the one frames are stamped with (Store.clock).
    clock: Callable[[], float] = time.monotonic


class SessionReader:
    """One attached session: its read-side handle, one subscription, and a thread that
    receives its frames, measures them and checks them."""

    def __init__(self, session_id: str, handle: Any, subscription: Subscription, store: Store,
                 options: AttachOptions, stop: threading.Event, notify: Callable[[SessionReader], None]) -> None:
        self.id = session_id
        self.handle = handle
        self.store = store
        self.options = options
        self.clock = options.clock
        self._stop = stop
        self._notify = notify
        self.stop_reason = "stopped"  # the status when _stop ends it (the Attacher sets it)
        self.subscription = subscription
        self.owner_pid = store.owner_pid(handle)  # None: the session belongs to no process (Redis)
        self.latency = LatencyHistogram()
        self.received = 0
        self.bytes = 0
        self.stamped = 0
        self.integrity_errors = 0
        self.first_integrity_error = ""
        self.source = ""
        self.mime_type = ""
        self.width = 0
        self.height = 0
        self.status = "receiving"
        self.message = ""
        self.error: BaseException | None = None
        self.ring: dict[str, int] = {}
        self.shared: dict[str, int] = {}
        self.started_at = self.clock()
        self.ended_at: float | None = None
        self.first_at: float | None = None  # receipt of the first frame
        self.last_at: float | None = None
        self.timeline: list[tuple[float, int]] = []
        self.thread = threading.Thread(target=self._run, name=f"attach-{session_id}", daemon=True)

    # -- receiving ------------------------------------------------------------------
    def on_frame(self, frame: VisualFrame, now: float) -> None:
        self.latency.record(now - frame.received_at)
        if self.first_at is None:
            self.first_at = now
        self.last_at = now
        self.received += 1
        self.bytes += memoryview(frame.data).nbytes
        if not self.source:
            self.source, self.mime_type = frame.source, frame.mime_type
        self.width, self.height = frame.width, frame.height
        stamped, problem = frame_problem(frame)
        self.stamped += stamped
        if problem:
            self.integrity_errors += 1
            if not self.first_integrity_error:
                self.first_integrity_error = problem

    def _run(self) -> None:
        sub, clock, stop = self.subscription, self.clock, self._stop
        get, wait, work = sub.get, self.options.refresh, self.options.work
        try:
            ended = False
            while not stop.is_set():
                try:
                    frame = get(timeout=wait)
                except queue.Empty:
                    continue
                except SubscriptionClosed:
                    ended = True
                    break
                self.on_frame(frame, clock())
                del frame  # its lease ends with the last reference
                if work:
                    stop.wait(work)
            if ended:
                self.status = "ended"
            else:
                self.status = self.stop_reason
                sub.close()
                for frame in sub:  # what was queued before the close; then it ends
                    self.on_frame(frame, clock())
                    del frame
        except BaseException as exc:  # one broken session must not stop the others
            self.error = exc
            self.status = "failed"
            self.message = f"{type(exc).__name__}: {exc}"
        finally:
            self.ended_at = clock()
            self._read_stats()
            self._notify(self)

    def _read_stats(self) -> None:
        try:
            self.ring, self.shared = self.store.stats(self.handle)
        except Exception:  # a segment gone bad, or Redis gone, at the very end: the summary goes without
            pass

    # -- reading the state ------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        sub = self.subscription
        return {"delivered": int(sub.delivered), "dropped": int(sub.dropped), "queued": int(sub.qsize())}

    @property
    def done(self) -> bool:
        return self.ended_at is not None

    def rate(self, amount: float) -> float:
        """``amount`` per second while frames came: from the first frame's receipt to the
        last's, counting the frames after the first (0 before there are two)."""
        if self.first_at is None or self.last_at is None or self.last_at <= self.first_at or self.received < 2:
            return 0.0
        return amount * (self.received - 1) / self.received / (self.last_at - self.first_at)

    @property
    def active_seconds(self) -> float:
        end = self.ended_at if self.ended_at is not None else self.clock()
        return max(0.0, end - self.started_at)

    def recent_fps(self, window: float = 1.0) -> float:
        points = self.timeline
        if len(points) < 2:
            return 0.0
        t1, n1 = points[-1]
        t0, n0 = next(((t, n) for t, n in reversed(points) if t1 - t >= window), points[0])
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

    def start(self) -> None:
        self.thread.start()

    def join(self) -> None:
        self.thread.join()

    def close(self) -> None:
        self.store.release(self.handle)


@dataclass
class AttachResult:
    namespace: str
    readers: list[SessionReader]
    missed: list[str] = field(default_factory=list)  # listed, but gone before the attach
    failed: dict[str, str] = field(default_factory=dict)  # could not attach or subscribe: why
    seconds: float = 0.0
    waited: float = 0.0
    interrupted: bool = False
    options: AttachOptions | None = None
    where: str = ""  # "namespace NS", or "Redis at URL, namespace NS"
    list_error: str = ""  # why the last listing of the store failed, if it did


class Attacher:
    """Find, attach, receive, and let go. ``execute()`` does all of it; the store is the
    caller's to close."""

    def __init__(self, options: AttachOptions, store: Store,
                 on_message: Callable[[str], None] = lambda text: None) -> None:
        self.options = options
        self.store = store
        self.namespace = options.namespace
        self.where = store.where
        self.on_message = on_message
        self.readers: list[SessionReader] = []
        self.missed: list[str] = []
        self.failed: dict[str, str] = {}
        self.list_error = ""
        self._seen: set[object] = set()
        self._stop = threading.Event()
        self._changed = threading.Event()
        self.created_at = options.clock()
        self.started_at: float | None = None  # the first attach
        self.interrupted = False

    def elapsed(self) -> float:
        return self.options.clock() - (self.started_at if self.started_at is not None else self.created_at)

    def _reader_done(self, reader: SessionReader) -> None:
        if reader.status == "failed":
            self.on_message(f"{reader.id}: {reader.message}")
        self._changed.set()

    def discover(self) -> int:
        """Attach to the sessions listed that are new; returns how many it attached."""
        try:
            listed = self.store.listed()
        except Unusable as exc:  # said once per run of failures; the readers carry on
            if not self.list_error:
                self.on_message(str(exc))
            self.list_error = str(exc)
            return 0
        self.list_error = ""
        attached = 0
        for key, session_id in listed:
            if key in self._seen:
                continue
            self._seen.add(key)
            reader = self._attach(key, session_id)
            if reader is None:
                continue
            if self.started_at is None:
                self.started_at = reader.started_at
            self.readers.append(reader)
            reader.start()
            attached += 1
        return attached

    def _attach(self, key: object, session_id: str) -> SessionReader | None:
        store = self.store
        handle = None
        try:
            handle = store.open(key, session_id)
            sub = store.subscribe(handle, self.options.buffer, self.options.policy)
        except Gone:
            self.missed.append(session_id)
        except Unusable as exc:
            self.failed[session_id] = str(exc)
            self.on_message(f"{session_id}: {exc}")
        else:
            return SessionReader(session_id, handle, sub, store, self.options, self._stop, self._reader_done)
        if handle is not None:
            store.release(handle)
        return None

    def wait_for_sessions(self) -> bool:
        """Attach to what is there, waiting up to ``wait`` for the first session."""
        clock = self.options.clock
        deadline = clock() + self.options.wait
        while True:
            self.discover()
            if self.readers or self.failed:
                return bool(self.readers)
            left = deadline - clock()
            if left <= 0:
                return False
            time.sleep(min(self.options.poll / 4, left))

    def tick(self) -> None:
        t = self.elapsed()
        for reader in self.readers:
            reader.timeline.append((t, reader.received))

    def running(self) -> bool:
        return any(not reader.done for reader in self.readers)

    def _receive(self, on_tick: Callable[[Attacher], None]) -> None:
        options, clock = self.options, self.options.clock
        assert self.started_at is not None
        deadline = None if options.seconds is None else self.started_at + options.seconds
        next_poll = clock() + options.poll
        while True:
            timeout = options.refresh if deadline is None else max(0.0, min(options.refresh, deadline - clock()))
            self._changed.wait(timeout)
            self._changed.clear()
            if clock() >= next_poll:
                self.discover()
                next_poll = clock() + options.poll
            self.tick()
            on_tick(self)
            if deadline is not None and clock() >= deadline:
                return
            if not self.running() and not self.discover():
                return  # every session ended, and none appeared since

    def _stop_readers(self, reason: str) -> None:
        for reader in self.readers:
            reader.stop_reason = reason
        self._stop.set()

    def finish(self) -> AttachResult:
        self._stop_readers("interrupted" if self.interrupted else "stopped")
        for reader in self.readers:
            reader.join()
        self.tick()
        for reader in self.readers:
            reader.close()
        waited = (self.started_at if self.started_at is not None else self.options.clock()) - self.created_at
        seconds = self.elapsed() if self.started_at is not None else 0.0
        return AttachResult(self.namespace, self.readers, self.missed, self.failed, seconds, waited,
                            self.interrupted, self.options, self.where, self.list_error)

    def execute(self, on_tick: Callable[[Attacher], None] = lambda attacher: None) -> AttachResult:
        try:
            if self.wait_for_sessions():
                self._receive(on_tick)
        except KeyboardInterrupt:
            self.interrupted = True
        finally:
            result = self.finish()
        return result
