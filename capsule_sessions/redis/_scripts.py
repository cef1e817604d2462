"""The Lua scripts: every change that reads before it writes, or writes more than one
field or key, is one script, so Redis runs it atomically (no other client's command
runs in between) and a node that dies mid-call leaves either all of it or none.

KEYS of one session share its hash tag (``_keys``); the registry's keys have a tag of
their own. On one server (with replicas or Sentinel) the two scripts that change
membership, CREATE and CLAIM, name keys of both. Redis Cluster refuses a script whose
keys are in two slots, so there membership changes in steps, each one script of one
slot (PREPARE, ACQUIRE, CONFIRM for a create; CLAIM_ONE, RELEASE for an end; docs/redis.md,
"Redis Cluster"). Every other script names one session's keys only.

Lua numbers are doubles: counters are returned as the strings Redis keeps (never
through a Lua number), and instants are compared in Lua only where Python compares them
as floats too (idle time), from the exact ``repr`` strings Python sent.

Every per-session script takes the incarnation token (``inc``) first and does nothing
(returns false) when the session's hash holds another one or none: an object of an
ended session never writes into a new session of the same id.
"""

from __future__ import annotations

import hashlib
from typing import Any

# A script that writes a secondary key of an ended session (its hash has a TTL) gives
# that key the same TTL, so nothing of an ended session outlives it.
_SAME_TTL = """
local function same_ttl(from, to)
  local ttl = redis.call('PTTL', from)
  if ttl > 0 then redis.call('PEXPIRE', to, ttl) end
end
"""

# KEYS: registry, session hash, history, dialog, the ring's keys...
# ARGV: id, max_concurrent, kind, inc, mode, character_id, now
CREATE = """
local registry, session = KEYS[1], KEYS[2]
if redis.call('ZCARD', registry) >= tonumber(ARGV[2]) then return 'max' end
if redis.call('ZSCORE', registry, ARGV[1]) then return 'exists' end
-- (A key of another type makes HGET fail with WRONGTYPE: a RedisDataError too.)
local kind = redis.call('HGET', session, 'kind')
if kind and kind ~= ARGV[3] then return 'foreign' end
if not kind and redis.call('EXISTS', session) == 1 then return 'foreign' end
-- What an ended session of this id left behind (kept for a while, docs/redis.md) goes now.
redis.call('DEL', unpack(KEYS, 2))
local last = redis.call('ZRANGE', registry, -1, -1, 'WITHSCORES')
local order = 1
if last[2] then order = tonumber(last[2]) + 1 end
redis.call('HSET', session, 'kind', ARGV[3], 'id', ARGV[1], 'inc', ARGV[4], 'mode', ARGV[5],
  'character_id', ARGV[6], 'created', ARGV[7], 'active', ARGV[7], 'state', '0', 'owner', '',
  'pseq', '0', 'pfin', '0', 'tseq', '0', 'greeted', '0', 'ended', '0', 'closed', '0')
redis.call('ZADD', registry, order, ARGV[1])
return 'ok'
"""

# The atomic claim of delete(), close() and idle eviction: exactly one caller in the
# cluster gets the record back and runs on_session_end.
# KEYS: registry, session hash, history, dialog, the ring's keys...
# ARGV: id, kind, idle ('1': only when now - active > idle_timeout), now, idle_timeout,
#       retention_ms
CLAIM = """
local registry, session = KEYS[1], KEYS[2]
if not redis.call('ZSCORE', registry, ARGV[1]) then return false end
if redis.call('HGET', session, 'kind') ~= ARGV[2] or redis.call('HGET', session, 'ended') ~= '0' then
  -- The registry names a session whose hash is gone or not ours: the name is freed.
  redis.call('ZREM', registry, ARGV[1])
  return 'gone'
end
if ARGV[3] == '1' then
  local active = tonumber(redis.call('HGET', session, 'active'))
  if active == nil then return 'corrupt' end
  if not (tonumber(ARGV[4]) - active > tonumber(ARGV[5])) then return false end
end
redis.call('ZREM', registry, ARGV[1])
redis.call('HSET', session, 'ended', '1')
for i = 2, #KEYS do redis.call('PEXPIRE', KEYS[i], ARGV[6]) end
return redis.call('HGETALL', session)
"""

# -- Redis Cluster: membership in steps of one slot each ---------------------------------
# The registry (its zset, and a hash of each registered id's incarnation) is the count
# and the list; a session's hash says whether that incarnation is live. A create writes
# the hash as pending first (so no other node can make the id), then takes a place in
# the registry, then confirms the hash; an end claims the hash (exactly one caller),
# then frees the place. A node that dies between two steps leaves a pending hash, which
# expires, or a registry entry whose hash is not live, which the next node to look frees
# (RELEASE, compare-and-swap on the incarnation: docs/redis.md, "Redis Cluster").

