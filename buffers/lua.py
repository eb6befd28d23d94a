"""Lua scripts of the Redis replay store: one atomic call per micro-batch insert, one per sample.

Keys (all under one hash tag, so a cluster keeps them on one node): ``meta`` (capacity, dtype,
shape), ``seen`` (global stream counter), ``x`` (slot -> raw sample bytes), ``lab`` (slot ->
``"level:y"``), ``counts`` (``"level:y"`` -> stored samples). Random numbers come in ARGV from the
client's seeded generator: the scripts are deterministic and need no server-side RNG.
"""

from __future__ import annotations

KEYS = ("meta", "seen", "x", "lab", "counts")

INSERT = """
-- ARGV: capacity, dtype, shape, n, item bytes, the n samples' bytes back to back, n uniforms in [0, 1),
-- n labels. Exact Algorithm R over the global counter: sample t goes to slot t-1 while t <= M, else
-- to slot floor(u*t) when that is < M. Returns {slots, seen, size, counts as "label count ..."}.
local cap, n, size = tonumber(ARGV[1]), tonumber(ARGV[4]), tonumber(ARGV[5])
local meta = redis.call('HMGET', KEYS[1], 'capacity', 'dtype', 'shape')
if meta[1] then
  if tonumber(meta[1]) ~= cap or meta[2] ~= ARGV[2] or meta[3] ~= ARGV[3] then
    return redis.error_reply('SHAPE buffer holds capacity ' .. meta[1] .. ' of ' .. meta[2] .. '[' .. meta[3] .. ']')
  end
else
  redis.call('HSET', KEYS[1], 'capacity', cap, 'dtype', ARGV[2], 'shape', ARGV[3])
end
local seen = tonumber(redis.call('GET', KEYS[2]) or '0')
local slots = {}
for k = 1, n do
  seen = seen + 1
  local slot = seen - 1
  if seen > cap then
    slot = math.floor(tonumber(ARGV[6 + k]) * seen)
    if slot >= cap then slot = -1 end
  end
  if slot >= 0 then
    local label = ARGV[6 + n + k]
    local old = redis.call('HGET', KEYS[4], slot)
    if old and redis.call('HINCRBY', KEYS[5], old, -1) <= 0 then redis.call('HDEL', KEYS[5], old) end
    redis.call('HSET', KEYS[4], slot, label)
    redis.call('HINCRBY', KEYS[5], label, 1)
    redis.call('HSET', KEYS[3], slot, string.sub(ARGV[6], (k - 1) * size + 1, k * size))
  end
  slots[k] = slot
end
redis.call('SET', KEYS[2], seen)
return {slots, seen, redis.call('HLEN', KEYS[4]), table.concat(redis.call('HGETALL', KEYS[5]), ' ')}
"""

SAMPLE = """
-- ARGV: n, then n uniforms in [0, 1). Floyd's algorithm: n distinct slots of 0..size-1, uniformly.
-- Returns {slots, labels, blobs, dtype, shape}.
local size = redis.call('HLEN', KEYS[4])
local n = math.min(tonumber(ARGV[1]), size)
local meta = redis.call('HMGET', KEYS[1], 'dtype', 'shape')
if n == 0 then return {{}, {}, {}, meta[1], meta[2]} end
local chosen, order = {}, {}
for k = 1, n do
  local j = size - n + k - 1
  local t = math.min(math.floor(tonumber(ARGV[k + 1]) * (j + 1)), j)
  if chosen[t] then t = j end
  chosen[t] = true
  order[k] = t
end
local labels = redis.call('HMGET', KEYS[4], unpack(order))
return {order, labels, redis.call('HMGET', KEYS[3], unpack(order)), meta[1], meta[2]}
"""

STATS = """
-- Returns {seen, size, counts as "label count ..."} without changing anything.
local seen = tonumber(redis.call('GET', KEYS[2]) or '0')
return {seen, redis.call('HLEN', KEYS[4]), table.concat(redis.call('HGETALL', KEYS[5]), ' ')}
"""
