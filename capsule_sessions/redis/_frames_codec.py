"""What a stream entry of a session's frames holds, written and read back (``_frames.py``).

An entry is a flat map of short fields, the frame's bytes raw (no pickle, nothing
encoded): ``d`` data, ``s`` source, ``m`` mime type (UTF-8, surrogates passed through,
as any ``str`` is stored), ``w`` width, ``h`` height, ``t`` timestamp_ms, ``f`` frame_seq
(decimal integers), ``r`` received_at (``repr`` of the float, which reads back exactly),
``n`` received_at in int64 nanoseconds (what TTLs compare). Its id is
``<epoch>-<seq>``: the epoch (a number in [2**62, 2**63): one life of the session's
keys) and the session's accept number. Everything is checked when read back: an entry
this library did not write is a RedisDataError naming the key.
"""

from __future__ import annotations

import os
import random
import re
import threading
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from .._limits import INT32_MAX, INT64_MAX, INT64_MIN, MAX_INSTANT_SECONDS
from .._records import VisualFrame
from ._errors import RedisDataError

NS = 1_000_000_000
FIELDS = frozenset((b"d", b"s", b"m", b"w", b"h", b"t", b"f", b"r", b"n"))
EPOCH_LOW, EPOCH_HIGH = 2**62, 2**63
_ID = re.compile(rb"([1-9][0-9]{18})-([1-9][0-9]{0,18})")
_EPOCH = re.compile(rb"[1-9][0-9]{18}")
_INT = re.compile(rb"-?(?:0|[1-9][0-9]{0,18})")
# The order store_commands writes an entry's fields in: an entry read back in it is read
# without a dict of its fields (a frame's decode is on every subscriber's path).
ORDER = [b"s", b"m", b"w", b"h", b"t", b"f", b"r", b"n", b"d"]
# A Cache sweeps its dead references once it holds this many more entries than it last
# kept alive.
SWEEP_MIN = 64



_random = random.Random()  # an epoch is no secret, only fresh
os.register_at_fork(after_in_child=_random.seed)  # a child proposes epochs of its own


