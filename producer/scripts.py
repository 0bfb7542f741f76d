"""The Lua scripts of protocol v1: each is one atomic step on the Redis server.

Every script is published verbatim in docs/protocol.md (a test keeps the two equal): `SUBMIT` so
that producers in other languages run the very same script, the worker-side ones as the contract
of a worker. The worker-side scripts (`READ`, `FINAL`, `DEAD`, `CHUNKS`, `FORGET`, `SETTLE`) keep
the indexes right, make "reply + XACK + XDEL" one step, write a step's streamed chunks in one command
and retire the queues of bad names; `lorafleet.producer.consumer` wraps them.

The indexes, and which script keeps each:

- ``{ns}:waiting`` (queues with undelivered jobs): SUBMIT adds a queue (``ZADD NX``), READ moves
  its score on or removes it when it delivers the last undelivered entry.
- ``{ns}:pending`` (queues with entries pending in the group: delivered, not answered): READ adds a
  queue when it delivers entries from it; FINAL and DEAD remove it when their XACK left nothing
  pending in its stream; FORGET removes it with the queue; SETTLE sets it right for given queues.
  Claims (XCLAIM) only move entries that are pending already, so they need not touch it. Recovery
  reads this set, never the set of every queue: its cost follows the work in flight.
- ``{ns}:queues`` (queues that may hold jobs): SUBMIT adds a queue when it starts waiting (its
  ``ZADD NX`` added it to ``waiting``); FINAL and DEAD remove it when its stream is left empty
  with nothing pending. A pruned queue is in no index: a queue is in ``waiting`` only while its
  stream holds an undelivered entry, so an empty stream means it is not waiting, and the next
  submit's ``ZADD NX`` adds it to ``waiting`` and ``queues`` again.

All of them run on Redis 6.2 and later (exclusive XRANGE bounds need 6.2).
"""

from __future__ import annotations

SUBMIT = """\
-- lorafleet submit, protocol v1
-- KEYS[1] job stream {ns}:jobs:{queue}   KEYS[2] {ns}:waiting   KEYS[3] {ns}:wake
-- KEYS[4] {ns}:job:{id} (idempotency)    KEYS[5] {ns}:queues
-- ARGV[1] job (msgpack)   ARGV[2] queue   ARGV[3] max waiting per adapter (0: no limit)
-- ARGV[4] idempotency TTL (ms)   ARGV[5] wake stream MAXLEN   ARGV[6] consumer group
-- Returns {'ok', entry id} | {'duplicate', entry id of the first submit} | {'full', stream length}
local first = redis.call('GET', KEYS[4])
if first then
  return {'duplicate', first}
end
local length = redis.call('XLEN', KEYS[1])
local limit = tonumber(ARGV[3])
if limit > 0 and length >= limit then
  return {'full', length}
end
if length == 0 and redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('XGROUP', 'CREATE', KEYS[1], ARGV[6], '0', 'MKSTREAM')
end
local id = redis.call('XADD', KEYS[1], '*', 'j', ARGV[1])
redis.call('SET', KEYS[4], id, 'PX', ARGV[4])
-- A queue that was already waiting has been recorded and announced when it started waiting.
if redis.call('ZADD', KEYS[2], 'NX', string.match(id, '^%d+'), ARGV[2]) == 1 then
  redis.call('SADD', KEYS[5], ARGV[2])
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', 'q', ARGV[2])
end
return {'ok', id}
"""

