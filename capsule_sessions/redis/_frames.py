"""A session's frames in Redis: the pure ``FrameRing``'s visual methods and results, with
the ring in a stream every node sees.

``RedisFrameRing(client, keys, url, clock)`` (and ``AsyncRedisFrameRing`` on
``redis.asyncio``, in ``_frames_async.py``) is what a Redis session holds as ``_ring``
and forwards its visual methods to. The design, in short (docs/redis.md, "Frames"):

- One stream per session, the ring itself. A store is one round trip: a MULTI whose
  script (``_frames_lua.DECIDE``) does the rate check against the last accepted frame,
  the source-switch reset and the ``max_recent`` trim atomically, counting accepted,
  rate-limited and source resets in a hash, and opens the stream for the native XADD
  of the frame that follows it (the bytes never pass through Lua). Instants are the
  caller's (``now=``, else ``clock()``), passed to the script as arguments, so every
  node decides alike whatever its own clock.
- An entry holds the frame's bytes raw and its fields as strings (``_frames_codec``); its
  id is ``<epoch>-<accept number>``. Whatever is read back is checked: a key this
  library did not write is a RedisDataError naming it.
- ``latest_visual_frames`` is one XRANGE of the ring, filtered by TTL on the instants the
  script stored; ``visual_stats`` is one script (the cluster's counts).
- A subscription is the in-process ``Subscription`` on a local bounded queue
  (``_frames_queue``): a background thread reads the stream with a blocking XREAD and
  books each frame by its accept number, so a frame the stream trimmed before it was
  read is counted as dropped. A frame stored through this ring is also offered to this
  ring's subscribers before the store returns, as in one process. The reader
  reconnects with backoff after a Redis restart and counts what it missed as dropped.
- ``close_subscriptions`` ends the frames for every node: it marks them ended and
  appends an entry to the session's end stream, which every reader waits on too; a
  reader books what was accepted before the end, then closes.

Every call is made on a connection of the client's pool (a store: on the ring's own,
made with the pool's settings), with the client's timeouts and no retry (a retried store
could be stored twice): a failure to reach the server is a RedisUnavailableError naming
the URL, raised within the configured timeout.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, SupportsIndex

import numpy as np

from .. import _validate as v
from .._framebuf_py import FrameLoan
from .._framebuf_py._buffers import check_buffer, copy_bytes
from .._framebuf_py._fork import _MAKE, _fork, _refuse_copy, check_not_forked
from .._limits import MAX_LOAN_BYTES
from .._records import VisualFrame
from ..errors import REENTERED_MESSAGE, SessionNotFoundError
from . import _frames_codec as codec
from ._connect import READ_BUFFER_BYTES
from ._errors import RedisDataError, RedisUnavailableError, masked
from ._frames_lua import POISON, SCRIPTS, Script
from ._frames_queue import RedisQueue, RedisSubscription
from ._keys import SessionKeys

if TYPE_CHECKING:
    from typing_extensions import Buffer

log = logging.getLogger("capsule_sessions.redis")

# A reader's blocking read waits this long, then looks at the session's epoch (a Redis
# restart, the keys reset) and whether its subscription was closed.
READ_BLOCK_MS = 100
READ_COUNT = 64
# A reader that lost the server retries after this, doubling up to the maximum.
RECONNECT_FIRST_S = 0.05
RECONNECT_MAX_S = 1.0
# The backoff's count of failures at RECONNECT_MAX_S (after a reply that was not one).
RECONNECT_MAX_FAILURES = 6
# A reader thread leaves the reading to a thread waiting in get, and this long after it
# returned (it usually asks again at once: a frame loop).
CONSUMER_GRACE_S = 0.01
# While a thread waits in get, the reader thread sleeps this long at most before it looks
# again whether one still waits: a get that returns does not wake it (a wake-up per
# frame cost the frame's get 12-16 us on this project's 2-core VM), so a thread that
# returned and did not come back (a slow consumer, a get_nowait poller) is read for again
# within READER_PARK_S + CONSUMER_GRACE_S, and a waiting thread wakes it 4 times a second.
READER_PARK_S = 0.25
# close_subscriptions keeps the ended frames' keys this long (then they expire): a
# reader that was away (a restart, a partition) shorter than that still sees the end.
# The manager's retention of an ended session's keys (_session.RETENTION_SECONDS).
ENDED_KEEP_MS = 600_000

DECIDE, START, STOP, STATS, OPEN, END = (SCRIPTS[name] for name in ("decide", "start", "stop", "stats", "open", "end"))
# DECIDE's reply when the ring's incarnation is gone (_frames_lua).
GONE = -2

Command = tuple[Any, ...]

_pack_command: Callable[[Command], bytes] | None
try:  # the redis extra's parser packs a command in C; without it, redis-py's own code does
    from hiredis import pack_command as _pack_command
except ImportError:  # pragma: no cover - the extra installs hiredis
    _pack_command = None


def pack(commands: Sequence[Command]) -> bytes | None:
    """``commands`` as the bytes sent for them (None without hiredis: the connection packs)."""
    if _pack_command is None:
        return None
    return b"".join([_pack_command(command) for command in commands])


def _redis_errors() -> tuple[type[BaseException], ...]:
    import redis.exceptions as rx

    return (rx.ConnectionError, rx.TimeoutError, OSError)


def _no_script(reply: object) -> bool:
    import redis.exceptions as rx

    return isinstance(reply, rx.NoScriptError) or (isinstance(reply, Exception) and str(reply).startswith("NOSCRIPT"))


class _Store:
    """One store, checked: the commands that store it, and its frame's fields. Its bytes
    are ``payload`` (copied: a frame local subscribers get) or ``view`` (the caller's
    C-contiguous bytes, packed into the command without a copy of their own: a ring
    with no local subscriber sends them, and keeps nothing)."""

    __slots__ = ("core", "payload", "view", "data", "nbytes", "source", "keep", "min_ns", "seconds", "now_ns",
                 "mime_type", "width", "height", "timestamp_ms", "frame_seq", "error", "packed")

    def __init__(self, core: _Core, payload: np.ndarray[Any, Any] | memoryview | None, source: str, keep: int,
                 min_ns: int, seconds: float, now_ns: int, mime_type: str, width: int, height: int, timestamp_ms: int,
                 frame_seq: int, error: TypeError | None) -> None:
        self.core = core
        self.payload: np.ndarray[Any, Any] | None = None
        self.view: memoryview | None = None
        # The bytes the command carries (None: the store failed to read them).
        self.data: bytes | memoryview | None = None
        if isinstance(payload, memoryview):
            self.view = payload
        else:
            self.payload = payload
        self.nbytes = 0 if payload is None else payload.nbytes
        self.source = source
        self.keep = keep
        self.min_ns = min_ns
        self.seconds = seconds
        self.now_ns = now_ns
        self.mime_type = mime_type
        self.width = width
        self.height = height
        self.timestamp_ms = timestamp_ms
        self.frame_seq = frame_seq
        self.error = error
        self.packed: list[bytes | memoryview] | None = None
        if self.view is not None:
            self.data = self.view
        elif self.payload is not None:
            base: object = self.payload.base  # copy_bytes' bytes: sent as they are, not copied again
            self.data = base if type(base) is bytes else self.payload.tobytes()
        if self.data is not None:
            self.packed = core.pack_store(self, self.data)

    @property
    def commands(self) -> list[Command]:
        """The store's commands, as packed (their proposed epoch drawn again): [] when
        the store failed to read its bytes."""
        return [] if self.data is None else self.core.store_commands(self, self.data)

    def frame_bytes(self) -> np.ndarray[Any, Any]:
        """The frame's bytes for local subscribers: the copy, made now if the store was
        prepared without one (a subscriber came after it was prepared)."""
        if self.payload is None:
            assert self.view is not None
            self.payload = np.frombuffer(self.view.tobytes(), dtype=np.uint8)
        return self.payload

    def release(self) -> None:
        """Let go of the caller's buffer (its export ends with the store)."""
        view, self.view = self.view, None
        if view is not None:
            view.release()


