"""What a session looks like in Redis, and the checks on every value read back.

No pickle anywhere: a session is a hash of decimal strings and UTF-8 text, its history
a list of JSON arrays, its dialog context one JSON array. Everything read back is
checked before it is used, and anything this library did not write (a corrupted value,
another program's key) is a ``RedisDataError`` naming the key, never a crash or a
wrong answer. Instants are stored as ``repr(float)`` (the exact float back, which the
scripts' Lua also parses exactly) and counters as decimal integers.

The session hash (``<namespace>:{<id>}:session``) holds:

    kind          KIND: tells our hashes from anything else under the same name
    id            the session id (a check against hash-tag collisions)
    inc           a random token per incarnation: a session deleted and made again
                  under the same id is a new one, and the old one's objects know it
    mode, character_id, created     as given to create()
    active        last_active_at: every touch writes it (frames too, docs/redis.md)
    state, owner  set_state(), set_owner_id()
    pseq, pfin    the current pipeline, and the last one finished while current
    tseq          the current turn
    greeted       1 once try_start_voice_startup_greeting() returned True
    ended         1 once a delete/eviction claimed the session (out of the registry)
    closed        1 once the ending node set CLOSED after on_session_end
"""

from __future__ import annotations

import json
import os
import random
import re
from typing import NamedTuple

from .. import _validate as v
from .._limits import INT64_MAX, INT64_MIN, MAX_INSTANT_SECONDS
from .._records import ChatMessage, DialogContextItem, PipelineMode, SessionState
from ._errors import RedisDataError

KIND = "capsule_sessions.session/1"
# The incarnation token: 64 random bits in hex (new_inc()).
INC_BYTES = 8
_INC = re.compile(f"[0-9a-f]{{{INC_BYTES * 2}}}")
# Seeded from the OS once (and again in a forked child), so every node draws its own
# sequence: a token tells one incarnation of an id from the next, it guards no secret,
# and os.urandom on every create would cost more than the rest of the call.
_tokens = random.Random(os.urandom(32))
os.register_at_fork(after_in_child=lambda: _tokens.seed(os.urandom(32)))


def new_inc() -> str:
    return f"{_tokens.getrandbits(INC_BYTES * 8):0{INC_BYTES * 2}x}"
FIELDS = ("kind", "id", "inc", "mode", "character_id", "created", "active", "state", "owner", "pseq", "pfin",
          "tseq", "greeted", "ended", "closed")


class Record(NamedTuple):
    """One session hash, checked."""

    id: str
    inc: str
    mode: PipelineMode
    character_id: str
    created: float
    active: float
    state: SessionState
    owner: str
    pseq: int
    pfin: int
    tseq: int
    greeted: bool
    ended: bool
    closed: bool


def instant_text(seconds: float) -> str:
    return repr(float(seconds))


def _bad(key: str, what: str) -> RedisDataError:
    return RedisDataError(f"{key} holds {what}: it was not written by capsule_sessions (corrupted or foreign)")


def text_of(raw: object, key: str, field: str) -> str:
    if not isinstance(raw, bytes):
        raise _bad(key, f"no {field}")
    try:
        return raw.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        raise _bad(key, f"a {field} that is not UTF-8") from None


# What str(int) writes, and nothing else (int() would also take " 12", "1_000", "+1").
_INTEGER = re.compile(rb"-?(?:0|[1-9][0-9]{0,18})")


def integer_of(raw: object, key: str, field: str, low: int = INT64_MIN, high: int = INT64_MAX) -> int:
    if type(raw) is bytes and _INTEGER.fullmatch(raw) and raw != b"-0":
        number = int(raw)
        if low <= number <= high:
            return number
    if not isinstance(raw, bytes):
        raise _bad(key, f"no {field}")
    raise _bad(key, f"a {field} that is not a decimal integer in range ({raw[:40]!r})")


def instant_of(raw: object, key: str, field: str) -> float:
    """An instant as instant_text wrote it: the repr of a finite float in v.instant's range."""
    if type(raw) is bytes:
        try:
            seconds = float(raw)
        except ValueError:
            pass
        else:
            # NaN fails the range test; repr() tells the exact text from any other spelling.
            if -MAX_INSTANT_SECONDS < seconds < MAX_INSTANT_SECONDS and repr(seconds).encode() == raw:
                return seconds
        raise _bad(key, f"a {field} that is not an instant ({raw[:40]!r})")
    raise _bad(key, f"no {field}")


def flag_of(raw: object, key: str, field: str) -> bool:
    if raw == b"0":
        return False
    if raw == b"1":
        return True
    return bool(integer_of(raw, key, field, 0, 1))  # raises, naming what is there