class Cache:
    """The arrays of the frames this process holds, by (epoch, seq): a frame read twice
    (by latest_visual_frames, by subscribers, by the node that stored it) is handed out
    as one array, as the in-process ring shares one array between all its readers. The
    first array of a frame stays its array while anything holds it.

    Plain weak references, swept of dead ones as the table doubles: a
    WeakValueDictionary's keyed references and their callbacks cost a reader 2 us per
    frame, more than the rest of its decode."""

    __slots__ = ("_refs", "_lock", "_sweep_at")

    def __init__(self) -> None:
        self._refs: dict[tuple[bytes, int], weakref.ref[np.ndarray[Any, Any]]] = {}
        self._lock = threading.Lock()
        self._sweep_at = SWEEP_MIN

    def share(self, era: bytes, seq: int, array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        key = (era, seq)
        with self._lock:
            ref = self._refs.get(key)
            if ref is not None:
                held = ref()
                if held is not None and held.nbytes == array.nbytes:
                    return held
            self._refs[key] = weakref.ref(array)
            if len(self._refs) > self._sweep_at:
                self._refs = {k: r for k, r in self._refs.items() if r() is not None}
                self._sweep_at = 2 * len(self._refs) + SWEEP_MIN
            return array

    def __len__(self) -> int:
        """Entries held, dead ones included until the next sweep."""
        return len(self._refs)


def text_bytes(value: str) -> bytes:
    return value.encode("utf-8", "surrogatepass")


def split_ns(ns: int) -> tuple[int, int]:
    """An instant or duration in ns as (ns // 1e9, ns % 1e9), exact in Lua's doubles."""
    return divmod(ns, NS)


def _fail(key: str, what: str) -> RedisDataError:
    return RedisDataError(f"Redis key {key!r} does not hold frames of capsule_sessions: {what}")


def integer(key: str, name: str, raw: object, low: int = INT64_MIN, high: int = INT64_MAX) -> int:
    if not isinstance(raw, bytes) or not _INT.fullmatch(raw):
        raise _fail(key, f"{name} is {raw!r}, not an integer")
    value = int(raw)
    if not low <= value <= high:
        raise _fail(key, f"{name} is {value}, out of range")
    return value


def count(key: str, name: str, raw: object) -> int:
    """A counter of the meta hash (absent: 0)."""
    if raw is None:
        return 0
    if isinstance(raw, int) and not isinstance(raw, bool):  # an integer reply
        raw = str(raw).encode()
    return integer(key, name, raw, 0, INT64_MAX)


def new_epoch() -> str:
    """A fresh epoch: random, so a restarted server's frames are told from the last ones
    (proposed by every store, taken by the first after the keys were lost)."""
    return str(EPOCH_LOW + _random.getrandbits(62))


def epoch(key: str, raw: object) -> bytes | None:
    """An epoch as the meta hash or a reply holds it (absent or empty: None)."""
    if raw is None or raw == b"":
        return None
    if not isinstance(raw, bytes) or not _EPOCH.fullmatch(raw) or not EPOCH_LOW <= int(raw) < EPOCH_HIGH:
        raise _fail(key, f"epoch is {raw!r}")
    return raw


def _text(key: str, name: str, raw: object) -> str:
    if not isinstance(raw, bytes):
        raise _fail(key, f"{name} is not a string")
    try:
        return raw.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        raise _fail(key, f"{name} is not UTF-8") from None


def fields_of(raw: object) -> dict[bytes, Any]:
    """An entry's fields: a dict (redis-py's parsed reply) or a flat list (a raw one)."""
    if isinstance(raw, dict):
        return raw
    if isinstance(raw, (list, tuple)) and len(raw) % 2 == 0:
        it = iter(raw)
        return dict(zip(it, it, strict=True))
    return {}


def id_of(key: str, entry_id: object) -> tuple[bytes, int]:
    """An entry id as (epoch, seq)."""
    if not isinstance(entry_id, bytes):
        raise _fail(key, f"entry id {entry_id!r}")
    match = _ID.fullmatch(entry_id)
    if match is None or not EPOCH_LOW <= int(match.group(1)) < EPOCH_HIGH:
        raise _fail(key, f"entry id {entry_id!r} is not <epoch>-<seq>")
    return match.group(1), int(match.group(2))


def _number(raw: object, low: int, high: int) -> int | None:
    """A decimal integer as this library writes it (no sign but '-', no zeros in front,
    no spaces or '_'), within [low, high]; else None. Cheaper than a pattern: entries are
    read on every frame."""
    try:
        value: int = int(raw)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None
    if not isinstance(raw, bytes) or b"%d" % value != raw or not low <= value <= high:
        return None
    return value


_NS_LOW, _NS_HIGH = -(2**62), 2**62


def received_ns(key: str, raw: object) -> int:
    """An entry's received ns from its raw ``n`` field."""
    ns = _number(raw, _NS_LOW, _NS_HIGH)
    if ns is None:
        raise _fail(key, f"received ns is {raw!r:.40}, not an integer")
    return ns


def decode(key: str, entry_id: object, fields: dict[bytes, Any], cache: Cache,
           ns: int | None = None) -> tuple[int, bytes, VisualFrame]:
    """One entry as (seq, epoch, frame) (``ns``: its received ns, already read); a
    RedisDataError naming ``key`` when it is not one this library wrote."""
    if fields.keys() != FIELDS:
        id_of(key, entry_id)  # a bad id is named before bad fields, as _frame names it first
        raise _fail(key, f"entry {entry_id!r} has the fields {sorted(fields)}")
    return _frame(key, entry_id, fields[b"s"], fields[b"m"], fields[b"w"], fields[b"h"], fields[b"t"], fields[b"f"],
                  fields[b"r"], fields[b"n"], fields[b"d"], cache, ns)


def entry(key: str, entry_id: object, raw: object, cache: Cache) -> tuple[int, bytes, VisualFrame]:
    """decode() of an entry's fields as a read gave them: a flat list in ORDER (as this
    library writes them) is read as it is; anything else through fields_of."""
    if type(raw) is list and len(raw) == 18 and raw[0::2] == ORDER:
        source, mime, width, height, timestamp, seq, at, ns, data = raw[1::2]
        return _frame(key, entry_id, source, mime, width, height, timestamp, seq, at, ns, data, cache)
    return decode(key, entry_id, fields_of(raw), cache)


def _frame(key: str, entry_id: object, raw_source: object, raw_mime: object, raw_width: object, raw_height: object,
           raw_timestamp: object, raw_seq: object, raw_at: object, raw_ns: object, data: object,
           cache: Cache, ns: int | None = None) -> tuple[int, bytes, VisualFrame]:
    era, seq = id_of(key, entry_id)
    if not isinstance(data, bytes):
        raise _fail(key, f"entry {entry_id!r} data is not a string")
    source = _text(key, "source", raw_source)
    mime_type = _text(key, "mime_type", raw_mime)
    width = _number(raw_width, 0, INT32_MAX)
    height = _number(raw_height, 0, INT32_MAX)
    timestamp_ms = _number(raw_timestamp, INT64_MIN, INT64_MAX)
    frame_seq = _number(raw_seq, INT64_MIN, INT64_MAX)
    if width is None or height is None or timestamp_ms is None or frame_seq is None:
        raise _fail(key, f"entry {entry_id!r} has a width, height, timestamp_ms or frame_seq that is not an "
                         f"integer in range: {[raw_width, raw_height, raw_timestamp, raw_seq]!r:.120}")
    try:
        received_at = float(raw_at)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise _fail(key, f"entry {entry_id!r} received_at is {raw_at!r}") from None
    if ns is None:
        ns = received_ns(key, raw_ns)
    if (repr(received_at).encode() != raw_at or not abs(received_at) < MAX_INSTANT_SECONDS
            or int(received_at * 1e9) != ns):
        raise _fail(key, f"entry {entry_id!r} received_at {raw_at!r} does not match its {ns} ns")
    array = cache.share(era, seq, np.frombuffer(data, dtype=np.uint8))
    return seq, era, VisualFrame(array, mime_type, width, height, source, timestamp_ms, frame_seq, received_at)


def entries_of(key: str, reply: object) -> Sequence[Any]:
    if reply is None:
        return ()
    if not isinstance(reply, (list, tuple)):
        raise _fail(key, f"a read gave {type(reply).__name__}")
    return reply


def latest(key: str, reply: object, ttl_ns: int, now_ns: int, cache: Cache) -> list[VisualFrame]:
    """The frames of an XRANGE reply no older than ttl_ns at now_ns, oldest first."""
    frames = []
    for entry in entries_of(key, reply):
        if not isinstance(entry, (list, tuple)) or len(entry) != 2:
            raise _fail(key, f"a read gave the entry {entry!r:.80}")
        fields = fields_of(entry[1])
        ns = received_ns(key, fields.get(b"n"))
        if now_ns - ns <= ttl_ns:
            frames.append(decode(key, entry[0], fields, cache, ns)[2])
    return frames


def stream_replies(reply: object) -> Iterable[tuple[bytes, Any]]:
    """XREAD's reply as (stream name, entries) pairs (a RESP2 list or a RESP3 map)."""
    if reply is None:
        return ()
    if isinstance(reply, dict):
        return reply.items()
    out = []
    for item in reply if isinstance(reply, (list, tuple)) else ():
        if isinstance(item, (list, tuple)) and len(item) == 2:
            out.append((item[0], item[1]))
    return out