class _Core:
    """What the sync and asyncio rings share: the keys, the clock, the commands and the
    reading of replies (no I/O here)."""

    def __init__(self, client: Any, keys: SessionKeys, url: str, clock: Callable[[], float],
                 activity: tuple[str, str] | None, incarnation: str | None) -> None:
        if not isinstance(keys, SessionKeys):
            raise TypeError(f"keys must be a SessionKeys, got {type(keys).__name__}")
        if incarnation is not None and activity is None:
            raise ValueError("incarnation needs activity: the session hash that holds it")
        self.session_id = keys.session_id
        self.client = client
        self.url = v.text(url, "url")
        self.clock = v.clock(clock)
        self.stream = keys.key("frames")
        self.meta = keys.key("frames:meta")
        self.done = keys.key("frames:end")
        # The commands name the keys in bytes: a session id may hold lone surrogates,
        # which a str key would fail to encode (the str names are for messages).
        self.stream_name, self.meta_name, self.sizes_name, self.done_name = (
            codec.text_bytes(name) for name in (self.stream, self.meta, keys.key("frames:sizes"), self.done))
        if activity is None:
            activity_key, self.activity_field = b"", ""
        else:
            key, self.activity_field = (v.text(part, "activity") for part in activity)
            activity_key = codec.text_bytes(key)
        self.activity_key = activity_key
        # Every script checks it first (_frames_lua): '' checks nothing.
        self.incarnation = b"" if incarnation is None else codec.text_bytes(v.text(incarnation, "incarnation"))
        self.write_keys = (self.stream_name, self.meta_name, self.sizes_name, activity_key)
        self.end_keys = (self.stream_name, self.meta_name, self.sizes_name, self.done_name, activity_key)
        self.open_keys = (self.meta_name, activity_key)
        self.cache = codec.Cache()
        # The packed parts of the last shape of store (pack_store): (shape, parts).
        self.store_template: tuple[tuple[Any, ...], list[bytes]] | None = None
        self.errors = _redis_errors()
        self.async_errors: tuple[type[BaseException], ...] = (*self.errors, asyncio.TimeoutError)

    # -- time --------------------------------------------------------------------------
    def read_now(self, now: float | None) -> tuple[float, int]:
        if now is None:
            return v.instant(self.clock(), "clock()")
        return v.instant(now, "now")

    # -- errors ------------------------------------------------------------------------
    def failure(self, exc: BaseException) -> Exception:
        import redis.exceptions as rx

        where = masked(self.url)
        if isinstance(exc, rx.ResponseError) and not isinstance(exc, rx.ReadOnlyError):
            text = str(exc)
            if "CAPSULE_DATA " in text:
                return RedisDataError(f"Redis at {where}: key {text.split('CAPSULE_DATA ', 1)[1]}")
            if "WRONGTYPE" in text or "ERR The ID" in text or "exhausted" in text:
                return RedisDataError(f"Redis at {where}: a key of {self.stream!r} holds something else: {text}")
            return RedisUnavailableError(f"Redis at {where} refused a command: {text}")
        return RedisUnavailableError(f"Redis at {where} is unavailable: {exc}")

    def gone(self) -> SessionNotFoundError:
        """What a call of an ended session's object raises once the id was used again or
        its record expired (the session's other calls raise the same)."""
        return SessionNotFoundError(f"session {self.session_id!r} has ended and its record is gone from Redis")

    def reply(self, reply: object) -> Any:
        """A reply that must not be an error."""
        if isinstance(reply, Exception):
            raise self.failure(reply)
        return reply

    # -- commands ----------------------------------------------------------------------
    def script(self, script: Script, keys: Sequence[bytes], args: Sequence[Any]) -> Command:
        return ("EVALSHA", script.sha, len(keys), *keys, *args)

    def decide_args(self, store: _Store, check_only: bool, source: bytes, received_at: str) -> list[Any]:
        """DECIDE's arguments (_frames_lua): a limit's two parts and the check flag go
        last, and only when there are some (each argument costs the script server time)."""
        now_hi, now_lo = codec.split_ns(store.now_ns)
        args: list[Any] = [now_hi, now_lo, store.keep, source, store.nbytes, received_at, codec.new_epoch(),
                           self.activity_field, self.incarnation]
        if store.min_ns > 0:
            args += codec.split_ns(store.min_ns)
        elif check_only:
            args += ("", "")
        if check_only:
            args.append("1")
        return args

    def store_commands(self, store: _Store, data: bytes | memoryview) -> list[Command]:
        """The store's MULTI: DECIDE opens the stream for the XADD (or does not: then the
        XADD fails on the poisoned last id), whose MAXLEN trims the ring to ``keep``, and
        XSETID closes it again. The bytes are the XADD's last argument (pack_store)."""
        source, received_at = codec.text_bytes(store.source), repr(store.seconds)
        return [("MULTI",), self.script(DECIDE, self.write_keys, self.decide_args(store, False, source, received_at)),
                ("XADD", self.stream_name, "NOMKSTREAM", "MAXLEN", store.keep, "*", b"s", source,
                 b"m", codec.text_bytes(store.mime_type), b"w", store.width, b"h", store.height,
                 b"t", store.timestamp_ms, b"f", store.frame_seq, b"r", received_at, b"n", store.now_ns, b"d", data),
                ("XSETID", self.stream_name, POISON), ("EXEC",)]

    def pack_store(self, store: _Store, data: bytes | memoryview) -> list[bytes | memoryview]:
        """A store's MULTI (store_commands) as the buffers to send, in order: everything
        before the frame's bytes, the bytes (never copied into another buffer: packing
        and joining copied a 1080p frame twice, which cost more than sending it), then
        XSETID and EXEC. What stays the same from one store of a stream to the next (the
        keys, the script, source, max_recent, min_interval, mime type, size) is packed
        once and kept; a store formats its instants, counts and proposed epoch only
        (packing every argument took 29 us of a producer's store between frames, this
        15 us)."""
        shape = (store.source, store.keep, store.min_ns, store.mime_type, store.width, store.height)
        kept = self.store_template
        if kept is None or kept[0] != shape:
            kept = self.store_template = (shape, store_template(self.store_commands(store, b"")))
        parts = kept[1]
        now_hi, now_lo = codec.split_ns(store.now_ns)
        at = repr(store.seconds).encode()
        values = (b"%d" % now_hi, b"%d" % now_lo, b"%d" % store.nbytes, at, codec.new_epoch().encode(),
                  b"%d" % store.timestamp_ms, b"%d" % store.frame_seq, at, b"%d" % store.now_ns)
        head = [parts[0]]
        for value, part in zip(values, parts[1:-1], strict=True):
            head.append(b"$%d\r\n%b\r\n" % (len(value), value))
            head.append(part)
        head.append(b"$%d\r\n" % len(data))
        return [b"".join(head), data, parts[-1]]

    def check_command(self, store: _Store) -> Command:
        """The rate check alone (counted when limited)."""
        return self.script(DECIDE, self.write_keys,
                           self.decide_args(store, True, codec.text_bytes(store.source), repr(store.seconds)))

    def change_command(self, script: Script, source: str, seconds: float) -> Command:
        return self.script(script, self.write_keys,
                           (codec.text_bytes(source), repr(seconds), self.activity_field, self.incarnation))

    def changed(self, reply: Any) -> None:
        if reply == 0:
            raise self.gone()

    def decided(self, reply: Any) -> int:
        """DECIDE's reply read: seq when accepted, 0 when rate-limited, -1 when a check
        found no limit."""
        if not isinstance(reply, int) or isinstance(reply, bool) or reply < GONE:
            raise RedisDataError(f"Redis at {masked(self.url)}: the store script of {self.stream!r} "
                                 f"answered {reply!r:.80}")
        if reply == GONE:
            raise self.gone()
        return reply

    def stored(self, replies: list[Any]) -> tuple[int, bytes | None] | None:
        """A store's replies read: (seq, epoch), seq 0 when rate-limited; None when the
        server had lost the script (nothing happened: load it and store again). The
        epoch is the XADD's id's: DECIDE opened the stream at it."""
        for reply in replies[:4]:
            self.reply(reply)
        results = self.reply(replies[4])
        if not isinstance(results, list) or len(results) != 3:
            raise RedisDataError(f"Redis at {masked(self.url)}: a store of {self.stream!r} answered "
                                 f"{results!r:.80}")
        decision, added, _ = results
        if _no_script(decision):
            return None
        seq = self.decided(self.reply(decision))
        if seq <= 0:
            return seq, None
        epoch, dash, number = added.partition(b"-") if isinstance(added, bytes) else (b"", b"", b"")
        if not dash or number != b"%d" % seq:
            raise RedisDataError(f"Redis at {masked(self.url)}: key {self.stream!r} took frame {seq} as "
                                 f"{added!r:.80}")
        return seq, codec.epoch(self.meta, epoch)

    def accepted(self, store: _Store, seq: int, epoch: bytes | None, subscribers: list[RedisQueue]) -> bool:
        """An accepted frame is offered to ``subscribers`` (this ring's, in accept order:
        the caller holds the ring's lock)."""
        if seq <= 0 or epoch is None:
            return False
        if subscribers:
            # The reader may have read it first: then its array is the frame's.
            payload = self.cache.share(epoch, seq, store.frame_bytes())
            frame = VisualFrame(payload, store.mime_type, store.width, store.height, store.source,
                                store.timestamp_ms, store.frame_seq, store.seconds)
            for q in subscribers:
                q.push_local(frame, seq, epoch)
        return True

    def stats_command(self) -> Command:
        return self.script(STATS, (self.stream_name, self.meta_name, self.sizes_name, self.activity_key),
                           (self.incarnation,))

    def stats(self, reply: Any) -> dict[str, int]:
        if reply is None:
            raise self.gone()
        if not isinstance(reply, list) or len(reply) != 5:
            raise RedisDataError(f"Redis at {masked(self.url)}: key {self.meta!r} gave {reply!r:.80}")
        accepted, rate_limited, resets, frames, nbytes = (
            codec.count(self.meta, name, raw) for name, raw in
            zip(("accepted", "rate_limited", "source_resets", "frames", "bytes"), reply, strict=True))
        return {"accepted": accepted, "rate_limited": rate_limited, "source_resets": resets, "frames": frames,
                "bytes": nbytes}

    def subscribe_command(self) -> Command:
        return self.script(OPEN, self.open_keys, (self.incarnation,))

    def look_command(self) -> Command:
        """The reader's look when idle: OPEN by its text (a reader never loads scripts)."""
        return ("EVAL", OPEN.text, len(self.open_keys), *self.open_keys, self.incarnation)

    def subscribed(self, reply: Any) -> tuple[int, bytes | None, bool]:
        """OPEN's reply read: accepted, epoch, ended; SessionNotFoundError when gone."""
        if reply is None:
            raise self.gone()
        if not isinstance(reply, list) or len(reply) != 3:
            raise RedisDataError(f"Redis at {masked(self.url)}: key {self.meta!r} gave {reply!r:.80}")
        return codec.count(self.meta, "accepted", reply[0]), codec.epoch(self.meta, reply[1]), reply[2] is not None

    def end_command(self) -> Command:
        return self.script(END, self.end_keys, (ENDED_KEEP_MS, self.incarnation))

    def ended(self, reply: Any) -> tuple[int, bytes | None]:
        """END's reply read: (0, None) when the incarnation was gone already (nothing to end
        there: a new session's frames are not this one's)."""
        if reply is None:
            return 0, None
        if not isinstance(reply, list) or len(reply) != 2:
            raise RedisDataError(f"Redis at {masked(self.url)}: key {self.meta!r} gave {reply!r:.80}")
        return codec.count(self.meta, "accepted", reply[0]), codec.epoch(self.meta, reply[1])

    def latest_commands(self) -> list[Command]:
        """The XRANGE of the ring; with an incarnation, in a MULTI after the check of it
        (an XRANGE through a script would copy every frame's bytes through Lua)."""
        read = ("XRANGE", self.stream_name, "-", "+")
        if not self.incarnation:
            return [read]
        return [("MULTI",), ("HGET", self.activity_key, "inc"), read, ("EXEC",)]

    def latest_entries(self, replies: list[Any]) -> Any:
        """The XRANGE's entries from latest_commands' replies."""
        if len(replies) == 1:
            return self.reply(replies[0])
        for reply in replies[:3]:
            self.reply(reply)
        results = self.reply(replies[3])
        if not isinstance(results, list) or len(results) != 2:
            raise RedisDataError(f"Redis at {masked(self.url)}: a read of {self.stream!r} answered {results!r:.80}")
        inc, entries = (self.reply(result) for result in results)
        if inc != self.incarnation:
            raise self.gone()
        return entries

    # -- readers -----------------------------------------------------------------------
    def reader_connection(self, retry: Any) -> Any:
        """A reader's own connection: the client's settings, a read timeout past the
        blocking read's, a read buffer for frames (READ_BUFFER_BYTES), and ``retry``
        (none: the reader retries itself, with backoff)."""
        pool = self.client.connection_pool
        kwargs = dict(pool.connection_kwargs)
        configured = kwargs.get("socket_timeout")
        kwargs["socket_timeout"] = READ_BLOCK_MS / 1000 + (configured if configured else 5.0)
        # (a client made elsewhere than _connect has redis-py's 64 KiB: a frame read takes
        # three reads of the socket)
        kwargs["socket_read_size"] = max(READ_BUFFER_BYTES, kwargs.get("socket_read_size") or 0)
        kwargs["retry"] = retry
        return pool.connection_class(**kwargs)

    def xread_args(self, q: RedisQueue, block_ms: int = READ_BLOCK_MS) -> Command:
        return ("XREAD", "COUNT", READ_COUNT, "BLOCK", block_ms, "STREAMS", self.stream_name, self.done_name,
                q.position(), "0-0")

    def deliver(self, q: RedisQueue, reply: Any) -> tuple[int, bytes | None] | None:
        """Book the frames of an XREAD reply; the end entry's (last, epoch) if it has one."""
        end: tuple[int, bytes | None] | None = None
        for name, entries in codec.stream_replies(reply):
            if name == self.stream_name:
                self.book(q, entries)
            elif name == self.done_name and entries:
                entry = entries[0]
                fields = codec.fields_of(entry[1]) if isinstance(entry, (list, tuple)) and len(entry) == 2 else {}
                try:
                    end = (codec.count(self.done, "last", fields.get(b"last")),
                           codec.epoch(self.done, fields.get(b"e")))
                except RedisDataError as exc:
                    log.warning("%s", exc)
                    end = (0, None)
        return end

    def book(self, q: RedisQueue, entries: Any) -> None:
        for entry in codec.entries_of(self.stream, entries):
            if not isinstance(entry, (list, tuple)) or len(entry) != 2:
                log.warning("Redis key %r: a read gave the entry %.80r", self.stream, entry)
                continue
            try:
                seq, era, frame = codec.entry(self.stream, entry[0], entry[1], self.cache)
            except RedisDataError as exc:
                # Not a frame: counted as dropped when its number can be read, else skipped.
                log.warning("%s", exc)
                try:
                    era, seq = codec.id_of(self.stream, entry[0])
                except RedisDataError:
                    continue
                q.push_read(None, seq, era)
                continue
            q.push_read(frame, seq, era)

    def checked(self, q: RedisQueue, reply: Any) -> bool:
        """The reader's look read (look_command): the queue follows a new epoch of its
        incarnation; False, with the queue ended, when the incarnation is gone (its end
        never came: the ending node died after its claim, or the id was used again
        first)."""
        try:
            _, epoch, _ = self.subscribed(reply)
        except SessionNotFoundError:
            q.end(0, None)
            return False
        if epoch != q.epoch:
            q.new_epoch(epoch)
        return True

    def new_epoch_in(self, q: RedisQueue, reply: Any) -> bool:
        """Whether an XREAD reply holds a frame of an epoch the queue is not in: made by
        a Redis restart, or by a new incarnation of the id, which the reader must check
        for before it books a frame of it."""
        if not self.incarnation:
            return False
        # (the ids of the queue's epoch told by their start: no id is parsed on the way)
        same = None if q.epoch is None else q.epoch + b"-"
        for name, entries in codec.stream_replies(reply):
            if name != self.stream_name:
                continue
            for entry in codec.entries_of(self.stream, entries):
                if same is not None and type(entry) is list and len(entry) == 2 and type(entry[0]) is bytes \
                        and entry[0].startswith(same):
                    continue
                if isinstance(entry, (list, tuple)) and len(entry) == 2:
                    try:
                        era, _ = codec.id_of(self.stream, entry[0])
                    except RedisDataError:
                        continue
                    if era != q.epoch:
                        return True
        return False

    def rest_args(self, q: RedisQueue, last: int, epoch: bytes | None) -> Command | None:
        """The XRANGE of frames accepted before the end that the reader has not read."""
        if epoch is None or q.epoch != epoch:
            return None
        start = q.seq_position() + 1
        era = epoch.decode()
        return None if start > last else ("XRANGE", self.stream_name, f"{era}-{start}", f"{era}-{last}")


