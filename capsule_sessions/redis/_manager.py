"""``RedisSessionManager``: ``SessionManager`` with its sessions in Redis, shared by
every node (process, machine) that uses the same server and namespace.

Membership is the registry (a sorted set of live ids, in the order they were made) plus
each session's hash; on one server the two change together in one script
(``_scripts``): ``create`` checks ``max_concurrent`` and the id and adds both; a claim
(``delete``, ``close``, idle eviction) takes the session out and marks it ended, and
exactly one caller in the cluster gets it back and runs ``on_session_end``. On Redis
Cluster, where one script reaches one slot, the same changes are made in steps, each
atomic on its own slot, ordered so that every outcome a crash can leave is either
still correct or repaired by the next node that looks (``_scripts``, docs/redis.md).
``_ManagerCore`` holds what the sync and asyncio twins share (everything but I/O).

Each node keeps one object per live session it has seen, so ``get`` returns the same
object on a node (``pipeline_cancel`` and subscriptions are the node's), rebuilt when
the session was ended and made again elsewhere.
"""

from __future__ import annotations

import builtins
import datetime
import logging
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from .. import _validate as v
from .._records import PipelineMode, SessionState
from ..errors import MaxSessionsError, SessionError, SessionExistsError, SessionNotFoundError
from ..session import _mode
from . import _codec as c
from ._clock import ServerClock, measure
from ._connect import check_url, cluster_enabled, connect, connect_cluster
from ._context import Context, encoded, key_names
from ._errors import RedisDataError, SessionStoreError, masked, translated
from ._keys import check_namespace, incs_key, registry_key
from ._scripts import Scripts
from ._session import RETENTION_SECONDS, RedisSession, _SessionCore, ring_keys

log = logging.getLogger(__name__)

S = TypeVar("S", bound=_SessionCore)

# On Redis Cluster a create's hash is pending (no other node can make the id, nobody
# sees the session) until the create has its place in the registry; a node that died
# in between leaves it to expire after this long. A create slower than that fails.
PENDING_SECONDS = 10.0
# A create that finds the registry full repairs it first (a dead node's place may be
# what fills it), at most this often per node: at the limit under load every refused
# create would otherwise read every session's hash.
REPAIR_AT_LIMIT_SECONDS = 1.0


