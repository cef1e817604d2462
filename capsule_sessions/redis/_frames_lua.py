"""The server-side scripts of a session's frames (``_frames.py``): every change to them is
one of these scripts, so it is atomic on the server, whatever node runs it.

Keys (``SessionKeys.key``, hash-tagged by the session id, so one script may use them all
on Redis Cluster):

    frames        the stream: the ring itself, one entry per stored frame, its id
                  "<epoch>-<seq>"
    frames:meta   a hash: accepted, rate_limited, source_resets, bytes, source, last_hi,
                  last_lo (the last accepted instant), epoch, ended
    frames:sizes  a list: the byte size of each entry of the stream, oldest first
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
nanoseconds exactly as the pure ring does. Each script reads and checks everything first
and writes afterwards, so a key that holds something else (another program's, or a
corrupted value) fails the script before it changed anything; the error reply starts
with ``CAPSULE_DATA`` and the client raises RedisDataError naming the key.
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
  if n == nil or n ~= math.floor(n) then
    return nil, redis.error_reply('CAPSULE_DATA ' .. key .. ' field ' .. field .. ' is not an integer')
  end
  return n, nil
end
-- Whether the session hash no longer holds the incarnation ``inc`` ('' when the ring has
-- none to check): the caller's object is then of an ended session whose id was used
-- again, or whose record expired. Its first value is an error reply when the hash is not
-- one; reading ``field`` checks that the hash can take the touch written later.
local function gone(activity, field, inc)
  if activity == '' then return nil, false end
  local r = redis.pcall('HMGET', activity, 'inc', field)
  local err = wrong(activity, r, 'hash')
  if err then return err, false end
  return nil, inc ~= '' and r[1] ~= inc
end
"""

# KEYS: stream, meta, sizes, activity (a hash, or the empty string: none).
# ARGV: 1 now_hi, 2 now_lo, 3 min_hi ('' when there is no limit), 4 min_lo, 5 keep,
# 6 source, 7 nbytes, 8 received_at (repr of the float), 9 an epoch if none is set,
# 10 activity field, 11 '1': only the rate check (nothing is stored), 12 the incarnation.
# Reply: {seq, epoch} when accepted (the XADD that follows gets "<epoch>-<seq>"), {0, ''}
# when rate-limited, {-1, ''} when a check found no limit, {-2, ''} when the incarnation
# is gone.
DECIDE = _CHECK_TYPES + """
local stream, meta, sizes, activity = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local st = redis.pcall('HMGET', meta, 'last_hi', 'last_lo', 'source', 'epoch', 'accepted', 'bytes',
                       'rate_limited', 'source_resets')
local n = redis.pcall('LLEN', sizes)
local length = redis.pcall('XLEN', stream)
local err = wrong(meta, st, 'hash') or wrong(sizes, n, 'list') or wrong(stream, length, 'stream')
if err then return err end
local stale
err, stale = gone(activity, ARGV[10], ARGV[12])
if err then return err end
if stale then return {-2, ''} end
local last_hi, last_lo, accepted, bytes, unused, e
last_hi, e = integer(meta, 'last_hi', st[1]); if e then return e end
last_lo, e = integer(meta, 'last_lo', st[2]); if e then return e end
accepted, e = integer(meta, 'accepted', st[5]); if e then return e end
bytes, e = integer(meta, 'bytes', st[6]); if e then return e end
unused, e = integer(meta, 'rate_limited', st[7]); if e then return e end
unused, e = integer(meta, 'source_resets', st[8]); if e then return e end
if st[4] and not string.match(st[4], '^%d+$') then
  return redis.error_reply('CAPSULE_DATA ' .. meta .. ' field epoch is not a number')
end
if ARGV[3] ~= '' and st[1] then
  local dhi = tonumber(ARGV[1]) - last_hi
  local dlo = tonumber(ARGV[2]) - last_lo
  if dlo < 0 then dlo = dlo + 1000000000; dhi = dhi - 1 end
  local min_hi = tonumber(ARGV[3])
  if dhi < min_hi or (dhi == min_hi and dlo < tonumber(ARGV[4])) then
    redis.call('HINCRBY', meta, 'rate_limited', 1)
    return {0, ''}
  end
end
if ARGV[11] == '1' then
  return {-1, ''}
end
local epoch = st[4]
if not epoch then
  -- A new life of the session's frames: whatever a stream or list held is nobody's.
  epoch = ARGV[9]
  accepted = 0
  bytes = 0
  redis.call('DEL', stream, sizes)
end
local source = st[3] or ''
local keep = tonumber(ARGV[5])
local switch = source ~= ARGV[6]
local leaving = 0
if not switch and n + 1 > keep then
  local old = redis.call('LRANGE', sizes, 0, n - keep)
  for i = 1, #old do
    local size = tonumber(old[i])
    if size == nil then
      return redis.error_reply('CAPSULE_DATA ' .. sizes .. ' holds a size that is not a number')
    end
    leaving = leaving + size
  end
end
local before = epoch .. '-' .. string.format('%d', accepted)
if length == 0 and redis.call('EXISTS', stream) == 0 then
  redis.call('XADD', stream, before, '_', '')
  redis.call('XDEL', stream, before)
end
if switch then
  if source ~= '' then redis.call('HINCRBY', meta, 'source_resets', 1) end
  redis.call('XTRIM', stream, 'MAXLEN', 0)
  redis.call('DEL', sizes)
  bytes = 0
elseif n + 1 > keep then
  -- (the stream: by the XADD's MAXLEN, natively, after the frame is in)
  if keep > 1 then redis.call('LTRIM', sizes, 1 - keep, -1) else redis.call('DEL', sizes) end
  bytes = bytes - leaving
end
redis.call('XSETID', stream, before)
redis.call('RPUSH', sizes, ARGV[7])
local seq = string.format('%d', accepted + 1)
redis.call('HSET', meta, 'accepted', seq, 'bytes', string.format('%d', bytes + tonumber(ARGV[7])), 'epoch', epoch,
           'source', ARGV[6], 'last_hi', ARGV[1], 'last_lo', ARGV[2])
if activity ~= '' then redis.call('HSET', activity, ARGV[10], ARGV[8]) end
return {accepted + 1, epoch}
"""