# Where the arguments of a store's commands (store_commands) that change from store to
# store sit, by command: DECIDE's now (in two parts), nbytes, received_at and proposed
# epoch; the XADD's timestamp_ms, frame_seq, received_at, received ns and bytes, last.
# pack_store fills them in in this order.
_STORE_VARYING = {1: (7, 8, 11, 12, 13), 2: (15, 17, 19, 21, 23)}
# Replies to a store: MULTI's, one QUEUED per command, EXEC's.
STORE_REPLIES = 5


def _resp_argument(arg: object) -> bytes:
    """One argument of a command as RESP carries it (as redis-py and hiredis pack it)."""
    if isinstance(arg, bytes):
        return arg
    if isinstance(arg, str):
        return arg.encode()
    if isinstance(arg, int) and not isinstance(arg, bool):
        return b"%d" % arg
    raise TypeError(f"a store's command has the argument {arg!r}")


def store_template(commands: list[Command]) -> list[bytes]:
    """A store's commands packed in RESP, cut where an argument changes from store to
    store (_STORE_VARYING): the parts that go around those arguments; the last starts
    with the end of the bytes' line."""
    parts: list[bytes] = []
    run: list[bytes] = []
    for number, command in enumerate(commands):
        varying = _STORE_VARYING.get(number, ())
        run.append(b"*%d\r\n" % len(command))
        for index, arg in enumerate(command):
            if index in varying:
                parts.append(b"".join(run))
                run = []
            else:
                raw = _resp_argument(arg)
                run.append(b"$%d\r\n%b\r\n" % (len(raw), raw))
    parts.append(b"\r\n" + b"".join(run))
    return parts