_MODES = {str(int(m)).encode(): m for m in PipelineMode}
_STATES = {str(int(s)).encode(): s for s in SessionState}
_KIND = KIND.encode()


def record_of(values: dict[bytes, bytes], key: str, session_id: str) -> Record:
    """The checked record of a non-empty session hash."""
    get = values.get
    if get(b"kind") != _KIND:
        raise _bad(key, "a hash that is not a capsule_sessions session")
    found = text_of(get(b"id"), key, "id")
    if found != session_id:
        raise _bad(key, f"the session {found[:40]!r}, not {session_id[:40]!r}")
    inc = text_of(get(b"inc"), key, "inc")
    if not _INC.fullmatch(inc):
        raise _bad(key, f"an inc that is not {INC_BYTES * 2} hex digits ({inc[:40]!r})")
    mode = _MODES.get(get(b"mode"))  # type: ignore[arg-type]
    if mode is None:
        integer_of(get(b"mode"), key, "mode", 0, 1)
        raise _bad(key, "a mode out of range")
    state = _STATES.get(get(b"state"))  # type: ignore[arg-type]
    if state is None:
        integer_of(get(b"state"), key, "state", 0, 5)
        raise _bad(key, "a state out of range")
    return Record(
        found, inc, mode, text_of(get(b"character_id"), key, "character_id"),
        instant_of(get(b"created"), key, "created"), instant_of(get(b"active"), key, "active"), state,
        text_of(get(b"owner"), key, "owner"), integer_of(get(b"pseq"), key, "pseq"),
        integer_of(get(b"pfin"), key, "pfin"), integer_of(get(b"tseq"), key, "tseq"),
        flag_of(get(b"greeted"), key, "greeted"), flag_of(get(b"ended"), key, "ended"),
        flag_of(get(b"closed"), key, "closed"),
    )


def pairs(flat: object, key: str) -> dict[bytes, bytes]:
    """A script's HGETALL reply (a flat list) as a dict."""
    if not isinstance(flat, list) or len(flat) % 2:
        raise _bad(key, "a reply that is not a hash")
    items = iter(flat)
    return dict(zip(items, items, strict=True))


# -- history: one JSON array per message, [turn, role, content, timestamp] -------------
# The turn comes first and as a string, so the add_message script finds a turn's last
# message by a prefix ('["7"') without decoding JSON or losing digits to Lua's doubles.
def message_text(msg: ChatMessage) -> str:
    assert msg.timestamp is not None
    return json.dumps([str(msg.turn_seq), msg.role, msg.content, instant_text(msg.timestamp)],
                      separators=(",", ":"))


def turn_prefix(turn_seq: int) -> str:
    return f'["{turn_seq}"'


def message_of(raw: object, key: str) -> ChatMessage:
    text = text_of(raw, key, "message")
    try:
        items = json.loads(text)
    except ValueError:
        raise _bad(key, "a message that is not JSON") from None
    if not (isinstance(items, list) and len(items) == 4 and all(isinstance(i, str) for i in items)):
        raise _bad(key, "a message that is not [turn, role, content, timestamp]")
    turn, role, content, stamp = items
    return ChatMessage(role, content, instant_of(stamp.encode("utf-8", "surrogatepass"), key, "message timestamp"),
                       integer_of(turn.encode("utf-8", "surrogatepass"), key, "message turn"))


def history_of(raw: object, key: str) -> list[ChatMessage]:
    if not isinstance(raw, list):
        raise _bad(key, "a history that is not a list")
    return [message_of(item, key) for item in raw]


# -- dialog context: one JSON array of [role, text, timestamp] ------------------------
def dialog_item(item: DialogContextItem) -> list[str]:
    """One item's stored form. The in-process Session keeps any objects; a stored one is
    JSON, so its fields must be what the record says (TypeError naming the field)."""
    return [v.text(item.role, "item.role"), v.text(item.text, "item.text"),
            str(v.integer(item.timestamp, "item.timestamp"))]


def dialog_text(items: list[list[str]]) -> str:
    return json.dumps(items, separators=(",", ":"))


def dialog_of(raw: object, key: str) -> list[DialogContextItem]:
    if raw is None:
        return []
    text = text_of(raw, key, "dialog context")
    try:
        items = json.loads(text)
    except ValueError:
        raise _bad(key, "a dialog context that is not JSON") from None
    if not isinstance(items, list):
        raise _bad(key, "a dialog context that is not a list")
    out = []
    for item in items:
        if not (isinstance(item, list) and len(item) == 3 and all(isinstance(i, str) for i in item)):
            raise _bad(key, "a dialog context item that is not [role, text, timestamp]")
        stamp = integer_of(item[2].encode("utf-8", "surrogatepass"), key, "item timestamp")
        out.append(DialogContextItem(item[0], item[1], stamp))
    return out
