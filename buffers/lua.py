"""The Lua script of the Redis replay store: one atomic call per learner step (draw, then insert).

Keys (all under one hash tag, so a cluster keeps them on one node): ``meta`` (capacity, dtype,
shape, policy), ``seen`` (global stream counter), ``x`` (slot -> raw sample bytes), ``lab`` (slot ->
label), ``counts`` (label -> stored samples). The class-balanced policy adds ``stream`` (label ->
stream samples), ``full`` (set of full classes) and one sorted set of slots per class
(``cls:<label>``). A label is an opaque string to the script (the client's encoding of a class:
its path, or ``"level:y"``), so a class is the same class for every learner sharing the buffer.
Random numbers come in ARGV from the client's seeded generator: the script is deterministic and
needs no server-side RNG.

Keys of another type than the script's (a foreign writer's, or damage) are deleted, and counters that hold no
count (``seen`` missing, junk, or below the samples stored; a ``counts`` or ``stream`` value that is no integer;
a class's sorted set of another type) are rebuilt from the samples stored, each counted in the reply: a script
error would look like an outage to every learner, for good.

Arrays travel packed (little-endian doubles and int32, labels each after its '<i4' byte length,
cut and built with Redis' ``struct`` library), so a call has ten arguments and a reply ten values
whatever the batch sizes: the client's cost per call stays flat instead of growing with one
parsed value per sample.
"""

from __future__ import annotations

KEYS = ("meta", "seen", "x", "lab", "counts", "stream", "full", "cls:")