def send_buffers(conn: Any, buffers: list[bytes | memoryview]) -> None:
    """Send ``buffers`` on a redis-py connection in one write: one sendmsg on a plain
    socket (no copy of a frame's bytes into a joined one), joined on any other (TLS has
    no sendmsg). Failures as redis-py's own send: the connection is dropped and the error
    is redis-py's."""
    import redis.exceptions as rx

    sock = getattr(conn, "_sock", None)
    if type(sock) is not socket.socket:
        conn.send_packed_command([b"".join(buffers)])  # connects, if it must, as redis-py does
        return
    try:
        conn.check_health()  # (which may connect again: the socket is read after it)
        sock = conn._sock
        if type(sock) is not socket.socket:
            raise rx.ConnectionError("the connection was lost in its health check")
        pending: list[bytes | memoryview] = list(buffers)
        while pending:
            sent = sock.sendmsg(pending)
            while pending and sent >= len(pending[0]):
                sent -= len(pending[0])
                pending.pop(0)
            if sent:  # a part of one: the rest of it, without copying it
                pending[0] = memoryview(pending[0])[sent:]
    except TimeoutError:  # (socket.timeout)
        conn.disconnect()
        raise rx.TimeoutError("Timeout writing to socket") from None
    except OSError as exc:
        conn.disconnect()
        raise rx.ConnectionError(f"Error while writing to socket: {exc}") from exc
    except BaseException:
        conn.disconnect()  # half a command may be on the wire
        raise