READ = """\
-- lorafleet worker read, protocol v1: XREADGROUP new entries and keep {ns}:waiting right
-- KEYS[1] {ns}:waiting   KEYS[2] {ns}:pending   KEYS[3..n] job streams
-- ARGV[1] group   ARGV[2] consumer   ARGV[3] COUNT per stream   ARGV[4..] queue of KEYS[3..n]
-- Returns a flat array: queue, entry id, job bytes, queue, entry id, job bytes, ...
-- A job stream without the group (written by hand, not by the submit script) gets it, from its first
-- entry; a queue whose key is missing or not a stream leaves the index. A queue it delivers entries
-- from joins {ns}:pending.
local out = {}
local count = tonumber(ARGV[3])
for i = 3, #KEYS do
  local queue = ARGV[i + 1]
  local oldest = false
  if redis.call('TYPE', KEYS[i]).ok == 'stream' then
    local read = {'XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', count, 'STREAMS', KEYS[i], '>'}
    local res = redis.pcall(unpack(read))
    if type(res) == 'table' and res.err then
      if not string.find(res.err, 'NOGROUP', 1, true) then return redis.error_reply(res.err) end
      redis.call('XGROUP', 'CREATE', KEYS[i], ARGV[1], '0')
      res = redis.call(unpack(read))
    end
    local entries = res and res[1][2] or {}
    for _, entry in ipairs(entries) do
      local job = ''
      for f = 1, #entry[2], 2 do
        if entry[2][f] == 'j' then job = entry[2][f + 1] end
      end
      out[#out + 1] = queue
      out[#out + 1] = entry[1]
      out[#out + 1] = job
    end
    if #entries > 0 then
      redis.call('SADD', KEYS[2], queue)
    end
    if #entries == count then
      local more = redis.call('XRANGE', KEYS[i], '(' .. entries[#entries][1], '+', 'COUNT', 1)
      if #more > 0 then oldest = more[1][1] end
    end
  end
  if oldest then
    redis.call('ZADD', KEYS[1], string.match(oldest, '^%d+'), queue)
  else
    redis.call('ZREM', KEYS[1], queue)
  end
end
return out
"""

FINAL = """\
-- lorafleet final reply, protocol v1: reply, XACK and XDEL in one step
-- KEYS[1] job stream   KEYS[2] reply stream   KEYS[3] {ns}:dead   KEYS[4] {ns}:pending
-- KEYS[5] {ns}:queues
-- ARGV[1] group   ARGV[2] entry id   ARGV[3] reply (msgpack)   ARGV[4] reply TTL (ms)   ARGV[5] queue
-- Returns 1; 0 (and writes nothing) when the entry was not pending: another worker answered it;
-- -1 when the reply stream cannot take the reply (its key holds another type): the job is
-- dead-lettered instead, so that it never stays acknowledged in its stream.
-- When nothing is left pending in the stream, the queue leaves {ns}:pending, and {ns}:queues too
-- when the stream is empty.
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then
  return 0
end
local answered = 1
local sent = redis.pcall('XADD', KEYS[2], '*', 'r', ARGV[3])
if type(sent) == 'table' and sent.err then
  local job = ''
  local entry = redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2])[1]
  if entry then
    for f = 1, #entry[2], 2 do
      if entry[2][f] == 'j' then job = entry[2][f + 1] end
    end
  end
  redis.call('XADD', KEYS[3], '*', 'j', job, 'stream', KEYS[1], 'entry', ARGV[2],
    'reason', 'reply not written to ' .. KEYS[2] .. ': ' .. sent.err, 'deliveries', 0)
  answered = -1
else
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
end
redis.call('XDEL', KEYS[1], ARGV[2])
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1) == 0 then
  redis.call('SREM', KEYS[4], ARGV[5])
  if redis.call('XLEN', KEYS[1]) == 0 then
    redis.call('SREM', KEYS[5], ARGV[5])
  end
end
return answered
"""

CHUNKS = """\
-- lorafleet streamed chunks, protocol v1: XADD each chunk to its reply stream and refresh its expiry
-- KEYS[i] reply stream of chunk i   ARGV[2i-1] chunk i (msgpack)   ARGV[2i] its reply TTL (ms)
-- Returns the number of chunks written: one that fails (a key of another type) does not stop the rest.
local written = 0
for i, key in ipairs(KEYS) do
  local id = redis.pcall('XADD', key, '*', 'r', ARGV[2 * i - 1])
  if type(id) ~= 'table' or not id.err then
    redis.pcall('PEXPIRE', key, ARGV[2 * i])
    written = written + 1
  end
end
return written
"""

