"""The server-side scripts of a session's frames (``_frames.py``): every change to them is
one of these scripts, so it is atomic on the server, whatever node runs it.

Keys (``SessionKeys.key``, hash-tagged by the session id, so one script may use them all
on Redis Cluster):

    frames        the stream: the ring itself, one entry per stored frame, its id
                  "<epoch>-<seq>"
    frames:meta   a hash: accepted, rate_limited, source_resets, source, last_hi, last_lo
                  (the last accepted instant), epoch, ended
    frames:sizes  a list: the byte size of each entry of the stream, oldest first (their
                  sum is visual_stats' bytes)
    frames:end    a stream: an entry here means "this session's frames ended"

A session's ring also names the session hash (its ``activity`` key) and the incarnation
token of the object it belongs to: the frames' keys are the id's, whatever incarnation,
so every script first checks that the hash still holds that token, and does nothing
when it does not (the session ended and its id was used again, or its record expired):
an old object's call never touches a new session's frames.

A frame's bytes never pass through Lua (a script's 64 KiB argument alone costs more on
the server than the whole XADD of it). A store is one MULTI of three commands: DECIDE
(this script, given everything but the bytes) takes the rate check, the source switch
and the trim of the sizes, counts, and when it accepts the frame sets the stream's last
id to "<epoch>-<seq - 1>"; then a native ``XADD frames NOMKSTREAM MAXLEN keep * ...``
with the bytes, which trims the stream and whose automatic id is therefore
"<epoch>-<seq>" (an epoch is a number above 2**62, past
any clock's milliseconds, so the id's sequence part is what grows); then ``XSETID frames
POISON``. At rest the stream's last id is POISON, the last id there is, so an XADD that
DECIDE did not open (a rate-limited frame, a script the server lost) fails and adds
nothing.

Instants arrive as two integers, ``ns // 10**9`` and ``ns % 10**9`` (exact in Lua's
doubles, where an int64 of nanoseconds is not), so the rate check compares int64
nanoseconds exactly as the pure ring does. Each script reads and checks what it uses
first and writes afterwards (or its first write is itself the check, and fails alone),
so a key that holds something else (another program's, or a corrupted value) fails the
script before it changed anything; the error reply starts with ``CAPSULE_DATA`` and the
client raises RedisDataError naming the key.
"""

from __future__ import annotations

import hashlib

# The last stream id there is: XADD * after it fails ("exhausted").
POISON = "18446744073709551615-18446744073709551615"

# Shared by every writing script. A key of another type fails the first command that
# touches it; each script touches each of its keys with a read (pcall'd here, so the
# error names the key) before it writes anything.
_CHECK_TYPES = """
local function wrong(key, reply, want)
  if type(reply) == 'table' and reply['err'] then
    return redis.error_reply('CAPSULE_DATA ' .. key .. ' does not hold a ' .. want .. ': ' .. reply['err'])
  end
  return nil
end
local function integer(key, field, value)
  if value == false or value == nil then return 0, nil end
  local n = tonumber(value)
  if n == nil or n % 1 ~= 0 then
    return nil, redis.error_reply('CAPSULE_DATA ' .. key .. ' field ' .. field .. ' is not an integer')
  end
  return n, nil
end
-- Whether the session hash no longer holds the incarnation ``inc`` ('' when the ring has
-- none to check): the caller's object is then of an ended session whose id was used
-- again, or whose record expired. Its first value is an error reply when the key is not a
-- hash (then the touch written later would fail half-way).
local function gone(activity, inc)
  if activity == '' then return nil, false end
  local r = redis.pcall('HGET', activity, 'inc')
  local err = wrong(activity, r, 'hash')
  if err then return err, false end
  return nil, inc ~= '' and r ~= inc
end
"""