def read_replies(conn: Any, count: int) -> list[Any]:
    """The next ``count`` replies on a redis-py connection, an error reply as its
    exception (not raised). With hiredis, straight from its reader: redis-py's
    ``read_response`` costs about 2 us a reply in checks that a store's five replies
    (MULTI, three QUEUED, EXEC) do not need. Failures as redis-py's own: a lost
    connection or a timeout raises its ConnectionError or TimeoutError."""
    import redis.exceptions as rx

    parser: Any = getattr(conn, "_parser", None)
    reader = getattr(parser, "_reader", None)
    # What hiredis gives for "not a whole reply yet": False, or redis-py's own marker.
    incomplete = getattr(sys.modules.get(type(parser).__module__), "NOT_ENOUGH_DATA", False)
    if reader is None or not hasattr(parser, "read_from_socket"):  # (the pure-Python parser)
        replies = []
        for _ in range(count):
            try:
                replies.append(conn.read_response(disable_decoding=True))
            except rx.ResponseError as exc:
                replies.append(exc)
        return replies
    read = parser.read_from_socket
    gets = reader.gets
    replies = []
    while len(replies) < count:
        reply = gets(False)
        if reply is incomplete:
            read()
        elif isinstance(reply, rx.ConnectionError):
            raise reply
        else:
            replies.append(reply)
    return replies


def backoff(failures: int) -> float:
    return min(RECONNECT_MAX_S, RECONNECT_FIRST_S * float(1 << min(failures - 1, 16)))


def _command(conn: Any, *args: Any) -> Any:
    """One command's reply on a reader's connection (an error reply raised). Packed by
    hiredis (redis-py packs a command in Python: 3 us of a reader's XREAD) and read as
    a store's replies are (read_response's checks cost a frame's reader 2 us more)."""
    conn.send_packed_command(conn.pack_command(*args) if _pack_command is None else [_pack_command(args)])
    (reply,) = read_replies(conn, 1)
    if isinstance(reply, Exception):
        raise reply
    return reply


