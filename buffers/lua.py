"""Lua scripts of the Redis replay store: one atomic call per micro-batch insert, one per sample.

Keys (all under one hash tag, so a cluster keeps them on one node): ``meta`` (capacity, dtype,
shape, policy), ``seen`` (global stream counter), ``x`` (slot -> raw sample bytes), ``lab`` (slot ->
``"level:y"``), ``counts`` (``"level:y"`` -> stored samples). The class-balanced policy adds
``stream`` (``"level:y"`` -> stream samples), ``full`` (set of full classes) and one sorted set of
slots per class (``cls:<level:y>``). Random numbers come in ARGV from the client's seeded
generator: the scripts are deterministic and need no server-side RNG.
"""

from __future__ import annotations

KEYS = ("meta", "seen", "x", "lab", "counts", "stream", "full", "cls:")

INSERT = """
-- ARGV: capacity, dtype, shape, policy, n, item bytes, the n samples' bytes back to back,
-- 2n uniforms in [0, 1), n labels. Returns {slots, seen, size, counts as "label count ...").
-- reservoir: exact Algorithm R over the global counter (sample t -> slot t-1 while t <= M, else slot
-- floor(u*t) when < M). class-balanced: CBRS (Chrysakis & Moens 2020), as buffers.balanced does it.
local cap, policy, n, size = tonumber(ARGV[1]), ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
local cbrs = policy == 'class-balanced'
local meta = redis.call('HMGET', KEYS[1], 'capacity', 'dtype', 'shape', 'policy')
if meta[1] then
  if tonumber(meta[1]) ~= cap or meta[2] ~= ARGV[2] or meta[3] ~= ARGV[3] or meta[4] ~= policy then
    return redis.error_reply('SHAPE buffer holds capacity ' .. meta[1] .. ' of ' .. meta[2] .. '[' .. meta[3] ..
      '] by ' .. meta[4])
  end
else
  redis.call('HSET', KEYS[1], 'capacity', cap, 'dtype', ARGV[2], 'shape', ARGV[3], 'policy', policy)
end

local function write(slot, label, data)
  local old = redis.call('HGET', KEYS[4], slot)
  if old then
    if redis.call('HINCRBY', KEYS[5], old, -1) <= 0 then redis.call('HDEL', KEYS[5], old) end
    if cbrs then redis.call('ZREM', KEYS[8] .. old, slot) end
  end
  redis.call('HSET', KEYS[4], slot, label)
  redis.call('HINCRBY', KEYS[5], label, 1)
  if cbrs then redis.call('ZADD', KEYS[8] .. label, slot, slot) end
  redis.call('HSET', KEYS[3], slot, data)
end

local function pick(label, stored, u)  -- a uniformly drawn slot of class label
  local rank = math.min(math.floor(u * stored), stored - 1)
  return tonumber(redis.call('ZRANGE', KEYS[8] .. label, rank, rank)[1])
end

local function balanced(label, u1, u2)  -- the CBRS decision once the buffer is full
  local n_c = redis.call('HINCRBY', KEYS[6], label, 1)
  local flat, best, largest = redis.call('HGETALL', KEYS[5]), -1, {}
  for i = 1, #flat, 2 do
    local c = tonumber(flat[i + 1])
    if c > best then best, largest = c, {flat[i]} elseif c == best then largest[#largest + 1] = flat[i] end
  end
  table.sort(largest)  -- hash order differs between servers; sorted keeps runs reproducible
  redis.call('SADD', KEYS[7], unpack(largest))
  if redis.call('SISMEMBER', KEYS[7], label) == 0 then
    return pick(largest[math.min(math.floor(u1 * #largest) + 1, #largest)], best, u2)
  end
  local m_c = tonumber(redis.call('HGET', KEYS[5], label) or '0')
  if u1 < m_c / n_c then return pick(label, m_c, u2) end
  return -1
end

local seen = tonumber(redis.call('GET', KEYS[2]) or '0')
local slots = {}
for k = 1, n do
  seen = seen + 1
  local label, u1, u2 = ARGV[7 + 2 * n + k], tonumber(ARGV[6 + 2 * k]), tonumber(ARGV[7 + 2 * k])
  local slot = seen - 1
  if seen <= cap then
    if cbrs then redis.call('HINCRBY', KEYS[6], label, 1) end
  elseif cbrs then
    slot = balanced(label, u1, u2)
  else
    slot = math.floor(u1 * seen)
    if slot >= cap then slot = -1 end
  end
  if slot >= 0 then write(slot, label, string.sub(ARGV[7], (k - 1) * size + 1, k * size)) end
  slots[k] = slot
end
redis.call('SET', KEYS[2], seen)
return {slots, seen, redis.call('HLEN', KEYS[4]), table.concat(redis.call('HGETALL', KEYS[5]), ' ')}
"""

SAMPLE = """
-- ARGV: n, then n uniforms in [0, 1). Floyd's algorithm: n distinct slots of 0..size-1, uniformly.
-- Returns {slots, labels, blobs, dtype, shape, size}.
local size = redis.call('HLEN', KEYS[4])
local n = math.min(tonumber(ARGV[1]), size)
local meta = redis.call('HMGET', KEYS[1], 'dtype', 'shape')
if n == 0 then return {{}, {}, {}, meta[1], meta[2], size} end
local chosen, order = {}, {}
for k = 1, n do
  local j = size - n + k - 1
  local t = math.min(math.floor(tonumber(ARGV[k + 1]) * (j + 1)), j)
  if chosen[t] then t = j end
  chosen[t] = true
  order[k] = t
end
local labels = redis.call('HMGET', KEYS[4], unpack(order))
return {order, labels, redis.call('HMGET', KEYS[3], unpack(order)), meta[1], meta[2], size}
"""

STATS = """
-- Returns {seen, size, counts as "label count ..."} without changing anything.
local seen = tonumber(redis.call('GET', KEYS[2]) or '0')
return {seen, redis.call('HLEN', KEYS[4]), table.concat(redis.call('HGETALL', KEYS[5]), ' ')}
"""
