"""The one runner behind ``demo`` and ``ingest``: sources into sessions, consumers out.

Each source gets its own session of one ``SessionManager``, a producer thread that
stores its frames, and the subscribers of ``RunOptions.subscribers``. Every
subscription exists before the first frame is stored and is closed (then drained) after
the last one, so for each subscriber ``delivered + dropped + queued == accepted``.

Shutdown order: producers end (their source ended, failed, hit ``seconds``, or the run
was interrupted); the samplers stop; the sessions are deleted from the manager, which
closes their subscriptions, so the consumers drain what is queued and finish.

With ``RunOptions.redis`` the manager is a ``RedisSessionManager``: the sessions live in
Redis, where other processes read them, and the run's one clock is the one the frames
are stamped with there (the Redis server's).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import MaxSessionsError, Session, SessionExistsError, SessionManager, VisualFrame, VisualInputConfig
from . import _redis
from ._consumers import AsyncConsumer, AsyncLoop, Consumer, ThreadConsumer, VisionSampler, plan
from ._errors import SourceError, StoreError, UsageError
from ._extras import MissingExtra, require
from ._sources import Source
from ._streamtime import StoreTimes, StreamClock

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    # A producer's store of one decoded RGB frame (rgb, frame_seq, stream time, now):
    # (accepted, bytes stored).
    Store = Callable[[npt.NDArray[np.uint8], int, float, float | None], tuple[bool, int]]

RAW_MIME = "video/x-raw-rgb"
JPEG_MIME = "image/jpeg"


@dataclass
class RunOptions:
    backend: str | None = None
    subscribers: Sequence[str] = ("fast", "slow", "async")
    max_recent: int = 2
    min_interval: float = 0.0
    # False: sources other than cameras are read flat out, on video time (_streamtime).
    realtime: bool = True
    # A wall-clock limit for every source; live sources (cameras) without it run for
    # live_seconds.
    seconds: float | None = None
    live_seconds: float = 10.0
    # Set: frames go through ingest_visual_frame(frame, config) (its max_recent_frames
    # and frame_interval win over max_recent/min_interval). None: the store_frame hot path.
    config: VisualInputConfig | None = None
    jpeg_quality: int | None = None
    buffer: int = 16
    slow_work: float = 0.05
    ttl: float = 10.0
    sampler_interval: float = 1.0
    refresh: float = 0.25
    session_prefix: str = "s"
    # Set: every session's frame ring is in shared memory under this namespace, for
    # other processes to attach to (compiled backend only).
    shared: str | None = None
    # Set: the sessions live in Redis at this URL, under redis_namespace (and clock is
    # replaced by the one their frames are stamped with, the Redis server's).
    redis: str | None = None
    redis_namespace: str = _redis.DEFAULT_NAMESPACE
    clock: Callable[[], float] = time.monotonic


class Producer:
    """Reads one source on its own thread and stores every frame into one session."""

    def __init__(self, session: Session, source: Source, options: RunOptions, stop: threading.Event,
                 notify: Callable[[Producer], None], stream_clock: StreamClock | None = None) -> None:
        self.session = session
        self.source = source
        self.options = options
        # Set: the session runs on video time (see _streamtime), and the wall-clock
        # instant of each store is kept for the consumers' latency.
        self.stream_clock = stream_clock
        self.store_times = StoreTimes() if stream_clock is not None else None
        self._stop = stop
        self._notify = notify
        self._store_errors = _redis.store_errors(options.redis)
        # What fails this source with a message of one line, not "unexpected ...".
        self._known_failures: tuple[type[BaseException], ...] = (SourceError, MissingExtra, *self._store_errors)
        self.offered = 0
        self.accepted = 0
        self.rate_limited = 0
        self.rejected = 0
        self.store_failed = 0  # stores the session store (--redis) failed: the source stops there
        self.bytes = 0
        self.status = "starting"
        self.message = ""
        self.first_reject = ""
        self.first_reject_reason = ""
        self.all_rejected = False
        self.started_at: float | None = None
        self.ended_at: float | None = None
        self.first_accepted_at: float | None = None  # wall clock, after its store returned
        self.failed = False
        self.thread = threading.Thread(target=self._run, name=f"producer-{session.id}", daemon=True)

    # -- the store strategies ---------------------------------------------------
    def _store_function(self) -> Store:
        options, session, label = self.options, self.session, self.source.label
        config = options.config
        wall = options.clock
        mark = self.store_times.put if self.store_times is not None else None
        encode = None
        if options.jpeg_quality is not None:
            simplejpeg = require("simplejpeg", "--jpeg")
            quality = options.jpeg_quality

            def encode(rgb: npt.NDArray[np.uint8]) -> bytes:
                jpeg: bytes = simplejpeg.encode_jpeg(rgb, quality=quality, colorspace="RGB")
                return jpeg

        mime = RAW_MIME if encode is None else JPEG_MIME
        if config is None and encode is None:
            store_frame = session.store_frame
            max_recent, min_interval = options.max_recent, options.min_interval

            def store(rgb: npt.NDArray[np.uint8], seq: int, t: float, now: float | None) -> tuple[bool, int]:
                height, width = rgb.shape[:2]
                if mark is not None:
                    mark(seq, wall())
                ok = store_frame(rgb, source=label, max_recent=max_recent, min_interval=min_interval,
                                 mime_type=mime, width=width, height=height,
                                 timestamp_ms=int(t * 1000), frame_seq=seq, now=now)
                return ok, rgb.nbytes

            return store

        def store_checked(rgb: npt.NDArray[np.uint8], seq: int, t: float, now: float | None) -> tuple[bool, int]:
            height, width = rgb.shape[:2]
            data = rgb if encode is None else encode(rgb)
            frame = VisualFrame(data, mime, width, height, label, int(t * 1000), seq)
            if mark is not None:
                mark(seq, wall())
            if config is None:
                ok = session.store_visual_frame(frame, options.max_recent, options.min_interval, now)
            else:
                ok = session.ingest_visual_frame(frame, config, now)
            return ok, (rgb.nbytes if encode is None else len(data))

        return store_checked

    # -- the loop -------------------------------------------------------------
    def _run(self) -> None:
        source, options, clock = self.source, self.options, self.options.clock
        try:
            config = options.config
            source.open(config.max_width if config else None, config.max_height if config else None)
            store = self._store_function()
            self.status = "running"
            self.started_at = t0 = clock()
            limit = options.seconds if options.seconds is not None else (options.live_seconds if source.live else None)
            deadline = None if limit is None else t0 + limit
            pace = options.realtime and not source.live  # a camera paces itself
            first_t = None
            stopped = ""
            for seq, (rgb, t) in enumerate(source.frames()):
                if self._stop.is_set():
                    stopped = "interrupted"
                    break
                if first_t is None:
                    first_t = t
                if pace:
                    wait = t0 + (t - first_t) - clock()
                    if deadline is not None:
                        wait = min(wait, deadline - clock())
                    if wait > 0 and self._stop.wait(wait):
                        stopped = "interrupted"
                        break
                if deadline is not None and clock() >= deadline:
                    stopped = "stopped"
                    break
                now = None if self.stream_clock is None else self.stream_clock.advance(t)
                self._store_one(store, rgb, seq, t, now)
            self.status = stopped or "done"
            expected = source.expected_frames
            if self.offered and self.rejected == self.offered:
                # Nothing of this source reached its session: whatever the reason, the
                # run did not do what was asked of it for this source.
                self.all_rejected = True
                self._fail(f"all {self.rejected} of {self.offered} frames rejected by the ingest config; "
                           f"the first: {self.first_reject_reason}")
            elif not stopped and expected and self.offered < expected - max(1, expected // 100):
                self._fail(f"ended early after {self.offered} of {expected} frames")
            elif not stopped and source.live and deadline is not None:
                # A camera has no end of its own: it stopped sending (unplugged, taken).
                self._fail(f"ended early after {self.offered} frames: the stream stopped at "
                           f"{clock() - t0:.1f} s of {limit:g} s")
        except self._known_failures as exc:
            self._fail(str(exc))
        except Exception as exc:  # one broken source must not stop the other sessions
            self._fail(f"unexpected {type(exc).__name__}: {exc}")
        finally:
            source.close()
            if self.stream_clock is not None:
                self.stream_clock.end()
            self.ended_at = clock()
            if self.started_at is None:
                self.started_at = self.ended_at
            self._notify(self)

    def _store_one(self, store: Store, rgb: npt.NDArray[np.uint8], seq: int, t: float, now: float | None) -> None:
        self.offered += 1
        try:
            ok, nbytes = store(rgb, seq, t, now)
        except self._store_errors:
            # A store whose reply was lost may or may not have been applied: counted apart.
            self.store_failed += 1
            raise
        except ValueError as exc:
            if self.options.config is None:  # only the ingest config may turn frames down
                raise
            self.rejected += 1
            if not self.first_reject:
                self.first_reject_reason = f"frame {seq}: {exc}"
                self.first_reject = f"frame {seq} rejected by the ingest config: {exc}"
            return
        if ok:
            if not self.accepted:
                self.first_accepted_at = self.options.clock()
            self.accepted += 1
            self.bytes += nbytes
        else:
            self.rate_limited += 1

    def _fail(self, message: str) -> None:
        self.failed = True
        self.status = "ended early" if message.startswith("ended early") else "failed"
        self.message = message

    @property
    def active_seconds(self) -> float:
        if self.started_at is None:
            return 0.0
        end = self.ended_at if self.ended_at is not None else self.options.clock()
        return max(0.0, end - self.started_at)


@dataclass
class SessionRun:
    """Everything the run keeps for one source: its session, producer and subscribers."""

    session: Session
    source: Source
    producer: Producer
    consumers: list[Consumer] = field(default_factory=list)
    samplers: list[VisionSampler] = field(default_factory=list)
    # (seconds since the run started, frames accepted by then): the instant of the first
    # accepted frame with 1, then one point per tick. A rate counted from the first frame
    # cannot overshoot at the start, as one counted from the run's start can.
    timeline: list[tuple[float, int]] = field(default_factory=list)
    first_in_timeline: bool = False
    # The session's visual_stats() once its producer ended ({} when the store failed).
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.session.id

    def recent_fps(self, window: float = 1.0) -> float:
        points = self.timeline
        if len(points) < 2:
            return 0.0
        t1, n1 = points[-1]
        t0, n0 = next(((t, n) for t, n in reversed(points) if t1 - t >= window), points[0])
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0


@dataclass
class RunResult:
    backend: str
    sessions: list[SessionRun]
    seconds: float
    interrupted: bool
    options: RunOptions
    # Where the sessions were, when not in this process: "Redis at URL, namespace 'NS'",
    # and that URL (its password masked).
    store: str = ""
    store_url: str = ""
    # The first failure of the session store (--redis) while shutting down, or "".
    store_error: str = ""

    @property
    def failed(self) -> list[SessionRun]:
        return [s for s in self.sessions if s.producer.failed]


class Run:
    """Build, start, watch and tear down one run. ``execute()`` does all of it."""

    def __init__(self, sources: Sequence[Source], options: RunOptions,
                 on_message: Callable[[str], None] = lambda text: None) -> None:
        self.options = options
        self.on_message = on_message
        self._stop = threading.Event()
        self._changed = threading.Event()
        self._store_errors = _redis.store_errors(options.redis)
        self.store_error = ""
        self.sessions: list[SessionRun] = []
        # A SessionManager, or a RedisSessionManager: the same methods, not a subclass.
        self.manager: Any = self._make_manager(max(1, len(sources)))
        self.backend: str = self.manager.backend
        self.store_url: str = "" if options.redis is None else self.manager.url
        self.store = "" if options.redis is None else \
            f"Redis at {self.store_url}, namespace {options.redis_namespace!r}"
        if options.redis is not None:
            # Frames get their received_at from the store's clock, and latency, pacing
            # and the samplers' now must be on that clock too.
            self.options = options = dataclasses.replace(options, clock=_redis.store_clock(self.manager))
        try:
            async_consumers = self._build(sources)
        except self._store_errors as exc:
            self.store_error = str(exc)  # said once, by the StoreError
            self._abandon()
            raise StoreError(f"--redis: {exc}") from None
        except BaseException:
            self._abandon()  # sessions in Redis would outlive this process
            raise
        self.async_loop = AsyncLoop(async_consumers)
        self.started_at = options.clock()
        self.interrupted = False

    def _make_manager(self, max_concurrent: int) -> Any:
        options = self.options
        if options.redis is not None:
            return _redis.open_manager(options.redis, max_concurrent, options.redis_namespace)
        try:
            return SessionManager(max_concurrent, backend=options.backend, shared=options.shared)
        except (ImportError, TypeError, ValueError) as exc:  # shared= on the pure backend, a bad name
            raise UsageError(f"--shared: {exc}") from None

    def _build(self, sources: Sequence[Source]) -> list[AsyncConsumer]:
        """A session per source, its producer and its subscribers; the async consumers."""
        options = self.options
        async_consumers: list[AsyncConsumer] = []
        specs = plan(options.subscribers, buffer=options.buffer, slow_work=options.slow_work)
        stamped_raw = options.jpeg_quality is None
        for index, source in enumerate(sources):
            session = self._create(f"{options.session_prefix}{index}")
            # A camera is paced by its own capture, and --realtime paces the others: both
            # run on the wall clock. Everything else is read flat out, on video time.
            stream_clock = None if options.realtime or source.live else StreamClock(options.clock)
            producer = Producer(session, source, options, self._stop, self._producer_done, stream_clock)
            run = SessionRun(session, source, producer)
            self.sessions.append(run)
            stored_at = None if producer.store_times is None else producer.store_times.get
            for spec in specs:
                if spec.kind == "sampler":
                    run.samplers.append(VisionSampler(spec, session, ttl=options.ttl,
                                                      interval=options.sampler_interval,
                                                      clock=stream_clock or options.clock, stream_clock=stream_clock))
                    continue
                sub = session.subscribe_visual_frames(spec.buffer, policy=spec.policy)
                cls = AsyncConsumer if spec.kind == "async" else ThreadConsumer
                consumer = cls(spec, sub, clock=options.clock, verify_stamp=stamped_raw and source.stamped,
                               stored_at=stored_at)
                run.consumers.append(consumer)
                if isinstance(consumer, AsyncConsumer):
                    async_consumers.append(consumer)
        return async_consumers

    def _create(self, session_id: str) -> Session:
        options = self.options
        try:
            session: Session = self.manager.create(session_id)
            return session
        except (SessionExistsError, MaxSessionsError) as exc:
            if options.redis is not None:
                raise UsageError(self._taken_message(session_id, exc)) from None
            if options.shared is None or not isinstance(exc, SessionExistsError):
                raise
            # Another live process shares this id in the namespace: nothing has run yet;
            # the sessions made so far end (their shared memory is unlinked).
            self.manager.close()
            raise UsageError(f"--shared {options.shared}: another live process already shares a session "
                             f"{session_id!r} in that namespace; choose another namespace") from None

    def _taken_message(self, session_id: str, exc: Exception) -> str:
        # The limit is checked before the id, so a taken id may come back as the limit.
        if isinstance(exc, SessionExistsError) or session_id in self.manager:
            what = f"another process has a live session {session_id!r} there"
        else:
            # max_concurrent counts every session of the namespace, whoever made it.
            what = (f"it holds other processes' live sessions, and this run's limit is its own "
                    f"{self.manager.max_concurrent}")
        return (f"--redis: {self.store}: {what}; choose another --redis-namespace (a session left by a killed "
                f"process is evicted once idle for {self.manager.idle_timeout:g} s by a node that evicts)")

    def _abandon(self) -> None:
        """Nothing has run: end the sessions made so far and let go of the manager. Never
        close() a Redis manager: that ends every session of the namespace, on every node."""
        for run in self.sessions:
            self._end(run)
        self.manager.stop()

    def _end(self, run: SessionRun) -> None:
        """Delete the session, which closes its subscriptions so the consumers drain and
        finish. When the store cannot be reached, this node's subscriptions are closed
        here instead: a consumer must never wait for an end that will not come."""
        try:
            self.manager.delete(run.id)
        except self._store_errors as exc:
            self._store_failed(exc)
            for consumer in run.consumers:
                consumer.subscription.close()

    def _store_failed(self, exc: BaseException) -> None:
        if not self.store_error:
            self.store_error = str(exc)
            self.on_message(f"--redis: {exc}")

    def _producer_done(self, producer: Producer) -> None:
        if producer.failed:
            self.on_message(f"{producer.session.id} {producer.source.label}: {producer.message}")
        if producer.first_reject and not producer.all_rejected:  # else the failure says it
            self.on_message(f"{producer.session.id} {producer.source.label}: warning: {producer.first_reject}")
        self._changed.set()

    def start(self) -> None:
        self.started_at = self.options.clock()
        for run in self.sessions:
            for consumer in run.consumers:
                if isinstance(consumer, ThreadConsumer):
                    consumer.start()
            for sampler in run.samplers:
                sampler.start()
        self.async_loop.start()
        for run in self.sessions:
            run.producer.thread.start()

    def elapsed(self) -> float:
        return self.options.clock() - self.started_at

    def tick(self) -> None:
        for run in self.sessions:
            producer = run.producer
            # The count first, the time after it: the producer sets first_accepted_at
            # before it counts, so a count of 1 or more means that instant is known, and
            # no point is ever stamped before a frame it counts.
            accepted = producer.accepted
            t = self.elapsed()
            if accepted and not run.first_in_timeline:
                assert producer.first_accepted_at is not None
                t_first = producer.first_accepted_at - self.started_at
                if run.timeline:
                    t_first = max(t_first, run.timeline[-1][0])
                run.timeline.append((t_first, 1))
                run.first_in_timeline = True
            run.timeline.append((t, accepted))

    def running(self) -> bool:
        # ended_at is set before the producer says it is done, so the loop below never
        # waits a whole extra tick for a thread that is only unwinding.
        return any(run.producer.ended_at is None for run in self.sessions)

    def wait(self, on_tick: Callable[[Run], None] = lambda run: None) -> None:
        """Tick (and call ``on_tick``) every ``refresh`` seconds until every producer ended."""
        try:
            while self.running():
                self._changed.wait(self.options.refresh)
                self._changed.clear()
                self.tick()
                on_tick(self)
        except KeyboardInterrupt:
            self.interrupted = True
            self._stop.set()

    def finish(self) -> RunResult:
        self._stop.set()
        for run in self.sessions:
            run.producer.thread.join()
        self.tick()
        for run in self.sessions:
            for sampler in run.samplers:
                sampler.stop()
        for run in self.sessions:
            for sampler in run.samplers:
                sampler.join()
            run.stats = self._stats(run)
            self._end(run)
        for run in self.sessions:
            for consumer in run.consumers:
                if isinstance(consumer, ThreadConsumer):
                    consumer.join()
        self.async_loop.join()
        # stop(), not close(): a Redis manager's close() ends every session of the
        # namespace, other processes' too; this run's own were deleted above.
        self.manager.stop()
        return RunResult(self.backend, self.sessions, self.elapsed(), self.interrupted, self.options, self.store,
                         self.store_url, self.store_error)

    def _stats(self, run: SessionRun) -> dict[str, int]:
        try:
            return dict(run.session.visual_stats())
        except self._store_errors as exc:
            self._store_failed(exc)
            return {}

    def execute(self, on_tick: Callable[[Run], None] = lambda run: None) -> RunResult:
        self.start()
        try:
            self.wait(on_tick)
        finally:
            result = self.finish()
        return result