class _ManagerCore(Generic[S]):
    """Arguments, replies and the local objects: what both twins share."""

    _session_class: type[S]

    def _setup(self, url: Any, max_concurrent: Any, idle_timeout: Any, namespace: Any, cleanup_interval: Any,
               on_session_end: Any, clock: Any) -> float | None:
        """Check the arguments (as SessionManager does, the URL and namespace first);
        returns the cleanup interval."""
        self._url = check_url(url)
        self.url = masked(self._url)
        self.namespace = check_namespace(namespace)
        self.max_concurrent = v.integer(max_concurrent, "max_concurrent", 0)
        self.idle_timeout = v.duration_seconds(idle_timeout, "idle_timeout")
        if cleanup_interval is not None:
            cleanup_interval = v.timeout_seconds(cleanup_interval, "cleanup_interval")
            if cleanup_interval == 0:
                raise ValueError("cleanup_interval must be > 0 seconds, or None for no background eviction")
        if on_session_end is not None and not callable(on_session_end):
            raise TypeError(f"on_session_end must be callable or None, got {type(on_session_end).__name__}")
        self.on_session_end = on_session_end
        self._injected_clock = None if clock is None else v.clock(clock)
        self.backend = "redis"
        self._sessions: dict[str, S] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._registry = encoded(registry_key(self.namespace))
        self._registry_keys = [self._registry, encoded(incs_key(self.namespace))]
        self._cluster = False
        self._repaired_at = float("-inf")
        result: float | None = cleanup_interval
        return result

    def _context(self, client: Any, server_clock: ServerClock | None, asyncio: bool = False) -> Context:
        clock = server_clock if self._injected_clock is None else self._injected_clock
        assert clock is not None
        return Context(self._url, self.namespace, client, Scripts(client, asyncio), clock, server_clock)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url} namespace={self.namespace!r} max={self.max_concurrent}>"

    # -- create ------------------------------------------------------------------------
    def _create_args(self, ctx: Context, id: str, mode: PipelineMode, character_id: str) -> tuple[
            list[bytes], list[Any], c.Record]:
        now = v.instant(ctx.clock(), "clock()")[0]
        names = key_names(self.namespace, id)
        inc = c.new_inc()
        keys = [self._registry, *names.all(ring_keys(names.keys))]
        args = [encoded(id), str(self.max_concurrent), c.KIND, inc, str(int(mode)), encoded(character_id),
                c.instant_text(now)]
        record = c.Record(id, inc, mode, character_id, now, now, SessionState.INIT, "", 0, 0, 0, False, False,
                          False)
        return keys, args, record

    def _create_reply(self, reply: Any, id: str) -> None:
        if reply == b"max":
            raise MaxSessionsError(f"max concurrent sessions reached ({self.max_concurrent})")
        if reply == b"exists":
            raise SessionExistsError(f"session {id!r} already exists")
        if reply == b"foreign":
            key = key_names(self.namespace, id).keys.key("session")
            raise RedisDataError(f"{key} holds a value that capsule_sessions did not write: the id {id!r} cannot "
                                 "be used in this namespace")
        if reply != b"ok":
            raise RedisDataError(f"Redis at {self.url} answered create with {reply!r}")

    def _prepare_args(self, ctx: Context, id: str, mode: PipelineMode, character_id: str) -> tuple[
            list[bytes], list[Any], c.Record]:
        """PREPARE's keys and arguments (Redis Cluster), and the record it makes."""
        keys, args, record = self._create_args(ctx, id, mode, character_id)
        _, _, kind, inc, mode_text, character, now = args
        return keys[1:], [encoded(id), kind, inc, mode_text, character, now, str(int(PENDING_SECONDS * 1000))], record

    def _acquire_args(self, id: str, inc: str, replace: bytes | None) -> list[Any]:
        return [encoded(id), inc, str(self.max_concurrent), "" if replace is None else "1", replace or b""]

    def _acquired(self, reply: Any, id: str) -> bytes | None:
        """ACQUIRE's reply: None when this incarnation has its place; the incarnation
        registered under the id when another holds it (b"" for none recorded)."""
        if not isinstance(reply, list) or not reply or reply[0] not in (b"ok", b"max", b"exists"):
            raise RedisDataError(f"Redis at {self.url} answered a registry change with {reply!r:.80}")
        if reply[0] == b"max":
            raise MaxSessionsError(f"max concurrent sessions reached ({self.max_concurrent})")
        if reply[0] == b"ok":
            return None
        other = reply[1] if len(reply) > 1 else b""
        return other if isinstance(other, bytes) else b""

    def _repair_due(self) -> bool:
        """Whether a create at the limit may repair the registry now (REPAIR_AT_LIMIT_SECONDS)."""
        now = time.monotonic()
        if now - self._repaired_at < REPAIR_AT_LIMIT_SECONDS:
            return False
        self._repaired_at = now
        return True

    def _pending_lost(self, id: str) -> SessionStoreError:
        return SessionStoreError(f"Redis at {self.url}: creating session {id!r} took longer than "
                                 f"{PENDING_SECONDS:g} s, so its pending record expired; nothing was made")

    def _stale(self, ids: builtins.list[str], incs: dict[bytes, bytes],
               hashes: builtins.list[builtins.list[Any]]) -> builtins.list[tuple[str, bytes]]:
        """The registry places whose session is not live nor being made (Redis Cluster:
        left by a node that died between two steps), as (id, registered inc)."""
        stale = []
        for id, (inc, ended) in zip(ids, hashes, strict=True):
            registered = incs.get(encoded(id), b"")
            if not registered or inc != registered or ended != b"0":
                stale.append((id, registered))
        return stale

    def _room_error(self, count: int, exists: bool, id: str) -> SessionError | None:
        """The error create would raise first (for a call whose other arguments are bad:
        SessionManager checks the limit and the id before them)."""
        if count >= self.max_concurrent:
            return MaxSessionsError(f"max concurrent sessions reached ({self.max_concurrent})")
        if exists:
            return SessionExistsError(f"session {id!r} already exists")
        return None

    # -- records and local objects -------------------------------------------------------
    def _key(self, id: str) -> str:
        return key_names(self.namespace, id).keys.key("session")

    def _live_record(self, values: dict[bytes, bytes], id: str) -> c.Record | None:
        if not values or b"pending" in values:  # (pending: being made on Redis Cluster)
            return None
        record = c.record_of(values, self._key(id), id)
        return None if record.ended else record

    def _adopt(self, ctx: Context, record: c.Record) -> S:
        """This node's object for the session ``record`` describes."""
        with self._lock:
            session = self._sessions.get(record.id)
            if session is None or session._inc != record.inc:
                session = self._session_class(ctx, record)
                self._sessions[record.id] = session
            return session

    def _forget(self, ids: set[str] | None = None, session: S | None = None) -> None:
        with self._lock:
            if session is not None and self._sessions.get(session.id) is session:
                del self._sessions[session.id]
            if ids is not None:
                for gone in set(self._sessions).difference(ids):
                    del self._sessions[gone]

    def _ids(self, raw: list[Any]) -> list[str]:
        return [c.text_of(member, registry_key(self.namespace), "session id") for member in raw]

    @staticmethod
    def _id_or_none(id: object) -> str | None:
        return str.__str__(id) if isinstance(id, str) else None

    def _not_found(self, id: object) -> SessionNotFoundError:
        return SessionNotFoundError(f"session {id!r} not found")

    # -- claims --------------------------------------------------------------------------
    def _claim_args(self, id: str, now: float | None) -> tuple[list[bytes], list[Any]]:
        names = key_names(self.namespace, id)
        keys = [self._registry, *names.all(ring_keys(names.keys))]
        args = [encoded(id), c.KIND, "0" if now is None else "1", "" if now is None else c.instant_text(now),
                repr(self.idle_timeout), str(int(RETENTION_SECONDS * 1000))]
        if self._cluster:  # CLAIM_ONE: the session's keys and the arguments after the id
            return keys[1:], args[1:]
        return keys, args

    def _claimed(self, ctx: Context, reply: Any, id: str) -> S | None:
        """A claim's reply: the session this caller ended, or None (another node did, or
        it is no longer idle, or its record was gone)."""
        if reply is None or reply == b"gone":
            return None
        if reply == b"corrupt":
            raise RedisDataError(f"{self._key(id)} holds an active instant that is not one: it was not "
                                 "written by capsule_sessions (corrupted or foreign)")
        record = c.record_of(c.pairs(reply, self._key(id)), self._key(id), id)
        session = self._adopt(ctx, record)
        self._forget(session=session)
        return session

    def _idle(self, now: float, record: c.Record) -> bool:
        return now - record.active > self.idle_timeout

    @staticmethod
    def _first_error(raised: BaseException | None, exc: BaseException) -> BaseException:
        """SessionManager's rule: the first BaseException that is not an Exception wins
        over ordinary errors, else the first error."""
        if raised is None or (isinstance(raised, Exception) and not isinstance(exc, Exception)):
            return exc
        return raised