STEP = """
-- ARGV: capacity, dtype, shape, policy, item bytes, m (samples to draw), n (samples to insert),
-- m + 2n uniforms in [0, 1) ('<d' each), the n labels (each its '<i4' byte length, then its bytes), the n
-- samples' bytes back to back. Draws m distinct stored samples, then inserts the n.
-- Returns {dtype, shape, drawn slots (m '<i4', one string), drawn samples' bytes, seen, size, each inserted
-- sample's slot ('<i4', -1: not kept), counts as {label, count, ...} (m = n = 0 only; else {}), drawn labels
-- (their m '<i4' byte lengths, then the labels back to back; one string), the drawn samples' m '<i4' byte
-- lengths, the counter keys repaired}. A drawn slot whose label or bytes are missing (a field deleted, the key
-- evicted) reads as '': the client, which knows the sample size the meta's dtype and shape give, leaves out what
-- it cannot read.
local cap, policy, size, m, n = tonumber(ARGV[1]), ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local cbrs = policy == 'class-balanced'
local repaired = 0

local function rebuild_counts()  -- stored samples per class, from the labels stored
  redis.call('DEL', KEYS[5])
  local tally, flat = {}, redis.call('HGETALL', KEYS[4])
  for i = 2, #flat, 2 do tally[flat[i]] = (tally[flat[i]] or 0) + 1 end
  for label, count in pairs(tally) do redis.call('HSET', KEYS[5], label, count) end
  repaired = repaired + 1
end

local kinds = {'hash', 'string', 'hash', 'hash', 'hash', 'hash', 'set'}
for i = 1, 7 do
  local kind = redis.call('TYPE', KEYS[i]).ok
  if kind ~= 'none' and kind ~= kinds[i] then
    redis.call('DEL', KEYS[i])
    repaired = repaired + 1
  end
end
if redis.call('EXISTS', KEYS[5]) == 0 and redis.call('EXISTS', KEYS[4]) == 1 then rebuild_counts() end
if cbrs and redis.call('EXISTS', KEYS[6]) == 0 and redis.call('EXISTS', KEYS[5]) == 1 then
  -- the stream counts of classes are lost: their stored counts are the closest lower bound
  local flat = redis.call('HGETALL', KEYS[5])
  for i = 1, #flat, 2 do redis.call('HSET', KEYS[6], flat[i], flat[i + 1]) end
  repaired = repaired + 1
end

local function recount(updates)  -- {label, delta} pairs; on a counter that holds no integer, all rebuilt instead
  for _, update in ipairs(updates) do
    local count = redis.pcall('HINCRBY', KEYS[5], update[1], update[2])
    if type(count) == 'table' or count < 0 then rebuild_counts() return end  -- no integer, or a field lost
    if count <= 0 then redis.call('HDEL', KEYS[5], update[1]) end
  end
end

local function rebuild_class(label)  -- class label's sorted set of slots, from the labels stored
  redis.call('DEL', KEYS[8] .. label)
  local flat = redis.call('HGETALL', KEYS[4])
  for i = 1, #flat, 2 do
    if flat[i + 1] == label then redis.call('ZADD', KEYS[8] .. label, flat[i], flat[i]) end
  end
  repaired = repaired + 1
end

local function class_slots(label, command, ...)  -- a command on class label's sorted set, rebuilt if another type
  local answer = redis.pcall(command, KEYS[8] .. label, ...)
  if type(answer) == 'table' and answer.err then
    rebuild_class(label)
    answer = redis.call(command, KEYS[8] .. label, ...)
  end
  return answer
end

local meta = redis.call('HMGET', KEYS[1], 'capacity', 'dtype', 'shape', 'policy')
if n > 0 then
  if not meta[1] then
    redis.call('HSET', KEYS[1], 'capacity', cap, 'dtype', ARGV[2], 'shape', ARGV[3], 'policy', policy)
    meta = {ARGV[1], ARGV[2], ARGV[3], policy}
  elseif tonumber(meta[1]) ~= cap or meta[2] ~= ARGV[2] or meta[3] ~= ARGV[3] or meta[4] ~= policy then
    return redis.error_reply('SHAPE buffer holds capacity ' .. meta[1] .. ' of ' .. meta[2] .. '[' .. meta[3] ..
      '] by ' .. meta[4])
  end
end

local function uniform(i) return (struct.unpack('<d', ARGV[8], 8 * i - 7)) end

local function hmget(key, fields)  -- in chunks: unpack() of a whole large draw would overflow Lua's stack
  local out = {}
  for first = 1, #fields, 1000 do
    local part = redis.call('HMGET', key, unpack(fields, first, math.min(first + 999, #fields)))
    for i = 1, #part do out[#out + 1] = part[i] end
  end
  return out
end

-- Draw: Floyd's algorithm, m distinct slots of 0..stored-1, uniformly.
local stored = redis.call('HLEN', KEYS[4])
local requested = m  -- the insert's uniforms follow all m requested ones, however many are drawn
m = math.min(m, stored)
local drawn, samples, sizes, lengths, drawn_labels = {}, {}, {}, {}, {}
if m > 0 then
  local chosen, order = {}, {}
  for k = 1, m do
    local j = stored - m + k - 1
    local t = math.min(math.floor(uniform(k) * (j + 1)), j)
    if chosen[t] then t = j end
    chosen[t] = true
    order[k] = t
  end
  local labels, xs = hmget(KEYS[4], order), hmget(KEYS[3], order)
  for k = 1, m do
    local label, x = labels[k] or '', xs[k] or ''  -- HMGET gives false for a missing field
    drawn[k] = struct.pack('<i4', order[k])
    lengths[k], drawn_labels[k] = struct.pack('<i4', #label), label
    sizes[k], samples[k] = struct.pack('<i4', #x), x
  end
end

-- Insert. reservoir: exact Algorithm R over the global counter (sample t -> slot t-1 while t <= M, else
-- slot floor(u*t) when < M). class-balanced: CBRS (Chrysakis & Moens 2020), as buffers.balanced does it.
local function write(slot, label, bytes)
  local old = redis.call('HGET', KEYS[4], slot)
  redis.call('HSET', KEYS[4], slot, label)
  if old then
    recount({{old, -1}, {label, 1}})
    if cbrs then class_slots(old, 'ZREM', slot) end
  else
    recount({{label, 1}})
  end
  if cbrs then class_slots(label, 'ZADD', slot, slot) end
  redis.call('HSET', KEYS[3], slot, bytes)
end

local function pick(label, count, u)  -- a uniformly drawn slot of class label
  local rank = math.min(math.floor(u * count), count - 1)
  local slot = class_slots(label, 'ZRANGE', rank, rank)[1]
  if not slot then  -- the set lost slots (evicted): rebuilt; still none, and the sample is not kept
    rebuild_class(label)
    slot = redis.call('ZRANGE', KEYS[8] .. label, rank, rank)[1]
  end
  return tonumber(slot) or -1
end

local function seen_of(label)  -- a class's stream count, one more; counts stored stand in for a junk one
  local n_c = redis.pcall('HINCRBY', KEYS[6], label, 1)
  if type(n_c) == 'table' then
    redis.call('HSET', KEYS[6], label, redis.call('HGET', KEYS[5], label) or '0')
    repaired = repaired + 1
    n_c = redis.call('HINCRBY', KEYS[6], label, 1)
  end
  return n_c
end

local function all_counts()  -- rebuilt if a count is no count or one is missing (they must add up to the samples)
  local flat, total = redis.call('HGETALL', KEYS[5]), 0
  for i = 2, #flat, 2 do
    local c = tonumber(flat[i])
    if not c or c < 1 or c ~= math.floor(c) then
      total = -1
      break
    end
    total = total + c
  end
  if total ~= redis.call('HLEN', KEYS[4]) then
    rebuild_counts()
    return redis.call('HGETALL', KEYS[5])
  end
  return flat
end

local function balanced(label, u1, u2)  -- the CBRS decision once the buffer is full
  local n_c = seen_of(label)
  local flat, best, largest = all_counts(), -1, {}
  for i = 1, #flat, 2 do
    local c = tonumber(flat[i + 1])
    if c > best then best, largest = c, {flat[i]} elseif c == best then largest[#largest + 1] = flat[i] end
  end
  table.sort(largest)  -- hash order differs between servers; sorted keeps runs reproducible
  for first = 1, #largest, 1000 do  -- in chunks, as hmget: every class may be tied
    redis.call('SADD', KEYS[7], unpack(largest, first, math.min(first + 999, #largest)))
  end
  if redis.call('SISMEMBER', KEYS[7], label) == 0 then
    return pick(largest[math.min(math.floor(u1 * #largest) + 1, #largest)], best, u2)
  end
  local m_c = tonumber(redis.call('HGET', KEYS[5], label) or '0')
  if u1 < m_c / n_c then return pick(label, m_c, u2) end
  return -1
end

local seen = tonumber(redis.call('GET', KEYS[2]) or '0')
-- junk (tonumber takes 'inf' too), evicted, or fewer than the samples stored
if not seen or seen < stored or seen ~= math.floor(seen) or seen > 2 ^ 53 then
  seen = stored
  redis.call('SET', KEYS[2], seen)
  repaired = repaired + 1
end
local slots, at = {}, 1
for k = 1, n do
  seen = seen + 1
  local length, start = struct.unpack('<i4', ARGV[9], at)
  local label, u1, u2 = string.sub(ARGV[9], start, start + length - 1), uniform(requested + 2 * k - 1),
    uniform(requested + 2 * k)
  at = start + length
  local slot = seen - 1
  if seen <= cap then
    if cbrs then seen_of(label) end
  elseif cbrs then
    slot = balanced(label, u1, u2)
  else
    slot = math.floor(u1 * seen)
    if slot >= cap then slot = -1 end
  end
  if slot >= 0 then write(slot, label, string.sub(ARGV[10], (k - 1) * size + 1, k * size)) end
  slots[k] = slot
end
if n > 0 then redis.call('SET', KEYS[2], seen) end
local written, packed = {}, {}
for k = n, 1, -1 do  -- a slot written twice in the batch keeps the later sample: the earlier one gets -1
  if slots[k] >= 0 and written[slots[k]] then slots[k] = -1 elseif slots[k] >= 0 then written[slots[k]] = true end
  packed[k] = struct.pack('<i4', slots[k])
end
local counts = {}  -- only when asked (a call that neither draws nor inserts): its size grows with the classes
if tonumber(ARGV[6]) == 0 and n == 0 then counts = redis.call('HGETALL', KEYS[5]) end
return {meta[2] or '', meta[3] or '', table.concat(drawn), table.concat(samples), seen, redis.call('HLEN', KEYS[4]),
  table.concat(packed), counts, table.concat(lengths) .. table.concat(drawn_labels), table.concat(sizes), repaired}
"""