# The ring cleared (no source, no frames, no rate limit), shared by start and stop.
_CLEAR = """
local function clear(stream, meta, sizes, source)
  redis.call('XTRIM', stream, 'MAXLEN', 0)
  redis.call('DEL', sizes)
  redis.call('HSET', meta, 'source', source, 'bytes', '0')
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
err, stale = gone(activity, ARGV[3], ARGV[4])
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
err, stale = gone(activity, ARGV[3], ARGV[4])
if err then return err end
if stale then return 0 end
local source = st[1] or ''
if ARGV[1] == '' or source == '' or source == ARGV[1] then
  clear(stream, meta, sizes, '')
end
if activity ~= '' then redis.call('HSET', activity, ARGV[3], ARGV[2]) end
return 1
"""

# KEYS: stream, meta, activity. ARGV: 1 the incarnation. Reply: accepted, rate_limited,
# source_resets, frames, bytes (as the hash holds them: the client checks them); nil when
# the incarnation is gone.
STATS = _CHECK_TYPES + """
local err, stale = gone(KEYS[3], 'active', ARGV[1])
if err then return err end
if stale then return false end
local st = redis.call('HMGET', KEYS[2], 'accepted', 'rate_limited', 'source_resets', 'bytes')
return {st[1] or '0', st[2] or '0', st[3] or '0', redis.call('XLEN', KEYS[1]), st[4] or '0'}
"""

# KEYS: meta, activity. ARGV: 1 the incarnation. Reply: accepted, epoch, ended (as the hash
# holds them), or nil when the incarnation is gone. A subscription starts from it, and its
# reader asks it again when idle (a new epoch; an incarnation that went without its end).
OPEN = _CHECK_TYPES + """
local err, stale = gone(KEYS[2], 'active', ARGV[1])
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
err, stale = gone(KEYS[5], 'active', ARGV[2])
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
