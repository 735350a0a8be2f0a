"""The Redis store's scripts: each operation is one script, so one atomic step on the server.

Leases and token buckets run on the server's clock (TIME), the same for every worker.
Job scripts take many jobs at once (KEYS in pairs: the record hash, its notify list) so a
batch of records costs one round trip, and their fields packed as one JSON argument (a
result, bytes the store does not read, as an argument of its own): each argument costs
the client more to encode than the server to decode.
"""

from __future__ import annotations

_FINAL = "local FINAL = {succeeded = true, failed = true, cancelled = true}\n"

_NOW_MS = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

# -- idempotency claims: a string key, 'c:<owner>' while claimed, 'd' once done -------------

# KEYS: key. ARGV: owner, lease ms -> 'claimed' | 'done' | 'busy'
CLAIM = """
local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('SET', KEYS[1], 'c:' .. ARGV[1], 'PX', ARGV[2])
  return 'claimed'
end
if v == 'd' then return 'done' end
return 'busy'
"""

# KEYS: key. ARGV: owner, ttl ms -> 1 if completed, 0 if the owner no longer holds it
COMPLETE = """
if redis.call('GET', KEYS[1]) ~= 'c:' .. ARGV[1] then return 0 end
redis.call('SET', KEYS[1], 'd', 'PX', ARGV[2])
return 1
"""

# KEYS: key. ARGV: owner -> 1 if released, 0 if the owner no longer holds it
RELEASE = """
if redis.call('GET', KEYS[1]) ~= 'c:' .. ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
"""

# -- job records: a hash per job, and a notify list that a finish pushes to ------------------

# KEYS: record, notify (a pair per job). ARGV[1]: a JSON array, per job [ttl ms, final
# ('0'/'1'), [field, value, ...], has result (0/1)]; ARGV[1 + j]: job j's result (if it
# has one: bytes are not JSON). Replaces each record whole; a new record starts with an
# empty notify list.
PUT_JOBS = """
local jobs = cjson.decode(ARGV[1])
for j = 1, #jobs do
  local record, notify = KEYS[2 * j - 1], KEYS[2 * j]
  local ttl, final, items, has_result = unpack(jobs[j])
  redis.call('DEL', record, notify)
  if has_result == 1 then
    items[#items + 1] = 'result'
    items[#items + 1] = ARGV[1 + j]
  end
  redis.call('HSET', record, unpack(items))
  redis.call('PEXPIRE', record, ttl)
  if final == '1' then
    redis.call('RPUSH', notify, '1')
    redis.call('PEXPIRE', notify, ttl)
  end
end
return 1
"""

# KEYS: one record per job. ARGV[1]: a JSON array, per job [ttl ms, expected statuses
# (',a,b,' or ''), [field, value, ...]]. -> per job, the status before ('' if no record).
UPDATE_JOBS = (
    _FINAL
    + """
local jobs = cjson.decode(ARGV[1])
local out = {}
for k = 1, #KEYS do
  local ttl, expect, items = jobs[k][1], jobs[k][2], jobs[k][3]
  local s = redis.call('HGET', KEYS[k], 'status')
  out[k] = s or ''
  if s and not FINAL[s] and (expect == '' or string.find(expect, ',' .. s .. ',', 1, true)) then
    if #items > 0 then redis.call('HSET', KEYS[k], unpack(items)) end
    redis.call('PEXPIRE', KEYS[k], ttl)
  end
end
return out
"""
)

# KEYS: record, notify (a pair per job). ARGV[1]: a JSON array, per job [ttl ms, task,
# queue, [fields to clear], [field, value, ...], has result (0/1)]; ARGV[1 + j]: job j's
# result (if it has one). -> per job, the status before ('' if it was created).
FINISH_JOBS = (
    _FINAL
    + """
local jobs = cjson.decode(ARGV[1])
local out = {}
for j = 1, #jobs do
  local record, notify = KEYS[2 * j - 1], KEYS[2 * j]
  local ttl, task, queue, cleared, items, has_result = unpack(jobs[j])
  local s = redis.call('HGET', record, 'status')
  out[j] = s or ''
  if not (s and FINAL[s]) then
    if not s then
      redis.call('DEL', record)
      redis.call('HSET', record, 'task', task, 'queue', queue, 'attempt', '1')
    end
    if #cleared > 0 then redis.call('HDEL', record, unpack(cleared)) end
    if has_result == 1 then
      items[#items + 1] = 'result'
      items[#items + 1] = ARGV[1 + j]
    end
    redis.call('HSET', record, unpack(items))
    redis.call('PEXPIRE', record, ttl)
    redis.call('RPUSH', notify, '1')
    redis.call('PEXPIRE', notify, ttl)
  end
end
return out
"""
)