# KEYS: session hash, history, dialog, the ring's keys...
# ARGV: id, kind, inc, mode, character_id, now, pending_ms
PREPARE = """
local session = KEYS[1]
local kind = redis.call('HGET', session, 'kind')
if kind and kind ~= ARGV[2] then return 'foreign' end
if not kind and redis.call('EXISTS', session) == 1 then return 'foreign' end
if kind and redis.call('HGET', session, 'ended') ~= '1' then return 'exists' end
redis.call('DEL', unpack(KEYS))
redis.call('HSET', session, 'kind', ARGV[2], 'id', ARGV[1], 'inc', ARGV[3], 'mode', ARGV[4],
  'character_id', ARGV[5], 'created', ARGV[6], 'active', ARGV[6], 'state', '0', 'owner', '',
  'pseq', '0', 'pfin', '0', 'tseq', '0', 'greeted', '0', 'ended', '0', 'closed', '0', 'pending', '1')
redis.call('PEXPIRE', session, ARGV[7])
return 'ok'
"""

# KEYS: registry, incs. ARGV: id, inc, max_concurrent, '1' to replace a stale place,
# the incarnation registered there ('' for none). {'ok'}, {'max'}, or {'exists', the
# registered incarnation}.
ACQUIRE = """
local registry, incs = KEYS[1], KEYS[2]
local other = redis.call('HGET', incs, ARGV[1]) or ''
if redis.call('ZSCORE', registry, ARGV[1]) then
  if ARGV[4] ~= '1' or other ~= ARGV[5] then return {'exists', other} end
elseif redis.call('ZCARD', registry) >= tonumber(ARGV[3]) then
  return {'max'}
end
local last = redis.call('ZRANGE', registry, -1, -1, 'WITHSCORES')
local order = 1
if last[2] then order = tonumber(last[2]) + 1 end
redis.call('ZADD', registry, order, ARGV[1])
redis.call('HSET', incs, ARGV[1], ARGV[2])
return {'ok'}
"""

# KEYS: session hash. ARGV: inc. 1 when the pending hash is this incarnation's and is now
# live; 0 when it is not (it expired: the create took longer than its pending time).
CONFIRM = """
local found = redis.call('HMGET', KEYS[1], 'inc', 'pending')
if found[1] ~= ARGV[1] or not found[2] then return 0 end
redis.call('HDEL', KEYS[1], 'pending')
redis.call('PERSIST', KEYS[1])
return 1
"""

# A create that failed takes its pending hash back. KEYS: session hash. ARGV: inc.
ABANDON = """
local found = redis.call('HMGET', KEYS[1], 'inc', 'pending')
if found[1] == ARGV[1] and found[2] then redis.call('DEL', KEYS[1]) end
return 1
"""

# Frees a registry place, only if it is still this incarnation's. KEYS: registry, incs.
# ARGV: id, inc ('' for a place without a recorded incarnation).
RELEASE = """
local registry, incs = KEYS[1], KEYS[2]
local found = redis.call('HGET', incs, ARGV[1])
if (found or '') ~= ARGV[2] then return 0 end
redis.call('ZREM', registry, ARGV[1])
redis.call('HDEL', incs, ARGV[1])
return 1
"""

# CLAIM on the session's slot alone: exactly one caller gets the record back.
# KEYS: session hash, history, dialog, the ring's keys...
# ARGV: kind, idle ('1': only when now - active > idle_timeout), now, idle_timeout, retention_ms
CLAIM_ONE = """
local session = KEYS[1]
local found = redis.call('HMGET', session, 'kind', 'ended', 'pending', 'active')
if found[1] ~= ARGV[1] or found[2] ~= '0' or found[3] then return false end
if ARGV[2] == '1' then
  local active = tonumber(found[4])
  if active == nil then return 'corrupt' end
  if not (tonumber(ARGV[3]) - active > tonumber(ARGV[4])) then return false end
end
redis.call('HSET', session, 'ended', '1')
for i = 1, #KEYS do redis.call('PEXPIRE', KEYS[i], ARGV[5]) end
return redis.call('HGETALL', session)
"""

# KEYS: session hash. ARGV: inc, then field, value pairs.
SET = """
if redis.call('HGET', KEYS[1], 'inc') ~= ARGV[1] then return false end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
return 1
"""

# manager.touch(id): whichever incarnation is live (on Redis Cluster, not one being made).
# KEYS: session hash. ARGV: kind, now.
TOUCH_LIVE = """
local found = redis.call('HMGET', KEYS[1], 'kind', 'ended', 'pending')
if found[1] ~= ARGV[1] or found[2] ~= '0' or found[3] then return 0 end
redis.call('HSET', KEYS[1], 'active', ARGV[2])
return 1
"""

# KEYS: session hash. ARGV: inc, field, now ('' for no touch). The new count, as text.
INCREMENT = """
if redis.call('HGET', KEYS[1], 'inc') ~= ARGV[1] then return false end
redis.call('HINCRBY', KEYS[1], ARGV[2], 1)
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'active', ARGV[3]) end
return redis.call('HGET', KEYS[1], ARGV[2])
"""