DEAD = """\
-- lorafleet dead letter, protocol v1: copy to {ns}:dead, optionally reply, XACK and XDEL in one step
-- KEYS[1] job stream   KEYS[2] {ns}:dead   KEYS[3] {ns}:pending   KEYS[4] {ns}:queues
-- KEYS[5] reply stream (optional)
-- ARGV[1] group   ARGV[2] entry id   ARGV[3] job bytes   ARGV[4] reason   ARGV[5] deliveries
-- ARGV[6] queue   ARGV[7] reply (msgpack, with KEYS[5])   ARGV[8] reply TTL (ms, with KEYS[5])
-- Returns 1, or 0 (and writes nothing) when the entry was not pending. A reply the reply stream
-- cannot take (its key holds another type) is left out and the reason says so.
-- When nothing is left pending in the stream, the queue leaves {ns}:pending, and {ns}:queues too
-- when the stream is empty.
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then
  return 0
end
local reason = ARGV[4]
if KEYS[5] then
  local sent = redis.pcall('XADD', KEYS[5], '*', 'r', ARGV[7])
  if type(sent) == 'table' and sent.err then
    reason = reason .. '; reply not written to ' .. KEYS[5] .. ': ' .. sent.err
  else
    redis.call('PEXPIRE', KEYS[5], ARGV[8])
  end
end
redis.call('XADD', KEYS[2], '*', 'j', ARGV[3], 'stream', KEYS[1], 'entry', ARGV[2],
  'reason', reason, 'deliveries', ARGV[5])
redis.call('XDEL', KEYS[1], ARGV[2])
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1) == 0 then
  redis.call('SREM', KEYS[3], ARGV[6])
  if redis.call('XLEN', KEYS[1]) == 0 then
    redis.call('SREM', KEYS[4], ARGV[6])
  end
end
return 1
"""

FORGET = """\
-- lorafleet forget a queue, protocol v1: drop a queue from {ns}:queues and {ns}:pending once its
-- stream holds nothing
-- KEYS[1] job stream   KEYS[2] {ns}:queues   KEYS[3] {ns}:pending   ARGV[1] queue
-- Returns 1 when the queue was dropped (an empty job stream is deleted, with its group and whatever
-- it still counted as pending), 0 when entries remain.
local kind = redis.call('TYPE', KEYS[1]).ok
if kind == 'stream' then
  if redis.call('XLEN', KEYS[1]) > 0 then
    return 0
  end
  redis.call('DEL', KEYS[1])
end
redis.call('SREM', KEYS[2], ARGV[1])
redis.call('SREM', KEYS[3], ARGV[1])
return 1
"""

SETTLE = """\
-- lorafleet settle queues, protocol v1: set {ns}:pending right for some queues, and acknowledge
-- entries deleted while pending
-- KEYS[1] {ns}:pending   KEYS[2] {ns}:queues   KEYS[3..n] job streams
-- ARGV[1] group   then for each of KEYS[3..n] in turn: its queue, a count k, and k entry ids
-- Each of those entry ids that is no longer in its stream is acknowledged (an entry deleted while
-- pending stays pending for ever on Redis 6.2). A queue with entries pending joins {ns}:pending;
-- any other (nothing pending, its key missing or not a stream, no group) leaves it, and leaves
-- {ns}:queues too when it holds no jobs. Returns the number of entries acknowledged.
local acked = 0
local a = 2
for i = 3, #KEYS do
  local queue = ARGV[a]
  local ids = {}
  for j = 1, tonumber(ARGV[a + 1]) do
    ids[j] = ARGV[a + 1 + j]
  end
  a = a + 2 + #ids
  local kind = redis.call('TYPE', KEYS[i]).ok
  local pending = false
  if kind == 'stream' then
    local rows = redis.pcall('XPENDING', KEYS[i], ARGV[1], '-', '+', 1)
    if not rows.err then
      local before = acked
      for _, id in ipairs(ids) do
        if #redis.call('XRANGE', KEYS[i], id, id) == 0 then
          acked = acked + redis.call('XACK', KEYS[i], ARGV[1], id)
        end
      end
      if acked > before then
        rows = redis.call('XPENDING', KEYS[i], ARGV[1], '-', '+', 1)
      end
      pending = #rows > 0
    end
  end
  if pending then
    redis.call('SADD', KEYS[1], queue)
  else
    redis.call('SREM', KEYS[1], queue)
    if kind == 'none' or (kind == 'stream' and redis.call('XLEN', KEYS[i]) == 0) then
      redis.call('SREM', KEYS[2], queue)
    end
  end
end
return acked
"""