# KEYS: record, notify, mark. ARGV: ttl ms, now (epoch seconds), known only (0/1) -> 1 if
# marked, 0 if the job has ended (or, known only, has no record). A job not running yet
# ends as cancelled here; a running one is marked.
MARK_CANCELLED = (
    _FINAL
    + """
local s = redis.call('HGET', KEYS[1], 'status')
if s and FINAL[s] then return 0 end
if not s and ARGV[3] == '1' then return 0 end
redis.call('SET', KEYS[3], '1', 'PX', ARGV[1])
if s and s ~= 'running' then
  redis.call('HDEL', KEYS[1], 'error_type', 'error', 'traceback', 'result', 'result_error')
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[2])
  redis.call('RPUSH', KEYS[2], '1')
  redis.call('PEXPIRE', KEYS[2], ARGV[1])
end
return 1
"""
)

# -- unique keys: a string holding the holder's job id ---------------------------------------

# KEYS: key. ARGV: job id, ttl ms -> the other holder's id, or nil (held by this job now)
HOLD_UNIQUE = """
local v = redis.call('GET', KEYS[1])
if v and v ~= ARGV[1] then return v end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
"""

# KEYS: key. ARGV: job id -> 1 if freed, 0 if another job (or none) holds it
FREE_UNIQUE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
"""

# -- limit leases: a sorted set, owner -> the server ms its lease ends -----------------------

_KEEP_UNTIL_LAST = """
local function keep_until_last(key, now)
  local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  if last[2] then redis.call('PEXPIRE', key, math.max(1, tonumber(last[2]) - now)) end
end
"""

# KEYS: set. ARGV: owner, limit, lease ms -> 1 if the owner holds a lease now, else 0
ACQUIRE_LEASE = (
    _NOW_MS
    + _KEEP_UNTIL_LAST
    + """
local now = now_ms()
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[1])
    and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
keep_until_last(KEYS[1], now)
return 1
"""
)

# The heartbeat, one round trip. KEYS: claims (nc), lease sets (nl), cancel marks.
# ARGV: lease ms, nc, nl, the claims' owners, the leases' owners.
# -> {per claim 1/0 (kept), per lease 1/0 (kept), per mark 1/0 (set)}
BEAT = (
    _NOW_MS
    + _KEEP_UNTIL_LAST
    + """
local ms, nc, nl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local claims, leases, marks = {}, {}, {}
for i = 1, nc do
  claims[i] = 0
  if redis.call('GET', KEYS[i]) == 'c:' .. ARGV[3 + i] then
    redis.call('PEXPIRE', KEYS[i], ms)
    claims[i] = 1
  end
end
local now = now_ms()
for j = 1, nl do
  local key, owner = KEYS[nc + j], ARGV[3 + nc + j]
  local until_ = redis.call('ZSCORE', key, owner)
  leases[j] = 0
  if until_ and tonumber(until_) > now then
    redis.call('ZADD', key, now + ms, owner)
    keep_until_last(key, now)
    leases[j] = 1
  elseif until_ then
    redis.call('ZREM', key, owner)
  end
end
for k = nc + nl + 1, #KEYS do
  marks[#marks + 1] = redis.call('GET', KEYS[k]) and 1 or 0
end
return {claims, leases, marks}
"""
)

# The cancel marks of many jobs (a fetched batch). ARGV: the marks' key prefix, the job ids
# as one JSON array (one argument: each costs the client more to encode than the script to
# decode) -> the ids that have a mark. The keys are built here, so not declared (the store
# is for one Redis server, not a cluster).
MARKS = """
local ids = cjson.decode(ARGV[2])
local marked = {}
for i = 1, #ids do
  if redis.call('GET', ARGV[1] .. ids[i]) then marked[#marked + 1] = ids[i] end
end
return marked
"""

# KEYS: set. ARGV: owner -> 1 if it held a live lease (now freed), else 0
RELEASE_LEASE = (
    _NOW_MS
    + """
local until_ = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not until_ then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
if tonumber(until_) <= now_ms() then return 0 end
return 1
"""
)

# -- token buckets: a hash of tokens and the time they were counted --------------------------

# KEYS: bucket. ARGV: rate, per (seconds), now (epoch seconds, '' for the server's)
# -> seconds to wait (a string: Redis cuts numbers to integers), '0' if a token was taken
TAKE = """
local rate, per = tonumber(ARGV[1]), tonumber(ARGV[2])
local at
if ARGV[3] == '' then
  local t = redis.call('TIME')
  at = tonumber(t[1]) + tonumber(t[2]) / 1000000
else
  at = tonumber(ARGV[3])
end
local b = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens, since = rate, at
if b[1] then tokens, since = tonumber(b[1]), tonumber(b[2]) end
tokens = math.min(rate, tokens + math.max(0, at - since) * rate / per)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) * per / rate end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens),
  'at', string.format('%.17g', at))
redis.call('PEXPIRE', KEYS[1], math.ceil(per * 1000))
return string.format('%.17g', wait)
"""