def _cleanup_loop(manager_ref: weakref.ref[RedisSessionManager], stopped: threading.Event, interval: float) -> None:
    while not stopped.wait(interval):
        manager = manager_ref()
        if manager is None:
            return
        try:
            manager._refresh_clock()
            manager.evict_idle()
        except Exception:
            log.exception("capsule_sessions.redis: idle eviction failed")
        del manager


class RedisSessionManager(_ManagerCore[RedisSession]):
    """A ``SessionManager`` whose sessions live in Redis at ``url``, under ``namespace``:
    every node with the same two sees the same sessions. Thread-safe.

    Cluster-wide: ``max_concurrent`` (each node passes its own; give them all one),
    ``SessionExistsError``, ``count``/``list``/``in``, and ending a session, which runs
    ``on_session_end`` on exactly one node (the one whose claim won). ``close()`` ends
    every session of the namespace, on every node; a node that leaves the cluster calls
    ``stop()``. The default clock is the Redis server's (docs/redis.md, "Time").
    """

    _session_class = RedisSession

    def __init__(
        self,
        url: str,
        max_concurrent: int,
        idle_timeout: float | datetime.timedelta = 300.0,
        *,
        namespace: str = "capsule",
        cleanup_interval: float | datetime.timedelta | None = 30.0,
        on_session_end: Callable[[RedisSession], object] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        interval = self._setup(url, max_concurrent, idle_timeout, namespace, cleanup_interval, on_session_end, clock)
        client: Any = connect(self._url)
        with translated(self._url):
            if cluster_enabled(client.execute_command("HELLO")):
                client.close()
                client = connect_cluster(self._url)
                self._cluster = True
        server_clock = None
        if self._injected_clock is None:
            with translated(self._url):
                server_clock = ServerClock(measure(self._clock_client(client)))
        self._client = client
        self._ctx = self._context(client, server_clock)
        if self._cluster:
            self._ctx.node_client = lambda key: client.get_node_from_key(key).redis_connection
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        if interval is not None:
            self._thread = threading.Thread(
                target=_cleanup_loop, args=(weakref.ref(self), self._stopped, interval),
                name="capsule-sessions-redis-cleanup", daemon=True)
            self._thread.start()

    def _clock_client(self, client: Any) -> Any:
        """Whose TIME is the clock: the server's, or on Redis Cluster the node that holds
        the registry (every manager of the namespace reads the same one)."""
        return client.get_node_from_key(self._registry).redis_connection if self._cluster else client

    def _refresh_clock(self) -> None:
        """Measure the server clock's offset again when it is due (REFRESH_SECONDS): the
        cleanup loop does, and so do get and list, for a node that runs no eviction (a
        worker that only reads) and would otherwise drift from the others."""
        server_clock = self._ctx.server_clock
        if server_clock is not None and server_clock.due():
            with translated(self._url):
                server_clock.update(measure(self._clock_client(self._client)))

    def create(self, id: str, mode: PipelineMode = PipelineMode.OMNI, character_id: str = "") -> RedisSession:
        """A new session, cluster-wide: MaxSessionsError when ``max_concurrent`` sessions
        exist in the namespace, SessionExistsError when ``id`` is in use on any node."""
        id = v.text(id, "id")
        if self._closed:
            raise SessionError("the session manager is closed")
        try:
            mode = _mode(mode)
            character_id = v.text(character_id, "character_id")
        except (TypeError, ValueError):
            with translated(self._url):
                pipe = self._client.pipeline(transaction=not self._cluster)
                pipe.zcard(self._registry)
                pipe.zscore(self._registry, encoded(id))
                count, score = pipe.execute()
            error = self._room_error(count, score is not None, id)
            if error is not None:
                raise error from None
            raise
        if self._cluster:
            return self._create_in_steps(id, mode, character_id)
        keys, args, record = self._create_args(self._ctx, id, mode, character_id)
        with translated(self._url):
            reply = self._ctx.scripts.create(keys=keys, args=args)
        self._create_reply(reply, id)
        return self._adopt(self._ctx, record)

    def _create_in_steps(self, id: str, mode: PipelineMode, character_id: str) -> RedisSession:
        """create on Redis Cluster: PREPARE the hash (pending: the id is this node's),
        ACQUIRE a place in the registry, CONFIRM the hash. A failed step takes back what
        the earlier ones did; what a crash leaves expires or is repaired."""
        keys, args, record = self._prepare_args(self._ctx, id, mode, character_id)
        scripts = self._ctx.scripts
        with translated(self._url):
            self._create_reply(scripts.prepare(keys=keys, args=args), id)
        acquired = False
        try:
            with translated(self._url):
                self._acquire(id, record.inc)
                acquired = True
                if not scripts.confirm(keys=keys[:1], args=[record.inc]):
                    raise self._pending_lost(id)
        except BaseException:
            self._undo_create(keys[0], id, record.inc, acquired)
            raise
        return self._adopt(self._ctx, record)

    def _acquire(self, id: str, inc: str) -> None:
        """A place in the registry for this incarnation. Another incarnation registered
        under the id is stale (this node's pending hash holds the id, so that one is not
        live): its place is taken over. At the limit, the registry is repaired once."""
        replace: bytes | None = None
        repaired = False
        while True:
            try:
                other = self._acquired(self._ctx.scripts.acquire(
                    keys=self._registry_keys, args=self._acquire_args(id, inc, replace)), id)
            except MaxSessionsError:
                if repaired or not self._repair_due() or not self._repair():
                    raise
                repaired = True
                continue
            if other is None:
                return
            if replace is not None:  # changed again under this create: another node is at it
                raise SessionExistsError(f"session {id!r} already exists")
            replace = other

    def _undo_create(self, session_key: bytes, id: str, inc: str, acquired: bool) -> None:
        try:
            with translated(self._url):
                if acquired:
                    self._ctx.scripts.release(keys=self._registry_keys, args=[encoded(id), inc])
                self._ctx.scripts.abandon(keys=[session_key], args=[inc])
        except SessionError as exc:  # what is left expires (the hash) or is repaired (the place)
            log.warning("capsule_sessions.redis: could not take back a failed create of %r: %s", id, exc)

    def _repair(self) -> bool:
        """Free the registry places whose session is not live nor being made (Redis
        Cluster: a node died between two steps); True when one was freed."""
        with translated(self._url):
            pipe = self._client.pipeline(transaction=False)
            pipe.zrange(self._registry, 0, -1)
            pipe.hgetall(self._registry_keys[1])
            raw, incs = pipe.execute()
            ids = self._ids(raw)
            pipe = self._client.pipeline(transaction=False)
            for id in ids:
                pipe.hmget(key_names(self.namespace, id).session, ["inc", "ended"])
            stale = self._stale(ids, incs, pipe.execute())
            freed = [self._ctx.scripts.release(keys=self._registry_keys, args=[encoded(id), inc])
                     for id, inc in stale]
        return any(freed)

    def get(self, id: str) -> RedisSession:
        checked = self._id_or_none(id)
        if checked is None:
            raise self._not_found(id)
        self._refresh_clock()
        names = key_names(self.namespace, checked)
        with translated(self._url):
            values: dict[bytes, bytes] = self._client.hgetall(names.session)
        record = self._live_record(values, checked)
        if record is None:
            raise self._not_found(id)
        return self._adopt(self._ctx, record)

    def touch(self, id: str) -> None:
        checked = self._id_or_none(id)
        if checked is not None:
            now = v.instant(self._ctx.clock(), "clock()")[0]
            names = key_names(self.namespace, checked)
            with translated(self._url):
                if self._ctx.scripts.touch_live(keys=[names.session], args=[c.KIND, c.instant_text(now)]):
                    return
        raise self._not_found(id)

    def _claim(self, id: str, now: float | None) -> RedisSession | None:
        keys, args = self._claim_args(id, now)
        with translated(self._url):
            if not self._cluster:
                reply = self._ctx.scripts.claim(keys=keys, args=args)
                return self._claimed(self._ctx, reply, id)
            reply = self._ctx.scripts.claim_one(keys=keys, args=args)
        session = self._claimed(self._ctx, reply, id)
        if session is not None:
            try:
                with translated(self._url):
                    self._ctx.scripts.release(keys=self._registry_keys, args=[encoded(id), session._inc])
            except SessionError as exc:  # this node ends it all the same; the place is repaired
                log.warning("capsule_sessions.redis: session %r ended, but its registry place was not freed: %s",
                            id, exc)
        return session

    def delete(self, id: str) -> None:
        """End session ``id`` (on_session_end on this node, CLOSED, subscriptions closed);
        an unknown id, or one another node is ending, is a no-op."""
        checked = self._id_or_none(id)
        if checked is None:
            return
        session = self._claim(checked, None)
        if session is not None:
            self._end([session])

    def _registry_ids(self) -> builtins.list[str]:
        with translated(self._url):
            raw = self._client.zrange(self._registry, 0, -1)
        return self._ids(raw)

    def _records(self, ids: builtins.list[str]) -> builtins.list[dict[bytes, bytes]]:
        with translated(self._url):
            pipe = self._client.pipeline(transaction=False)
            for id in ids:
                pipe.hgetall(key_names(self.namespace, id).session)
            return list(pipe.execute())

    # In this class body `list` is the method below, so annotations name the builtin in full.
    def list(self) -> builtins.list[RedisSession]:
        """Every live session of the namespace, in the order they were made."""
        self._refresh_clock()
        ids = self._registry_ids()
        sessions = []
        for id, values in zip(ids, self._records(ids), strict=True):
            record = self._live_record(values, id)
            if record is not None:
                sessions.append(self._adopt(self._ctx, record))
        self._forget(ids=set(ids))
        return sessions

    def count(self) -> int:
        with translated(self._url):
            return int(self._client.zcard(self._registry))

    def __len__(self) -> int:
        return self.count()

    def __contains__(self, id: object) -> bool:
        checked = self._id_or_none(id)
        if checked is None:
            return False
        with translated(self._url):
            if self._cluster:  # a live hash is registered: it is confirmed after its place is taken
                values = self._client.hmget(key_names(self.namespace, checked).session, ["kind", "ended", "pending"])
                return bool(values[0] == c.KIND.encode() and values[1] == b"0" and values[2] is None)
            return self._client.zscore(self._registry, encoded(checked)) is not None

    def evict_idle(self, now: float | None = None) -> builtins.list[RedisSession]:
        """End every session of the namespace idle for longer than ``idle_timeout``;
        returns those this node ended (another node's claim may win some). A session
        whose record is corrupted is skipped, and its RedisDataError raised once the
        others were ended."""
        now_s = v.instant(self._ctx.clock() if now is None else now, "now")[0]
        if self._cluster:
            self._repair()
        ids = self._registry_ids()
        corrupted: RedisDataError | None = None
        candidates = []
        for id, values in zip(ids, self._records(ids), strict=True):
            try:
                record = self._live_record(values, id)
            except RedisDataError as exc:
                corrupted = corrupted or exc
                continue
            if record is None or self._idle(now_s, record):
                candidates.append(id)  # a registry entry without a record is freed too
        ended: builtins.list[RedisSession] = []
        try:
            for id in candidates:
                try:
                    session = self._claim(id, now_s)
                except RedisDataError as exc:
                    corrupted = corrupted or exc
                    continue
                if session is not None:
                    ended.append(session)
        finally:
            # What was claimed is ended even when Redis failed in between: it is out of
            # the registry already, and no other node will end it.
            self._forget(ids=set(ids))
            self._end(ended)
        if corrupted is not None:
            raise corrupted
        return ended

    def _end(self, sessions: builtins.list[RedisSession]) -> None:
        """on_session_end, then CLOSED and the subscriptions closed, for every session
        even when a callback (or Redis) raises; then the first error is re-raised
        (SessionManager._end's rule)."""
        raised: BaseException | None = None
        for session in sessions:
            try:
                if self.on_session_end is not None:
                    session._ending = True
                    try:
                        self.on_session_end(session)
                    finally:
                        session._ending = False
            except BaseException as exc:
                raised = self._first_error(raised, exc)
            finally:
                try:
                    session._close()
                except BaseException as exc:
                    raised = self._first_error(raised, exc)
        if raised is not None:
            try:
                raise raised
            finally:
                raised = None

    def close(self) -> None:
        """End every session of the namespace (cluster-wide, each once, as ``delete``
        does), then stop the cleanup thread. Idempotent; leaving ``with`` calls it, and
        ``create`` on this manager afterwards raises ``SessionError``. To leave the
        cluster without ending anyone's sessions, call ``stop()``."""
        self._closed = True
        ended: builtins.list[RedisSession] = []
        corrupted: RedisDataError | None = None
        try:
            try:
                for id in self._registry_ids():
                    try:
                        session = self._claim(id, None)
                    except RedisDataError as exc:  # the others are still ended
                        corrupted = corrupted or exc
                        continue
                    if session is not None:
                        ended.append(session)
            finally:
                self._end(ended)
        finally:
            self.stop()
        if corrupted is not None:
            raise corrupted

    def stop(self) -> None:
        """Stop this node's eviction thread (idempotent; returns once it has ended). The
        sessions live on."""
        self._stopped.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def __enter__(self) -> RedisSessionManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        stopped = getattr(self, "_stopped", None)
        if stopped is not None:
            stopped.set()
