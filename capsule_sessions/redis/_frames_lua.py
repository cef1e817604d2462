"""The server-side scripts of a session's frames (``_frames.py``): every change to them is
one of these scripts, so it is atomic on the server, whatever node runs it.

Keys (``SessionKeys.key``, hash-tagged by the session id, so one script may use them all
on Redis Cluster):

    frames        the stream: the ring itself, one entry per stored frame, id "<seq>-0"
    frames:meta   a hash: accepted, rate_limited, source_resets, bytes, source, last_hi,
                  last_lo (the last accepted instant), epoch, ended, token, token_seq
    frames:sizes  a list: the byte size of each entry of the stream, oldest first
    frames:end    a stream: an entry here means "this session's frames ended"

Instants arrive as two integers, ``ns // 10**9`` and ``ns % 10**9`` (exact in Lua's
doubles, where an int64 of nanoseconds is not), so the rate check compares int64
nanoseconds exactly as the pure ring does. Each script reads and checks everything first
and writes afterwards, so a key that holds something else (another program's, or a
corrupted value) fails the script before it changed anything; the error reply starts
with ``CAPSULE_DATA`` and the client raises RedisDataError naming the key.
"""

from __future__ import annotations

import hashlib

# Shared by every writing script: each key must be of its type, or absent.
_CHECK_TYPES = """
local function check_type(key, want)
  local t = redis.call('TYPE', key)['ok']
  if t ~= 'none' and t ~= want then
    return redis.error_reply('CAPSULE_DATA ' .. key .. ' holds a ' .. t .. ', not a ' .. want)
  end
  return nil
end
local function integer(key, field, value)
  if value == false or value == nil then return 0, nil end
  local n = tonumber(value)
  if n == nil or n ~= math.floor(n) or not string.match(value, '^%-?%d+$') then
    return nil, redis.error_reply('CAPSULE_DATA ' .. key .. ' field ' .. field .. ' is not an integer')
  end
  return n, nil
end
"""

# KEYS: stream, meta, sizes, activity (a hash, or the empty string: none).
# ARGV: 1 token, 2 now_hi, 3 now_lo, 4 min_hi ('' when there is no limit), 5 min_lo,
# 6 keep, 7 source, 8 nbytes, 9 received_at (repr of the float), 10 now_ns, 11 mime_type,
# 12 width, 13 height, 14 timestamp_ms, 15 frame_seq, 16 data, 17 epoch if none is set,
# 18 activity field, 19 '1': only the rate check (no frame is stored).
# Reply: {seq, epoch} when accepted, {0, epoch} when rate-limited, {-1, ''} when a check
# found no limit. A retry of the same call (same token) gets the first call's reply.
STORE = _CHECK_TYPES + """
local stream, meta, sizes, activity = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local err = check_type(meta, 'hash') or check_type(stream, 'stream') or check_type(sizes, 'list')
if err then return err end
if activity ~= '' then
  err = check_type(activity, 'hash')
  if err then return err end
end
local st = redis.call('HMGET', meta, 'last_hi', 'last_lo', 'source', 'epoch', 'token', 'token_seq',
                      'accepted', 'bytes', 'rate_limited', 'source_resets')
if st[5] == ARGV[1] then
  return {tonumber(st[6]), st[4] or ''}
end
local last_hi, last_lo, accepted, bytes, unused, e
last_hi, e = integer(meta, 'last_hi', st[1]); if e then return e end
last_lo, e = integer(meta, 'last_lo', st[2]); if e then return e end
accepted, e = integer(meta, 'accepted', st[7]); if e then return e end
bytes, e = integer(meta, 'bytes', st[8]); if e then return e end
unused, e = integer(meta, 'rate_limited', st[9]); if e then return e end
unused, e = integer(meta, 'source_resets', st[10]); if e then return e end
if ARGV[4] ~= '' and st[1] then
  local dhi = tonumber(ARGV[2]) - last_hi
  local dlo = tonumber(ARGV[3]) - last_lo
  if dlo < 0 then dlo = dlo + 1000000000; dhi = dhi - 1 end
  local min_hi = tonumber(ARGV[4])
  if dhi < min_hi or (dhi == min_hi and dlo < tonumber(ARGV[5])) then
    redis.call('HINCRBY', meta, 'rate_limited', 1)
    redis.call('HSET', meta, 'token', ARGV[1], 'token_seq', '0')
    return {0, st[4] or ''}
  end
end
if ARGV[19] == '1' then
  return {-1, ''}
end
local epoch = st[4] or ARGV[17]
local source = st[3] or ''
local keep = tonumber(ARGV[6])
local switch = source ~= ARGV[7]
local n = redis.call('LLEN', sizes)
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
local seq = accepted + 1
local id = string.format('%d-0', seq)
local added = redis.pcall('XADD', stream, id, 'd', ARGV[16], 's', ARGV[7], 'm', ARGV[11], 'w', ARGV[12],
                          'h', ARGV[13], 't', ARGV[14], 'f', ARGV[15], 'r', ARGV[9], 'n', ARGV[10], 'e', epoch)
if type(added) == 'table' and added['err'] then
  return redis.error_reply('CAPSULE_DATA ' .. stream .. ' refused entry ' .. id .. ': ' .. added['err'])
end
if switch then
  if source ~= '' then redis.call('HINCRBY', meta, 'source_resets', 1) end
  redis.call('XTRIM', stream, 'MAXLEN', 1)
  redis.call('DEL', sizes)
  redis.call('RPUSH', sizes, ARGV[8])
  bytes = tonumber(ARGV[8])
else
  redis.call('RPUSH', sizes, ARGV[8])
  if n + 1 > keep then
    redis.call('LTRIM', sizes, -keep, -1)
    redis.call('XTRIM', stream, 'MAXLEN', ARGV[6])
  end
  bytes = bytes + tonumber(ARGV[8]) - leaving
end
redis.call('HSET', meta, 'accepted', id:sub(1, -3), 'bytes', string.format('%d', bytes), 'epoch', epoch,
           'source', ARGV[7], 'last_hi', ARGV[2], 'last_lo', ARGV[3], 'token', ARGV[1], 'token_seq', id:sub(1, -3))
if activity ~= '' then redis.call('HSET', activity, ARGV[18], ARGV[9]) end
return {seq, epoch}
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

# KEYS: stream, meta, sizes, activity. ARGV: 1 source, 2 received_at, 3 activity field.
START = _CHECK_TYPES + _CLEAR + """
local stream, meta, sizes, activity = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local err = check_type(meta, 'hash') or check_type(stream, 'stream') or check_type(sizes, 'list')
if err then return err end
if activity ~= '' then
  err = check_type(activity, 'hash')
  if err then return err end