# KEYS: stream, meta, sizes, activity (a hash, or the empty string: none).
# ARGV: 1 now_hi, 2 now_lo, 3 keep, 4 source, 5 nbytes, 6 received_at (repr of the float),
# 7 an epoch if none is set, 8 activity field, 9 the incarnation; with a rate limit also
# 10 min_hi, 11 min_lo; and 12 '1': only the rate check (nothing is stored; 10 and 11 are
# then '' when there is no limit). Reply: seq when accepted (the XADD that follows gets
# "<epoch>-<seq>", and tells the client the epoch), 0 when rate-limited, -1 when a check
# found no limit, -2 when the incarnation is gone.
#
# A store runs this on every frame, and a script's server time is mostly its calls and
# the values they hand to Lua (each call about as much as a native HGET; each field or
# argument about a tenth of one): so it reads only what the frame needs (the last
# instant only under a limit, the counters of a reset or a limited frame only then), and
# the ring's byte count is the sum of the sizes list, taken when visual_stats asks, not
# kept by every store.
DECIDE = _CHECK_TYPES + """
local stream, meta, sizes, activity = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local limit = ARGV[10] ~= nil and ARGV[10] ~= ''
local st
if limit then
  st = redis.pcall('HMGET', meta, 'source', 'epoch', 'accepted', 'last_hi', 'last_lo')
else
  st = redis.pcall('HMGET', meta, 'source', 'epoch', 'accepted')
end
local err = wrong(meta, st, 'hash')
if err then return err end
local stale
err, stale = gone(activity, ARGV[9])
if err then return err end
if stale then return -2 end
local e
if limit and st[4] then
  local last_hi, last_lo
  last_hi, e = integer(meta, 'last_hi', st[4]); if e then return e end
  last_lo, e = integer(meta, 'last_lo', st[5]); if e then return e end
  local dhi, dlo = ARGV[1] - last_hi, ARGV[2] - last_lo
  if dlo < 0 then dlo = dlo + 1000000000; dhi = dhi - 1 end
  local min_hi = ARGV[10] + 0
  if dhi < min_hi or (dhi == min_hi and dlo < ARGV[11] + 0) then
    -- The count is a limited frame's only write: a field that is not a counter fails it
    -- before anything changed.
    if wrong(meta, redis.pcall('HINCRBY', meta, 'rate_limited', 1), 'hash') then
      return redis.error_reply('CAPSULE_DATA ' .. meta .. ' field rate_limited is not an integer')
    end
    return 0
  end
end
if ARGV[12] == '1' then
  return -1
end
local source, epoch = st[1] or '', st[2]
local switch = source ~= ARGV[4]
local n = redis.pcall('LLEN', sizes)
err = wrong(sizes, n, 'list')
if err then return err end
local accepted = 0
if epoch then
  accepted, e = integer(meta, 'accepted', st[3]); if e then return e end
else
  err = wrong(stream, redis.pcall('XLEN', stream), 'stream')
  if err then return err end
end
if switch and source ~= '' then
  local _
  _, e = integer(meta, 'source_resets', redis.call('HGET', meta, 'source_resets')); if e then return e end
end
local fresh = not epoch
if fresh then
  -- A new life of the session's frames: whatever a stream or list held is nobody's.
  epoch = ARGV[7]
  redis.call('DEL', stream, sizes)
  n = 0
end
local before = epoch .. '-' .. string.format('%d', accepted)
-- Opening the stream for the XADD that follows is the first write, and the check of the
-- stream's type: a failure here changed nothing.
local opened = redis.pcall('XSETID', stream, before)
if opened['err'] then
  if redis.call('EXISTS', stream) == 1 then
    return redis.error_reply('CAPSULE_DATA ' .. stream .. ' cannot take frame ' .. before .. ' (epoch and accepted of '
                             .. meta .. '): ' .. opened['err'])
  end
  -- (No stream yet: made empty, its last id that one.)
  redis.call('XADD', stream, before, '_', '')
  redis.call('XDEL', stream, before)
end
local seq = string.format('%d', accepted + 1)
if switch then
  if source ~= '' then redis.call('HINCRBY', meta, 'source_resets', 1) end
  redis.call('XTRIM', stream, 'MAXLEN', '0')
  redis.call('DEL', sizes)
  n = 0
end
redis.call('RPUSH', sizes, ARGV[5])
-- (the stream: by the XADD's MAXLEN, natively, after the frame is in)
if n >= ARGV[3] + 0 then redis.call('LTRIM', sizes, '-' .. ARGV[3], '-1') end
if switch or fresh then
  redis.call('HSET', meta, 'accepted', seq, 'epoch', epoch, 'source', ARGV[4], 'last_hi', ARGV[1], 'last_lo', ARGV[2])
else
  redis.call('HSET', meta, 'accepted', seq, 'last_hi', ARGV[1], 'last_lo', ARGV[2])
end
if activity ~= '' then redis.call('HSET', activity, ARGV[8], ARGV[6]) end
return accepted + 1
"""

# The ring cleared (no source, no frames, no rate limit), shared by start and stop.
_CLEAR = """
local function clear(stream, meta, sizes, source)
  redis.call('XTRIM', stream, 'MAXLEN', 0)
  redis.call('DEL', sizes)
  redis.call('HSET', meta, 'source', source)
  redis.call('HDEL', meta, 'last_hi', 'last_lo')
end
"""

# KEYS: stream, meta, sizes, activity. ARGV: 1 source, 2 received_at, 3 activity field,
# 4 the incarnation. Reply: 1, or 0 when the incarnation is gone.
START = _CHECK_TYPES + _CLEAR + """
local stream, meta, sizes, activity = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local st = redis.pcall('HMGET', meta, 'source', 'source_resets')
local err = wrong(meta, st, 'hash') or wrong(sizes, redis.pcall('LLEN', sizes), 'list')
  or wrong(stream, redis.pcall('XLEN', stream), 'stream')
if err then return err end
local stale
err, stale = gone(activity, ARGV[4])
if err then return err end
if stale then return 0 end
local _, e = integer(meta, 'source_resets', st[2]); if e then return e end
local source = st[1] or ''
if source ~= ARGV[1] then
  if source ~= '' then redis.call('HINCRBY', meta, 'source_resets', 1) end
  clear(stream, meta, sizes, ARGV[1])
end
if activity ~= '' then redis.call('HSET', activity, ARGV[3], ARGV[2]) end
return 1
"""

