"""The Lua scripts of the Redis broker: every step that reads and then changes the server
runs as one script, so it is one atomic step there.

Keys (see `RedisBroker.keys`): ``stream`` (the jobs, read by a consumer group), ``delayed``
(a sorted set of ids by eta, in the server's clock) with ``payloads`` (their bodies),
``dead`` (the DLQ stream) and ``leases`` (a sorted set: the deadline, in the server's clock,
of every entry `extend` leased for a given time).
"""

from __future__ import annotations

# Owned = pending for this consumer with the delivery count this worker was handed.
OWNED = """
local function owned(stream, group, consumer, id, count)
  local p = redis.call('XPENDING', stream, group, id, id, 1, consumer)
  return #p > 0 and tonumber(p[1][4]) == tonumber(count)
end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

# KEYS: stream. ARGV: group, consumer, 'id1 count1 id2 count2 ...' (one argument: each
# argument costs the client more to encode than the script to split)
# -> 0-based positions of the pairs whose lease is lost: still in the stream, not ours. An
# entry no longer in the stream is settled already, mostly by this same ack retried after
# its reply was lost (else by the worker that took it over): not reported as lost.
# Ownership (`owned`) is read for the whole batch with one XPENDING of this consumer's
# entries (what this worker holds: about its concurrency), and the owned ones are acked and
# deleted with one XACK and one XDEL.
ACK = """
local ids, counts = {}, {}
for id, count in string.gmatch(ARGV[3], '(%S+) (%S+)') do
  ids[#ids + 1] = id
  counts[#counts + 1] = tonumber(count)
end
if #ids == 0 then return {} end
local most = 1000
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', most, ARGV[2])
local held = {}
for _, p in ipairs(pending) do held[p[1]] = tonumber(p[4]) end
local exact = #pending < most  -- else some are missing: ask per id
local lost, mine = {}, {}
for i = 1, #ids do
  local id = ids[i]
  local count = held[id]
  if count == nil and not exact then
    local p = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1, ARGV[2])
    if #p > 0 then count = tonumber(p[1][4]) end
  end
  if count == counts[i] then
    mine[#mine + 1] = id
  elseif #redis.call('XRANGE', KEYS[1], id, id) > 0 then
    lost[#lost + 1] = i - 1
  end
end
if #mine > 0 then
  redis.call('XACK', KEYS[1], ARGV[1], unpack(mine))
  redis.call('XDEL', KEYS[1], unpack(mine))
end
return lost
"""

# KEYS: stream, leases. ARGV: group, consumer, lease_ms, horizon_ms, id1, count1, ...
# -> 0-based positions of the pairs whose lease is lost.
# Reclaimers take over entries idle for ``horizon`` (the lease their fetch gives): an entry
# made idle ``horizon - lease`` now is taken ``lease`` from now. A lease longer than the
# horizon can't be written so (Redis clamps a delivery time in the future): its deadline
# goes to ``leases``, which the reclaim script honours.
EXTEND = (
    OWNED
    + """
local lease, horizon = tonumber(ARGV[3]), tonumber(ARGV[4])
local lost, mine = {}, {}
for i = 5, #ARGV, 2 do
  if owned(KEYS[1], ARGV[1], ARGV[2], ARGV[i], ARGV[i + 1]) then
    table.insert(mine, ARGV[i])
  else
    table.insert(lost, (i - 5) / 2)
  end
end
if #mine == 0 then return lost end
if lease > horizon then
  local deadline = now_ms() + lease
  for _, id in ipairs(mine) do redis.call('ZADD', KEYS[2], deadline, id) end
elseif redis.call('ZCARD', KEYS[2]) > 0 then
  redis.call('ZREM', KEYS[2], unpack(mine))
end
-- min-idle 0 on ids we just checked are ours; JUSTID leaves the delivery count alone
table.insert(mine, 'IDLE')
table.insert(mine, math.max(0, horizon - lease))
table.insert(mine, 'JUSTID')
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, unpack(mine))
return lost
"""
)

# KEYS: stream, delayed, payloads. ARGV: group, consumer, id, count, body, delay_ms, new_id
RETRY = (
    OWNED
    + """
if not owned(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4]) then return 0 end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
local delay = tonumber(ARGV[6])
if delay > 0 then
  redis.call('ZADD', KEYS[2], now_ms() + delay, ARGV[7])
  redis.call('HSET', KEYS[3], ARGV[7], ARGV[5])
else
  redis.call('XADD', KEYS[1], '*', 'b', ARGV[5])
end
return 1
"""
)

# KEYS: stream. ARGV: group, consumer, id1, count1, ... -> number released
RELEASE = (
    OWNED
    + """
local n = 0
for i = 3, #ARGV, 2 do
  if owned(KEYS[1], ARGV[1], ARGV[2], ARGV[i], ARGV[i + 1]) then
    local e = redis.call('XRANGE', KEYS[1], ARGV[i], ARGV[i])
    redis.call('XACK', KEYS[1], ARGV[1], ARGV[i])
    redis.call('XDEL', KEYS[1], ARGV[i])
    -- a fresh entry: visible at once, and the hand-back is not counted as a delivery
    if #e > 0 then redis.call('XADD', KEYS[1], '*', unpack(e[1][2])) end
    n = n + 1
  end
end
return n
"""
)

# KEYS: stream, dead. ARGV: group, consumer, id, count, field1, value1, ...
DEAD = (
    OWNED
    + """
if not owned(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4]) then return 0 end
redis.call('XADD', KEYS[2], '*', unpack(ARGV, 5))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
return 1
"""
)

# A publish is one script call that first sets a marker named by a token the call carries:
# redis-py sends a call again on a fresh connection when the first one's reply was lost,
# and that second send finds the marker and adds nothing. Marker and entries are written
# together, so either both or neither exist.
MARKED = """
if not redis.call('SET', KEYS[1], 1, 'NX', 'PX', ARGV[1]) then return 0 end
"""

# KEYS: marker, stream. ARGV: marker ttl ms, body1, ... -> 1, or 0 if sent before
PUBLISH = (
    MARKED
    + """