def _no_retry() -> Any:
    """A reader connection's retry: none (the reader retries itself, with backoff)."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return Retry(NoBackoff(), 0)


class _Reader:
    """A subscription's reader: the stream into the queue until it is closed. Its thread
    reads while nobody waits in the subscription's ``get``; a thread that waits there
    reads itself (``try_step``), so a frame reaches it without a hand-over from another
    thread (40-90 us on a loaded 2-core machine, and a wake-up per frame). Whoever reads
    holds ``lock``: one conversation on the connection at a time."""

    __slots__ = ("core", "q", "lock", "conn", "failures", "check", "looked_at", "lost", "refused", "__weakref__")

    def __init__(self, core: _Core, q: RedisQueue) -> None:
        import redis.exceptions as rx

        # What a step catches, looked up once (imports in the step cost each frame 1.5 us).
        self.lost: tuple[type[BaseException], ...] = (rx.ConnectionError, rx.TimeoutError, OSError)
        self.refused: tuple[type[BaseException], ...] = (rx.RedisError, RedisDataError)
        self.core = core
        self.q = q
        self.lock = threading.Lock()
        self.conn: Any = None
        self.failures = 0
        self.check = False
        self.looked_at = time.monotonic()

    def run(self) -> None:
        """The thread: steps while no reader waits in ``get`` (for CONSUMER_GRACE_S after
        one left: it is likely back at once), and after a failure whoever waits, with
        backoff (the waiting threads leave reconnecting to it). While it stands aside it
        sleeps on the queue's ``reader_cond``: woken by a failed read and by close, and
        looking again every READER_PARK_S while a thread waits."""
        q = self.q
        try:
            while not q.closed:
                with q.lock:
                    grace_left = q.consumer_left_at + CONSUMER_GRACE_S - time.monotonic()
                    # (closed looked at again under the lock: a close notifies under it)
                    if not q.closed and not self.failures and (q.consumers or grace_left > 0):
                        q.reader_cond.wait(READER_PARK_S if q.consumers else grace_left)
                        continue
                with self.lock:
                    if not self.step(READ_BLOCK_MS):
                        return
                    pause = self.pause()
                if pause:
                    _sleep(q, pause)
        finally:
            with self.lock:
                if self.conn is not None:
                    self.conn.disconnect()
                    self.conn = None

    def try_step(self, block_s: float) -> bool:
        """One read by a thread waiting in ``get``, if the connection is free and not
        failing; False when it did not read (the reader thread reads, or reconnects)."""
        if not self.lock.acquire(blocking=False):
            return False
        try:
            if self.q.closed or self.failures:
                return False
            self.step(max(1, int(block_s * 1000)))
            return True
        finally:
            self.lock.release()

    def pause(self) -> float:
        """How long to wait before the next step (backoff after failures)."""
        if self.failures:
            return backoff(self.failures)
        return 0.0

    def step(self, block_ms: int) -> bool:
        """One blocking read and what it brings (lock held); False once the queue ended."""
        core, q = self.core, self.q
        try:
            if self.conn is None:
                self.conn = core.reader_connection(_no_retry())
            conn = self.conn
            if self.check:
                if not core.checked(q, _command(conn, *core.look_command())):
                    return False
                self.check = False
                self.looked_at = time.monotonic()
            reply = _command(conn, *core.xread_args(q, block_ms))
            if core.new_epoch_in(q, reply) and not core.checked(q, _command(conn, *core.look_command())):
                return False
            end = core.deliver(q, reply)
            if end is not None:
                rest = core.rest_args(q, *end)
                if rest is not None:
                    core.book(q, _command(conn, *rest))
                q.end(*end)
                return False
            self.failures = 0
            # Idle: a look at the session (a new epoch; an incarnation gone without its
            # end) once per READ_BLOCK_MS, however short the reads of a polling get.
            self.check = reply is None and time.monotonic() - self.looked_at >= READ_BLOCK_MS / 1000
        except self.lost as exc:
            self._drop()
            self.failures += 1
            self.check = True
            if self.failures == 1:
                log.info("subscription to %r lost Redis at %s (%s); reconnecting", core.stream,
                         masked(core.url), exc)
            q.wake_reader()
        except self.refused as exc:
            log.warning("subscription to %r: %s", core.stream, exc)
            self.check = True
            self.failures = max(self.failures, RECONNECT_MAX_FAILURES)
            q.wake_reader()
        except BaseException:
            self._drop()  # cut off mid-conversation (an interrupt in a waiting get): not reused
            self.check = True
            raise
        return True

    def _drop(self) -> None:
        if self.conn is not None:
            self.conn.disconnect()
            self.conn = None


def _sleep(q: RedisQueue, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not q.closed:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, 0.05))


class RedisFrameRing:
    """A session's frames in Redis, with the pure ``FrameRing``'s visual methods.

    ``activity=(key, field)`` (optional) makes every accepted frame and every
    ``start_visual_input``/``stop_visual_input`` also set ``field`` of the hash ``key``
    to the instant (``repr`` of the float seconds), in the same script: the session's
    ``last_active_at``, touched as the in-process ring touches it. ``incarnation`` (with
    ``activity``: the session hash's ``inc`` this ring belongs to) makes every call check
    it first: once the hash holds another or none, the calls raise SessionNotFoundError
    and change nothing, and subscriptions end (see _frames_lua).
    """

    def __init__(self, client: Any, keys: SessionKeys, url: str, clock: Callable[[], float], *,
                 activity: tuple[str, str] | None = None, incarnation: str | None = None) -> None:
        self._core = _Core(client, keys, url, clock, activity, incarnation)
        self._lock = threading.RLock()
        self._busy = False
        self._subscribers: list[RedisQueue] = []
        self._ended = False
        self._fork_gen = _fork.generation
        self._own_connection: Any = None

    def __reduce_ex__(self, protocol: SupportsIndex) -> NoReturn:
        _refuse_copy(self, protocol)

    def __repr__(self) -> str:
        return f"<RedisFrameRing {self._core.stream!r} at {masked(self._core.url)}>"

    # -- plumbing ----------------------------------------------------------------------
    def _claim(self) -> None:
        check_not_forked(self._fork_gen)
        if self._busy:
            raise RuntimeError(REENTERED_MESSAGE)
        self._busy = True

    def _store_connection(self) -> Any:
        """The ring's own connection, for stores (made under the ring's lock, which every
        store holds): a pool's checkout and return cost 8 us, more than the rest of a
        store's client work. It is checked as the pool checks one it hands out: a
        connection with something to read (a reply nobody read, or the server closed it)
        is made again."""
        conn = self._own_connection
        if conn is None:
            pool = self._core.client.connection_pool
            conn = self._own_connection = pool.connection_class(**pool.connection_kwargs)
        else:
            try:
                stale = conn.can_read()
            except self._core.errors:
                stale = True
            if stale:
                conn.disconnect()
        return conn

    def _exchange(self, commands: Sequence[Command], packed: list[bytes | memoryview] | None = None,
                  own: bool = False, replies: int | None = None) -> list[Any]:
        """Send ``commands`` (``packed``: the buffers to send instead, which ask for
        ``replies`` replies) on one connection of the pool (``own``: the ring's own, with
        its lock held), in one write, and read every reply (an error reply is returned
        as its exception, not raised)."""
        core = self._core
        check_not_forked(self._fork_gen)
        pool = core.client.connection_pool
        try:
            conn = self._store_connection() if own else pool.get_connection()
        except core.errors as exc:
            raise core.failure(exc) from exc
        try:
            if packed is None:
                whole = pack(commands)
                conn.send_packed_command(conn.pack_commands(commands) if whole is None else [whole])
            else:
                send_buffers(conn, packed)
            return read_replies(conn, len(commands) if replies is None else replies)
        except BaseException as exc:
            conn.disconnect()  # half a conversation: the connection is not reused
            if isinstance(exc, core.errors):
                raise core.failure(exc) from exc
            raise
        finally:
            if not own:
                pool.release(conn)

    def _load(self) -> None:
        """Load every script (after the server lost them: a restart, SCRIPT FLUSH)."""
        for reply in self._exchange([("SCRIPT", "LOAD", script.text) for script in SCRIPTS.values()]):
            self._core.reply(reply)

    def _call(self, command: Command) -> Any:
        """One command; a script the server lost is loaded and run again."""
        (reply,) = self._exchange([command])
        if _no_script(reply):
            self._load()
            (reply,) = self._exchange([command])
        return self._core.reply(reply)

    # -- visual input ------------------------------------------------------------------
    def start_visual_input(self, source: str, now: float | None = None) -> None:
        source = v.text(source, "source")
        seconds, _ = self._core.read_now(now)
        self._change(START, source, seconds)

    def stop_visual_input(self, source: str = "", now: float | None = None) -> None:
        source = v.text(source, "source")
        seconds, _ = self._core.read_now(now)
        self._change(STOP, source, seconds)

    def _change(self, script: Script, source: str, seconds: float) -> None:
        with self._lock:
            self._claim()
            try:
                self._core.changed(self._call(self._core.change_command(script, source, seconds)))
            finally:
                self._busy = False

    def store_frame(
        self,
        data: Buffer | np.ndarray[Any, Any],
        *,
        source: str,
        max_recent: int,
        min_interval: float | datetime.timedelta = 0.0,
        mime_type: str = "",
        width: int = 0,
        height: int = 0,
        timestamp_ms: int = 0,
        frame_seq: int = 0,
        now: float | None = None,
    ) -> bool:
        """Store one frame's bytes (one copy, sent to Redis); False when rate-limited."""
        return self._store(data, source, max_recent, min_interval, mime_type, width, height, timestamp_ms,
                           frame_seq, now)

    def store_visual_frame(self, frame: VisualFrame, max_recent: int, min_interval: float | datetime.timedelta = 0.0,
                           now: float | None = None) -> bool:
        if not isinstance(frame, VisualFrame):
            raise TypeError(f"frame must be a VisualFrame, got {type(frame).__name__}")
        return self._store(frame.data, frame.source, max_recent, min_interval, frame.mime_type, frame.width,
                           frame.height, frame.timestamp_ms, frame.frame_seq, now)

    def _store(self, data: Any, source: Any, max_recent: Any, min_interval: Any, mime_type: Any, width: Any,
               height: Any, timestamp_ms: Any, frame_seq: Any, now: Any) -> bool:
        store = _prepare(self._core, data, source, max_recent, min_interval, mime_type, width, height, timestamp_ms,
                         frame_seq, now, copy=bool(self._subscribers))
        if store.error is not None:
            if store.min_ns > 0 and self._rate_limited(store):
                return False
            raise store.error
        try:
            return self._send(store)
        finally:
            store.release()

    def _store_loan(self, loan: FrameLoan, source: Any, max_recent: Any, min_interval: Any, mime_type: Any,
                    width: Any, height: Any, timestamp_ms: Any, frame_seq: Any, now: Any) -> bool:
        return self._send(_prepare_loan(self._core, loan, source, max_recent, min_interval, mime_type, width, height,
                                        timestamp_ms, frame_seq, now))

    def _rate_limited(self, store: _Store) -> bool:
        """The rate check alone (counted when limited), for bytes that cannot be read."""
        with self._lock:
            self._claim()
            try:
                seq = self._core.decided(self._call(self._core.check_command(store)))
            finally:
                self._busy = False
        return seq == 0

    def _send(self, store: _Store) -> bool:
        """Run a store's MULTI; False when rate-limited."""
        core = self._core
        with self._lock:
            self._claim()
            try:
                outcome = core.stored(self._exchange((), store.packed, own=True, replies=STORE_REPLIES))
                if outcome is None:
                    self._load()
                    outcome = core.stored(self._exchange((), store.packed, own=True, replies=STORE_REPLIES))
                    if outcome is None:
                        raise RedisUnavailableError(f"Redis at {masked(core.url)} keeps losing its scripts")
                subscribers = self._subscribers
                accepted = core.accepted(store, *outcome, subscribers)
                if any(q.closed for q in subscribers):
                    self._subscribers = [q for q in subscribers if not q.closed]
                return accepted
            finally:
                self._busy = False

    def loan_frame(self, nbytes: int) -> FrameLoan:
        """Writable memory for one frame of ``nbytes`` bytes (in this process); its
        commit() stores it as store_frame would."""
        size = v.integer(nbytes, "nbytes", 0, MAX_LOAN_BYTES)
        check_not_forked(self._fork_gen)
        return FrameLoan(_MAKE, self, size)

    # -- reads -------------------------------------------------------------------------
    def latest_visual_frames(self, ttl: float | datetime.timedelta, now: float | None = None) -> list[VisualFrame]:
        """Frames no older than ttl (inclusive), oldest first; [] when ttl <= 0."""
        ttl_ns = v.duration_ns(ttl, "ttl")
        _, now_ns = self._core.read_now(now)
        if ttl_ns <= 0:
            return []
        core = self._core
        return codec.latest(core.stream, core.latest_entries(self._exchange(core.latest_commands())), ttl_ns, now_ns,
                            core.cache)

    def visual_stats(self) -> dict[str, int]:
        """The cluster's counts: accepted, rate_limited, source_resets; frames, bytes."""
        core = self._core
        return core.stats(self._call(core.stats_command()))

    # -- subscribers -------------------------------------------------------------------
    def subscribe_visual_frames(self, buffer: int = 1, *, policy: str = "drop_newest") -> RedisSubscription:
        maxsize = v.count(buffer, "buffer")
        policy = v.policy(policy)
        core = self._core
        with self._lock:
            self._claim()
            try:
                accepted, epoch, ended = core.subscribed(self._call(core.subscribe_command()))
                # Frames accepted before now are not this subscriber's.
                q = RedisQueue(maxsize, policy, accepted, epoch)
                if self._ended or ended:
                    q.closed = True  # nothing would come: a reader finishes at once
                else:
                    self._subscribers = self._subscribers + [q]
                    reader = _Reader(core, q)
                    q.reader = reader
                    threading.Thread(target=reader.run, name=f"capsule-redis-sub {core.stream}", daemon=True).start()
            finally:
                self._busy = False
        return RedisSubscription(_MAKE, self, q)

    @property
    def subscriber_count(self) -> int:
        """This node's open subscriptions of this ring."""
        check_not_forked(self._fork_gen)
        with self._lock:
            return sum(1 for q in self._subscribers if not q.closed)

    def _remove_queue(self, q: Any) -> None:
        with self._lock:
            if self._busy:
                return
            self._subscribers = [other for other in self._subscribers if other is not q]

    def close_subscriptions(self) -> None:
        """End the session's frames on every node: each subscriber gets what was queued
        (a reader elsewhere first books what was accepted before the end), then
        SubscriptionClosed; subscriptions made afterwards start closed. This node's
        subscriptions are closed even when Redis cannot be reached (then the error is
        raised)."""
        core = self._core
        end: tuple[int, bytes | None] = (0, None)
        error: BaseException | None = None
        with self._lock:
            self._claim()
            try:
                end = core.ended(self._call(core.end_command()))
            except BaseException as exc:
                error = exc
            finally:
                self._ended = True
                subscribers, self._subscribers = self._subscribers, []
                self._busy = False
        for q in subscribers:
            q.end(*end)
        if error is not None:
            raise error