# KEYS: stream, meta, sizes, activity. ARGV: 1 source, 2 received_at, 3 activity field,
# 4 the incarnation. Reply: 1, or 0 when the incarnation is gone.
STOP = _CHECK_TYPES + _CLEAR + """
local stream, meta, sizes, activity = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local st = redis.pcall('HMGET', meta, 'source', 'source_resets')
local err = wrong(meta, st, 'hash') or wrong(sizes, redis.pcall('LLEN', sizes), 'list')
  or wrong(stream, redis.pcall('XLEN', stream), 'stream')
if err then return err end
local stale
err, stale = gone(activity, ARGV[4])
if err then return err end
if stale then return 0 end
local source = st[1] or ''
if ARGV[1] == '' or source == '' or source == ARGV[1] then
  clear(stream, meta, sizes, '')
end
if activity ~= '' then redis.call('HSET', activity, ARGV[3], ARGV[2]) end
return 1
"""

# KEYS: stream, meta, sizes, activity. ARGV: 1 the incarnation. Reply: accepted,
# rate_limited, source_resets (as the hash holds them: the client checks them), frames,
# bytes (the sum of the sizes list); nil when the incarnation is gone.
STATS = _CHECK_TYPES + """
local stream, meta, sizes = KEYS[1], KEYS[2], KEYS[3]
local err, stale = gone(KEYS[4], ARGV[1])
if err then return err end
if stale then return false end
local st = redis.pcall('HMGET', meta, 'accepted', 'rate_limited', 'source_resets')
local each = redis.pcall('LRANGE', sizes, 0, -1)
local length = redis.pcall('XLEN', stream)
err = wrong(meta, st, 'hash') or wrong(sizes, each, 'list') or wrong(stream, length, 'stream')
if err then return err end
local bytes = 0
for i = 1, #each do
  local size = tonumber(each[i])
  if size == nil or size % 1 ~= 0 or size < 0 then
    return redis.error_reply('CAPSULE_DATA ' .. sizes .. ' holds a size that is not a number')
  end
  bytes = bytes + size
end
return {st[1] or '0', st[2] or '0', st[3] or '0', length, string.format('%d', bytes)}
"""

# KEYS: meta, activity. ARGV: 1 the incarnation. Reply: accepted, epoch, ended (as the hash
# holds them), or nil when the incarnation is gone. A subscription starts from it, and its
# reader asks it again when idle (a new epoch; an incarnation that went without its end).
OPEN = _CHECK_TYPES + """
local err, stale = gone(KEYS[2], ARGV[1])
if err then return err end
if stale then return false end
return redis.call('HMGET', KEYS[1], 'accepted', 'epoch', 'ended')
"""

# KEYS: stream, meta, sizes, end, activity. ARGV: 1 milliseconds the keys are kept afterwards ('0':
# no expiry; a key that expires already keeps its time), 2 the incarnation. Marks the
# frames ended (subscriptions made later start closed) and appends the end entry every
# node's readers wake up for: {last = accepted so far, e = epoch}; nil when the incarnation
# is gone (a late end must not end a new session's frames).
END = _CHECK_TYPES + """
local stream, meta, sizes, done = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local st = redis.pcall('HMGET', meta, 'accepted', 'epoch')
local err = wrong(meta, st, 'hash') or wrong(done, redis.pcall('XLEN', done), 'stream')
if err then return err end
local stale
err, stale = gone(KEYS[5], ARGV[2])
if err then return err end
if stale then return false end
local accepted, e = integer(meta, 'accepted', st[1]); if e then return e end
redis.call('HSET', meta, 'ended', '1')
redis.call('XADD', done, '*', 'last', string.format('%d', accepted), 'e', st[2] or '')
if ARGV[1] ~= '0' then
  -- Kept a while for readers that were away, then gone; a key that already expires
  -- (the manager's retention) keeps its own time.
  for _, key in ipairs({stream, meta, sizes, done}) do
    if redis.call('PTTL', key) == -1 then redis.call('PEXPIRE', key, ARGV[1]) end
  end
end
return {accepted, st[2] or ''}
"""


class Script:
    """A script and its SHA1, for EVALSHA (loaded again when the server lost it)."""

    __slots__ = ("name", "text", "sha")

    def __init__(self, name: str, text: str) -> None:
        self.name = name
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()


SCRIPTS = {name: Script(name, text) for name, text in
           (("decide", DECIDE), ("start", START), ("stop", STOP), ("stats", STATS), ("open", OPEN),
                                             ("end", END))}