end
local st = redis.call('HMGET', meta, 'source', 'source_resets')
local _, e = integer(meta, 'source_resets', st[2]); if e then return e end
local source = st[1] or ''
if source ~= ARGV[1] then
  if source ~= '' then redis.call('HINCRBY', meta, 'source_resets', 1) end
  clear(stream, meta, sizes, ARGV[1])
end
if activity ~= '' then redis.call('HSET', activity, ARGV[3], ARGV[2]) end
return 1
"""

# KEYS: stream, meta, sizes, activity. ARGV: 1 source, 2 received_at, 3 activity field.
STOP = _CHECK_TYPES + _CLEAR + """
local stream, meta, sizes, activity = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local err = check_type(meta, 'hash') or check_type(stream, 'stream') or check_type(sizes, 'list')
if err then return err end
if activity ~= '' then
  err = check_type(activity, 'hash')
  if err then return err end
end
local source = redis.call('HGET', meta, 'source') or ''
if ARGV[1] == '' or source == '' or source == ARGV[1] then
  clear(stream, meta, sizes, '')
end
if activity ~= '' then redis.call('HSET', activity, ARGV[3], ARGV[2]) end
return 1
"""

# KEYS: stream, meta. Reply: accepted, rate_limited, source_resets, frames, bytes (as the
# hash holds them: the client checks them).
STATS = """
local st = redis.call('HMGET', KEYS[2], 'accepted', 'rate_limited', 'source_resets', 'bytes')
return {st[1] or '0', st[2] or '0', st[3] or '0', redis.call('XLEN', KEYS[1]), st[4] or '0'}
"""

# KEYS: stream, meta, sizes, end. ARGV: 1 milliseconds the keys are kept afterwards ('0':
# no expiry). Marks the frames ended (subscriptions made later start closed) and appends
# the end entry every node's readers wake up for: {last = accepted so far, e = epoch}.
END = _CHECK_TYPES + """
local stream, meta, sizes, done = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local err = check_type(meta, 'hash') or check_type(done, 'stream')
if err then return err end
local st = redis.call('HMGET', meta, 'accepted', 'epoch')
local accepted, e = integer(meta, 'accepted', st[1]); if e then return e end
redis.call('HSET', meta, 'ended', '1')
redis.call('XADD', done, '*', 'last', string.format('%d', accepted), 'e', st[2] or '')
if ARGV[1] ~= '0' then
  for _, key in ipairs(KEYS) do redis.call('PEXPIRE', key, ARGV[1]) end
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
           (("store", STORE), ("start", START), ("stop", STOP), ("stats", STATS), ("end", END))}
