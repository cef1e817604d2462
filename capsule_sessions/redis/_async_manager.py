"""``AsyncRedisSessionManager``: ``RedisSessionManager`` on ``redis.asyncio``.

The same names as coroutines (``await manager.create(id)``), and ``async with``. What
cannot be a coroutine in Python is a method here: ``await manager.count()`` for
``len(manager)`` and ``await manager.contains(id)`` for ``id in manager`` (``len()``
and ``in`` raise a TypeError saying so). The connection, the clock's first reading and
the cleanup task start on the first call (or ``async with``), inside the running event
loop; ``on_session_end`` may be a plain function or a coroutine function.
"""

from __future__ import annotations

import asyncio
import builtins
import datetime
import inspect
import logging
import weakref
from collections.abc import Callable
from typing import Any

from .. import _validate as v
from .._records import PipelineMode
from ..errors import MaxSessionsError, SessionError, SessionExistsError
from ..session import _mode
from . import _codec as c
from ._async_session import AsyncRedisSession
from ._clock import ServerClock, measure_async
from ._connect import cluster_enabled, connect_async, connect_cluster_async, node_url
from ._context import Context, encoded, key_names
from ._errors import RedisDataError, translated
from ._manager import _ManagerCore

log = logging.getLogger(__name__)


async def _cleanup_loop(manager_ref: weakref.ref[AsyncRedisSessionManager], interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        manager = manager_ref()
        if manager is None:
            return
        try:
            await manager._refresh_clock()
            await manager.evict_idle()
        except Exception:
            log.exception("capsule_sessions.redis: idle eviction failed")
        del manager


class AsyncRedisSessionManager(_ManagerCore[AsyncRedisSession]):
    """``RedisSessionManager`` for asyncio programs (see the module docstring)."""

    _session_class = AsyncRedisSession

    def __init__(
        self,
        url: str,
        max_concurrent: int,
        idle_timeout: float | datetime.timedelta = 300.0,
        *,
        namespace: str = "capsule",
        cleanup_interval: float | datetime.timedelta | None = 30.0,
        on_session_end: Callable[[AsyncRedisSession], object] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._interval = self._setup(url, max_concurrent, idle_timeout, namespace, cleanup_interval,
                                     on_session_end, clock)
        self._ctx_: Context | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        self._connecting = asyncio.Lock()
        # On Redis Cluster: a client per node, for the frame rings (see _node_client).
        self._node_clients: dict[tuple[str, int], Any] = {}

    async def _ready(self) -> Context:
        """The context, made on first use: connect, read the server's clock, start the
        cleanup task."""
        if self._ctx_ is None:
            async with self._connecting:  # one connection set-up, however many tasks ask at once
                if self._ctx_ is None:
                    client = await self._connect()
                    server_clock = None
                    if self._injected_clock is None:
                        try:
                            with translated(self._url):
                                server_clock = ServerClock(await measure_async(self._clock_client(client)))
                        except BaseException:
                            await client.aclose()
                            raise
                    self._ctx_ = self._context(client, server_clock, asyncio=True)
                    if self._cluster:
                        self._ctx_.node_client = lambda key: self._node_client(client, key)
                    if self._interval is not None and not self._stopped:
                        self._task = asyncio.get_running_loop().create_task(
                            _cleanup_loop(weakref.ref(self), self._interval),
                            name="capsule-sessions-redis-cleanup")
        return self._ctx_

    async def _connect(self) -> Any:
        """The client: a cluster client when the URL names a Redis Cluster node (HELLO's
        mode, as the sync twin finds out)."""
        client: Any = connect_async(self._url)
        try:
            with translated(self._url):
                if cluster_enabled(await client.execute_command("HELLO")):
                    await client.aclose()
                    client = connect_cluster_async(self._url)
                    await client.initialize()
                    self._cluster = True
        except BaseException:
            await client.aclose()
            raise
        return client

    def _clock_client(self, client: Any) -> Any:
        """Whose TIME is the clock: the server's, or on Redis Cluster the node that holds
        the registry (every manager of the namespace reads the same one)."""
        return self._node_client(client, self._registry) if self._cluster else client

    def _node_client(self, client: Any, key: bytes) -> Any:
        """A plain client of the node that serves ``key`` (the cluster client's nodes have
        no connection pool a frame ring could take connections of)."""
        node = client.get_node_from_key(key)
        made = self._node_clients.get((node.host, node.port))
        if made is None:
            made = self._node_clients[(node.host, node.port)] = connect_async(node_url(self._url, node.host, node.port))
        return made

    async def _refresh_clock(self) -> None:
        ctx = await self._ready()
        if ctx.server_clock is not None and ctx.server_clock.due():
            with translated(self._url):
                ctx.server_clock.update(await measure_async(self._clock_client(ctx.client)))

    async def create(self, id: str, mode: PipelineMode = PipelineMode.OMNI,
                     character_id: str = "") -> AsyncRedisSession:
        id = v.text(id, "id")
        if self._closed:
            raise SessionError("the session manager is closed")
        ctx = await self._ready()
        try:
            mode = _mode(mode)
            character_id = v.text(character_id, "character_id")
        except (TypeError, ValueError):
            with translated(self._url):
                pipe = ctx.client.pipeline(transaction=not self._cluster)
                pipe.zcard(self._registry)
                pipe.zscore(self._registry, encoded(id))
                count, score = await pipe.execute()
            error = self._room_error(count, score is not None, id)
            if error is not None:
                raise error from None
            raise
        if self._cluster:
            return await self._create_in_steps(ctx, id, mode, character_id)
        keys, args, record = self._create_args(ctx, id, mode, character_id)
        with translated(self._url):
            reply = await ctx.scripts.create(keys=keys, args=args)
        self._create_reply(reply, id)
        return self._adopt(ctx, record)

    async def _create_in_steps(self, ctx: Context, id: str, mode: PipelineMode,
                               character_id: str) -> AsyncRedisSession:
        """RedisSessionManager._create_in_steps."""
        keys, args, record = self._prepare_args(ctx, id, mode, character_id)
        with translated(self._url):
            self._create_reply(await ctx.scripts.prepare(keys=keys, args=args), id)
        acquired = False
        try:
            with translated(self._url):
                await self._acquire(ctx, id, record.inc)
                acquired = True
                if not await ctx.scripts.confirm(keys=keys[:1], args=[record.inc]):
                    raise self._pending_lost(id)
        except BaseException:
            await self._undo_create(ctx, keys[0], id, record.inc, acquired)
            raise
        return self._adopt(ctx, record)

    async def _acquire(self, ctx: Context, id: str, inc: str) -> None:
        """RedisSessionManager._acquire."""
        replace: bytes | None = None
        repaired = False
        while True:
            try:
                other = self._acquired(await ctx.scripts.acquire(
                    keys=self._registry_keys, args=self._acquire_args(id, inc, replace)), id)
            except MaxSessionsError:
                if repaired or not self._repair_due() or not await self._repair():
                    raise
                repaired = True
                continue
            if other is None:
                return
            if replace is not None:
                raise SessionExistsError(f"session {id!r} already exists")
            replace = other

    async def _undo_create(self, ctx: Context, session_key: bytes, id: str, inc: str, acquired: bool) -> None:
        try:
            with translated(self._url):
                if acquired:
                    await ctx.scripts.release(keys=self._registry_keys, args=[encoded(id), inc])
                await ctx.scripts.abandon(keys=[session_key], args=[inc])
        except SessionError as exc:
            log.warning("capsule_sessions.redis: could not take back a failed create of %r: %s", id, exc)

    async def _repair(self) -> bool:
        """RedisSessionManager._repair."""
        ctx = await self._ready()
        with translated(self._url):
            pipe = ctx.client.pipeline(transaction=False)
            pipe.zrange(self._registry, 0, -1)
            pipe.hgetall(self._registry_keys[1])
            raw, incs = await pipe.execute()
            ids = self._ids(raw)
            pipe = ctx.client.pipeline(transaction=False)
            for id in ids:
                pipe.hmget(key_names(self.namespace, id).session, ["inc", "ended"])
            stale = self._stale(ids, incs, await pipe.execute())
            freed = [await ctx.scripts.release(keys=self._registry_keys, args=[encoded(id), inc])
                     for id, inc in stale]
        return any(freed)

    async def get(self, id: str) -> AsyncRedisSession:
        checked = self._id_or_none(id)
        if checked is None:
            raise self._not_found(id)
        ctx = await self._ready()
        await self._refresh_clock()
        with translated(self._url):
            values = await ctx.client.hgetall(key_names(self.namespace, checked).session)
        record = self._live_record(values, checked)
        if record is None:
            raise self._not_found(id)
        return self._adopt(ctx, record)

    async def touch(self, id: str) -> None:
        checked = self._id_or_none(id)
        if checked is not None:
            ctx = await self._ready()
            now = v.instant(ctx.clock(), "clock()")[0]
            names = key_names(self.namespace, checked)
            with translated(self._url):
                if await ctx.scripts.touch_live(keys=[names.session], args=[c.KIND, c.instant_text(now)]):
                    return
        raise self._not_found(id)

    async def _claim(self, id: str, now: float | None) -> AsyncRedisSession | None:
        ctx = await self._ready()
        keys, args = self._claim_args(id, now)
        with translated(self._url):
            if not self._cluster:
                reply = await ctx.scripts.claim(keys=keys, args=args)
                return self._claimed(ctx, reply, id)
            reply = await ctx.scripts.claim_one(keys=keys, args=args)
        session = self._claimed(ctx, reply, id)
        if session is not None:
            try:
                with translated(self._url):
                    await ctx.scripts.release(keys=self._registry_keys, args=[encoded(id), session._inc])
            except SessionError as exc:
                log.warning("capsule_sessions.redis: session %r ended, but its registry place was not freed: %s",
                            id, exc)
        return session

    async def delete(self, id: str) -> None:
        checked = self._id_or_none(id)
        if checked is None:
            return
        session = await self._claim(checked, None)
        if session is not None:
            await self._end([session])

    async def _registry_ids(self) -> builtins.list[str]:
        ctx = await self._ready()
        with translated(self._url):
            raw = await ctx.client.zrange(self._registry, 0, -1)
        return self._ids(raw)

    async def _records(self, ids: builtins.list[str]) -> builtins.list[dict[bytes, bytes]]:
        ctx = await self._ready()
        with translated(self._url):
            pipe = ctx.client.pipeline(transaction=False)
            for id in ids:
                pipe.hgetall(key_names(self.namespace, id).session)
            return list(await pipe.execute())

    async def list(self) -> builtins.list[AsyncRedisSession]:
        ctx = await self._ready()
        await self._refresh_clock()  # RedisSessionManager._refresh_clock
        ids = await self._registry_ids()
        sessions = []
        for id, values in zip(ids, await self._records(ids), strict=True):
            record = self._live_record(values, id)
            if record is not None:
                sessions.append(self._adopt(ctx, record))
        self._forget(ids=set(ids))
        return sessions

    async def count(self) -> int:
        ctx = await self._ready()
        with translated(self._url):
            return int(await ctx.client.zcard(self._registry))

    async def contains(self, id: object) -> bool:
        """``id in manager`` of the sync twin."""
        checked = self._id_or_none(id)
        if checked is None:
            return False
        ctx = await self._ready()
        with translated(self._url):
            if self._cluster:  # RedisSessionManager.__contains__
                values = await ctx.client.hmget(key_names(self.namespace, checked).session,
                                                ["kind", "ended", "pending"])
                return bool(values[0] == c.KIND.encode() and values[1] == b"0" and values[2] is None)
            return await ctx.client.zscore(self._registry, encoded(checked)) is not None

    def __len__(self) -> int:
        raise TypeError("len() of an AsyncRedisSessionManager needs Redis: use `await manager.count()`")

    def __contains__(self, id: object) -> bool:
        raise TypeError("`in` on an AsyncRedisSessionManager needs Redis: use `await manager.contains(id)`")

    async def evict_idle(self, now: float | None = None) -> builtins.list[AsyncRedisSession]:
        ctx = await self._ready()
        now_s = v.instant(ctx.clock() if now is None else now, "now")[0]
        if self._cluster:
            await self._repair()
        ids = await self._registry_ids()
        corrupted: RedisDataError | None = None
        candidates = []
        for id, values in zip(ids, await self._records(ids), strict=True):
            try:
                record = self._live_record(values, id)
            except RedisDataError as exc:
                corrupted = corrupted or exc
                continue
            if record is None or self._idle(now_s, record):
                candidates.append(id)
        ended: builtins.list[AsyncRedisSession] = []
        try:
            for id in candidates:
                try:
                    session = await self._claim(id, now_s)
                except RedisDataError as exc:
                    corrupted = corrupted or exc
                    continue
                if session is not None:
                    ended.append(session)
        finally:
            self._forget(ids=set(ids))
            await self._end(ended)
        if corrupted is not None:
            raise corrupted
        return ended

    async def _end(self, sessions: builtins.list[AsyncRedisSession]) -> None:
        raised: BaseException | None = None
        for session in sessions:
            try:
                if self.on_session_end is not None:
                    session._ending = True
                    try:
                        result = self.on_session_end(session)
                        if inspect.isawaitable(result):
                            await result
                    finally:
                        session._ending = False
            except BaseException as exc:
                raised = self._first_error(raised, exc)
            finally:
                try:
                    await session._close()
                except BaseException as exc:
                    raised = self._first_error(raised, exc)
        if raised is not None:
            try:
                raise raised
            finally:
                raised = None

    async def close(self) -> None:
        """End every session of the namespace, cluster-wide, then stop the cleanup task
        and close this node's connections. Idempotent."""
        self._closed = True
        ended: builtins.list[AsyncRedisSession] = []
        corrupted: RedisDataError | None = None
        try:
            try:
                for id in await self._registry_ids():
                    try:
                        session = await self._claim(id, None)
                    except RedisDataError as exc:  # the others are still ended
                        corrupted = corrupted or exc
                        continue
                    if session is not None:
                        ended.append(session)
            finally:
                await self._end(ended)
        finally:
            await self.stop()
        if corrupted is not None:
            raise corrupted

    async def stop(self) -> None:
        """Stop this node's cleanup task (idempotent; returns once it has ended). The
        sessions live on."""
        self._stopped = True
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            await asyncio.wait([task])  # the task's CancelledError stays the task's

    async def aclose(self) -> None:
        """Close this node's connections (before its event loop ends; leaving
        ``async with`` does it); a later call connects again."""
        if self._ctx_ is not None:
            await self._ctx_.client.aclose()
        nodes, self._node_clients = self._node_clients, {}
        for client in nodes.values():
            await client.aclose()

    async def __aenter__(self) -> AsyncRedisSessionManager:
        await self._ready()
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.close()
        finally:
            await self.aclose()