# A stale (not current) or repeated seq changes nothing. KEYS: session hash.
# ARGV: inc, seq, channel.
FINISH = """
if redis.call('HGET', KEYS[1], 'inc') ~= ARGV[1] then return false end
local found = redis.call('HMGET', KEYS[1], 'pseq', 'pfin')
if found[1] ~= '0' and found[1] == ARGV[2] and found[2] ~= ARGV[2] then
  redis.call('HSET', KEYS[1], 'pfin', ARGV[2])
  redis.call('PUBLISH', ARGV[3], ARGV[2])
end
return 1
"""

# KEYS: session hash. ARGV: inc, now. 1 the first time, 0 after.
GREET = """
if redis.call('HGET', KEYS[1], 'inc') ~= ARGV[1] then return false end
if redis.call('HGET', KEYS[1], 'greeted') == '1' then return 0 end
redis.call('HSET', KEYS[1], 'greeted', '1', 'active', ARGV[2])
return 1
"""

# An assistant message of turn N > 0 goes right after the last message of turn N
# (found by its '["N"' prefix); anything else is appended.
# KEYS: session hash, history. ARGV: inc, now, turn prefix ('' to append), message.
ADD_MESSAGE = _SAME_TTL + """
if redis.call('HGET', KEYS[1], 'inc') ~= ARGV[1] then return false end
local history = KEYS[2]
local placed = false
if ARGV[3] ~= '' then
  local all = redis.call('LRANGE', history, 0, -1)
  local prefix, index = ARGV[3], nil
  for i = #all, 1, -1 do
    if string.sub(all[i], 1, #prefix) == prefix then index = i; break end
  end
  if index ~= nil and index < #all then
    redis.call('LTRIM', history, 0, index - 1)
    redis.call('RPUSH', history, ARGV[4])
    for j = index + 1, #all, 1000 do
      redis.call('RPUSH', history, unpack(all, j, math.min(j + 999, #all)))
    end
    placed = true
  end
end
if not placed then redis.call('RPUSH', history, ARGV[4]) end
same_ttl(KEYS[1], history)
redis.call('HSET', KEYS[1], 'active', ARGV[2])
return 1
"""

# KEYS: session hash, dialog. ARGV: inc, the items as JSON.
SET_DIALOG = _SAME_TTL + """
if redis.call('HGET', KEYS[1], 'inc') ~= ARGV[1] then return false end
redis.call('SET', KEYS[2], ARGV[2])
same_ttl(KEYS[1], KEYS[2])
return 1
"""

# Reads of more than one key, as one consistent view. KEYS: session hash, other key.
# ARGV: inc. {active, history} / {dialog}.
SNAPSHOT = """
if redis.call('HGET', KEYS[1], 'inc') ~= ARGV[1] then return false end
return {redis.call('HGET', KEYS[1], 'active'), redis.call('LRANGE', KEYS[2], 0, -1)}
"""
DIALOG = """
if redis.call('HGET', KEYS[1], 'inc') ~= ARGV[1] then return false end
return {redis.call('GET', KEYS[2])}
"""

SOURCES = {
    "create": CREATE, "claim": CLAIM, "set": SET, "touch_live": TOUCH_LIVE, "increment": INCREMENT,
    "finish": FINISH, "greet": GREET, "add_message": ADD_MESSAGE, "set_dialog": SET_DIALOG,
    "snapshot": SNAPSHOT, "dialog": DIALOG, "prepare": PREPARE, "acquire": ACQUIRE, "confirm": CONFIRM,
    "abandon": ABANDON, "release": RELEASE, "claim_one": CLAIM_ONE,
}


class _Script:
    """One script on one sync client: EVALSHA, and EVAL when the server does not know it
    (a restarted server), which caches it again. (redis-py's Script does the same with
    more work per call: an import, tuple copies, a SCRIPT LOAD round trip.)"""

    __slots__ = ("execute", "source", "sha", "unknown")

    def __init__(self, client: Any, source: str) -> None:
        from redis.exceptions import NoScriptError

        self.execute = client.execute_command
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()
        self.unknown = NoScriptError

    def __call__(self, keys: list[Any], args: list[Any]) -> Any:
        try:
            return self.execute("EVALSHA", self.sha, len(keys), *keys, *args)
        except self.unknown:
            return self.execute("EVAL", self.source, len(keys), *keys, *args)


class _AsyncScript(_Script):
    """The same on an asyncio client."""

    __slots__ = ()

    async def __call__(self, keys: list[Any], args: list[Any]) -> Any:
        try:
            return await self.execute("EVALSHA", self.sha, len(keys), *keys, *args)
        except self.unknown:
            return await self.execute("EVAL", self.source, len(keys), *keys, *args)


class Scripts:
    """The scripts on one client (sync or asyncio): ``scripts.create(keys=..., args=...)``."""

    def __init__(self, client: Any, asyncio: bool = False) -> None:
        kind = _AsyncScript if asyncio else _Script
        for name, source in SOURCES.items():
            setattr(self, name, kind(client, source))

    create: Any
    claim: Any
    set: Any
    touch_live: Any
    increment: Any
    finish: Any
    greet: Any
    add_message: Any
    set_dialog: Any
    snapshot: Any
    dialog: Any
    prepare: Any
    acquire: Any
    confirm: Any
    abandon: Any
    release: Any
    claim_one: Any