def _flat_view(data: Any) -> memoryview | None:
    """``data``'s bytes as a flat memoryview, when they are one C-contiguous run (None:
    they need the copy that gathers them, or cannot be read)."""
    try:
        view = memoryview(data)
    except (TypeError, ValueError, BufferError):
        return None
    try:
        if view.c_contiguous:
            return view if view.format == "B" and view.ndim == 1 else view.cast("B")
    except (TypeError, ValueError):
        pass
    view.release()
    return None


def _prepare(core: _Core, data: Any, source: Any, max_recent: Any, min_interval: Any, mime_type: Any, width: Any,
             height: Any, timestamp_ms: Any, frame_seq: Any, now: Any, copy: bool = True) -> _Store:
    """store_frame's checks, in the pure ring's order, then the one copy of the bytes
    (``copy=False``, when the ring has no local subscriber: into the command itself). A
    buffer that cannot be read is the store's ``error``: the pure ring reads the bytes
    after its rate check, so a rate-limited one is False there (and counted), whatever
    its bytes."""
    check_buffer(data)
    source = v.text(source, "source")
    keep = v.count(max_recent, "max_recent")
    min_ns = v.duration_ns(min_interval, "min_interval")
    mime_type, width, height, timestamp_ms, frame_seq = v.frame_fields(
        data, mime_type, width, height, timestamp_ms, frame_seq)
    seconds, now_ns = core.read_now(now)
    view = None if copy else _flat_view(data)
    if view is not None:
        return _Store(core, view, source, keep, min_ns, seconds, now_ns, mime_type, width, height, timestamp_ms,
                      frame_seq, None)
    try:
        payload = copy_bytes(data)
    except TypeError as exc:
        return _Store(core, None, source, keep, min_ns, seconds, now_ns, mime_type, width, height, timestamp_ms,
                      frame_seq, exc)
    return _Store(core, payload, source, keep, min_ns, seconds, now_ns, mime_type, width, height, timestamp_ms,
                  frame_seq, None)