for i = 2, #ARGV do redis.call('XADD', KEYS[2], '*', 'b', ARGV[i]) end
return 1
"""
)

# KEYS: marker, delayed, payloads. ARGV: marker ttl ms, delay_ms, id1, body1, ...
PUBLISH_DELAYED = (
    OWNED
    + MARKED
    + """
local eta = now_ms() + tonumber(ARGV[2])
for i = 3, #ARGV, 2 do
  redis.call('ZADD', KEYS[2], eta, ARGV[i])
  redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
end
return 1
"""
)

# KEYS: stream, delayed, payloads. ARGV: limit -> ms until the next eta, or -1 if none.
# Any number of workers may run it at once: each due id moves exactly once. A payload
# behind the mark is a foreign entry's fields (`_redis_foreign.RETRY_RAW`).
_PROMOTE = """
local function promote(stream, delayed, payloads, most)
  local now = now_ms()
  local ids = redis.call('ZRANGE', delayed, '-inf', now, 'BYSCORE', 'LIMIT', 0, most)
  local mark = '\\0aioworkers-fields\\0'
  for _, id in ipairs(ids) do
    local body = redis.call('HGET', payloads, id)
    if body and string.sub(body, 1, #mark) == mark then
      redis.call('XADD', stream, '*', unpack(cmsgpack.unpack(string.sub(body, #mark + 1))))
    elseif body then
      redis.call('XADD', stream, '*', 'b', body)
    end
  end
  if #ids > 0 then
    redis.call('ZREM', delayed, unpack(ids))
    redis.call('HDEL', payloads, unpack(ids))
  end
  local nxt = redis.call('ZRANGE', delayed, 0, 0, 'WITHSCORES')
  if #nxt == 0 then return -1 end
  return math.max(0, tonumber(nxt[2]) - now)
end
"""

PROMOTE = OWNED + _PROMOTE + "return promote(KEYS[1], KEYS[2], KEYS[3], ARGV[1])\n"

# How a fetch reads the cancel mark of an entry it hands out (a state store on the same
# server keeps the marks: `RedisBroker.screen_cancel_marks`): the job id the Lua pattern
# finds in the body (field ``b``), or '' if it finds none, and 1 if the key ``marks`` ..
# job id exists, else 0.
_SCREEN = """
local function screen(fields, marks, pattern)
  for i = 1, #fields, 2 do
    if fields[i] == 'b' then
      local job_id = string.match(fields[i + 1], pattern)
      if not job_id then return '', 0 end
      return job_id, redis.call('GET', marks .. job_id) and 1 or 0
    end
  end
  return '', 0
end
"""

# A fetch that reads the cancel marks of what it hands out, in the same step.
# KEYS: stream, delayed, payloads. ARGV: group, consumer, count, most to promote, the marks'
# key prefix, the Lua pattern of a body's job id (`envelope.LUA_ID_PATTERN`)
# -> {ms to the next delayed job (-1: none), {id, fields, ...}, {job id or '', ...},
#     {1 if marked, else 0, ...}, after}: ``after`` is '' unless nothing was read, then the
# group's last-delivered-id. An entry a blocking read delivers to this consumer next has a
# higher id, and none it held before has: `SCREEN_DELIVERED` finds it so.
FETCH_SCREENED = (
    OWNED
    + _PROMOTE
    + _SCREEN
    + """
local next_eta = promote(KEYS[1], KEYS[2], KEYS[3], ARGV[4])
local reply = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[3],
  'STREAMS', KEYS[1], '>')
local entries, ids, marks = {}, {}, {}
if reply then
  for _, entry in ipairs(reply[1][2]) do
    entries[#entries + 1] = entry[1]
    entries[#entries + 1] = entry[2]
    local job_id, mark = screen(entry[2], ARGV[5], ARGV[6])
    ids[#ids + 1] = job_id
    marks[#marks + 1] = mark
  end
end
local after = ''
if #entries == 0 then
  after = '0-0'
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
    local info = {}
    for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
    if info['name'] == ARGV[1] then after = info['last-delivered-id'] end
  end
end
return {next_eta, entries, ids, marks, after}
"""
)

# Sent right behind a blocking XREADGROUP on the same connection, so the server runs it
# once that read is served: the cancel marks of the entries the read delivered, read after
# the delivery (a mark set before it is seen), without a round trip of its own.
# KEYS: stream. ARGV: group, consumer, after (FETCH_SCREENED's), count, the marks' key
# prefix, the job id pattern -> {entry id, job id or '', 1 if marked else 0, ...} for the
# entries pending for this consumer with ids above ``after``.
SCREEN_DELIVERED = (
    _SCREEN
    + """
local out = {}
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '(' .. ARGV[3], '+', ARGV[4], ARGV[2])
for _, p in ipairs(pending) do
  local e = redis.call('XRANGE', KEYS[1], p[1], p[1])
  if #e > 0 then
    local job_id, mark = screen(e[1][2], ARGV[5], ARGV[6])
    out[#out + 1] = p[1]
    out[#out + 1] = job_id
    out[#out + 1] = mark
  end
end
return out
"""
)

# KEYS: stream, leases. ARGV: group, consumer, min_idle_ms, cursor, count
# -> {next cursor, {{id, fields, delivery count}, ...}}
# Entries leased past the horizon (see EXTEND) are first made idle so that they reach
# min_idle at their deadline; then XAUTOCLAIM takes what is idle that long.
RECLAIM = (
    OWNED
    + """
local now, min_idle = now_ms(), tonumber(ARGV[3])
local long = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
for i = 1, #long, 2 do
  local id, deadline = long[i], tonumber(long[i + 1])
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
  if #p == 0 or deadline <= now then redis.call('ZREM', KEYS[2], id) end
  if #p > 0 then
    local idle = math.max(0, min_idle - (deadline - now))
    redis.call('XCLAIM', KEYS[1], ARGV[1], p[1][2], 0, id, 'IDLE', idle, 'JUSTID')
  end
end
local r = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], 'COUNT', ARGV[5])
local out = {}
for _, e in ipairs(r[2]) do
  if e and e[2] then
    local p = redis.call('XPENDING', KEYS[1], ARGV[1], e[1], e[1], 1)
    table.insert(out, {e[1], e[2], p[1][4]})
  end
end
return {r[1], out}
"""
)

# KEYS: stream. ARGV: group, min_idle_ms, self -> number of consumers removed.
# Consumers of crashed workers stay in the group forever; once they hold nothing and have
# been idle long, drop them. Atomic, so a consumer that just got entries is never dropped.
PRUNE = """
local n = 0
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local info = {}
  for i = 1, #c, 2 do info[c[i]] = c[i + 1] end
  if info['pending'] == 0 and info['idle'] > tonumber(ARGV[2]) and info['name'] ~= ARGV[3] then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
    n = n + 1
  end
end
return n
"""

# KEYS: stream, delayed, dead. ARGV: group -> {ready, in_flight, delayed, dead}
DEPTH = """
local len = redis.call('XLEN', KEYS[1])
local ok, p = pcall(redis.call, 'XPENDING', KEYS[1], ARGV[1])
local pending = 0
if ok then pending = tonumber(p[1]) end
return {len - pending, pending, redis.call('ZCARD', KEYS[2]), redis.call('XLEN', KEYS[3])}
"""

# KEYS: a key in the queue's slot that never exists. ARGV: group, consumer
# -> the commands aioworkers uses that the ACL user may not run. Each is tried so that it
# changes nothing (on a missing key, XX, NOMKSTREAM); any answer but a refusal means allowed.
PROBE = """
local k, g, c = KEYS[1], ARGV[1], ARGV[2]
local refused = {}
local function try(...)
  local args = {...}
  local ok, err = pcall(redis.call, unpack(args))
  if ok then return true end
  local text = type(err) == 'table' and err.err or tostring(err)
  if text:find('NOPERM', 1, true) or text:find("can't run", 1, true) then
    local name = args[1]
    if name == 'XGROUP' or name == 'XINFO' then name = name .. ' ' .. args[2] end
    table.insert(refused, name)
    return false
  end
  return true
end
try('XGROUP', 'CREATE', k, g, '0')
try('XREADGROUP', 'GROUP', g, c, 'COUNT', 1, 'STREAMS', k, '>')
try('XADD', k, 'NOMKSTREAM', '*', 'b', '')
try('XACK', k, g, '0-1')
try('XDEL', k, '0-1')
try('XRANGE', k, '-', '+', 'COUNT', 1)
try('XLEN', k)
try('XPENDING', k, g)
try('XCLAIM', k, g, c, 0, '0-1', 'JUSTID')
try('XAUTOCLAIM', k, g, c, 0, '0-0')
try('XINFO', 'CONSUMERS', k, g)
try('XINFO', 'STREAM', k)
try('XINFO', 'GROUPS', k)
try('XGROUP', 'DELCONSUMER', k, g, c)
try('ZADD', k, 'XX', 0, 'm')
try('ZRANGE', k, 0, 0)
try('ZREM', k, 'm')
try('ZCARD', k)
try('HGET', k, 'f')
try('SET', k, 1, 'XX')
try('DEL', k)
try('TIME')
-- HSET alone always writes: tried only where the HDEL that undoes it is allowed.
if try('HDEL', k, 'f') and try('HSET', k, 'f', '') then redis.call('HDEL', k, 'f') end
return refused
"""