def _prepare_loan(core: _Core, loan: FrameLoan, source: Any, max_recent: Any, min_interval: Any, mime_type: Any,
                  width: Any, height: Any, timestamp_ms: Any, frame_seq: Any, now: Any) -> _Store:
    """FrameLoan.commit: store_frame's checks (a loan is 1-D: no width or height is read
    from a shape), then the loan's bytes, copied once; the loan is finished."""
    source = v.text(source, "source")
    keep = v.count(max_recent, "max_recent")
    min_ns = v.duration_ns(min_interval, "min_interval")
    mime_type, width, height, timestamp_ms, frame_seq = v.frame_fields(
        None, mime_type, width, height, timestamp_ms, frame_seq)
    seconds, now_ns = core.read_now(now)
    memory = loan._take()
    payload = copy_bytes(memory)
    del memory
    return _Store(core, payload, source, keep, min_ns, seconds, now_ns, mime_type, width, height, timestamp_ms,
                  frame_seq, None)


def frame_keys(keys: SessionKeys) -> list[str]:
    """Every key a session's frames use (for a manager that resets an id it reuses)."""
    return [keys.key("frames"), keys.key("frames:meta"), keys.key("frames:sizes"), keys.key("frames:end")]


__all__ = ["AsyncFrameLoan", "AsyncRedisFrameRing", "RedisFrameRing", "frame_keys"]

# The asyncio twin, which builds on this module's core (imported last for that reason).
from ._frames_async import AsyncFrameLoan, AsyncRedisFrameRing  # noqa: E402
