"""The delayed-label pending store in Redis: it survives restarts of the service, and stays consistent
with the checkpoints.

Keys live under ``streamcl:pending:{GROUP}:`` (one prefix per consumer group, so two services never
share entries): for samples (``s:``) and labels (``l:``) each, ``order`` (a sorted set, id -> insertion
number: oldest first), ``data`` (id -> entry) and ``ts`` (id -> the event time its TTL counts from);
``meta`` (counters, the bytes each store holds, the journal's generations, the event-time clocks);
``undo:G`` (the journal of generation G); ``reply`` (the last call's answer). An entry is raw bytes
behind a JSON header (never pickle): a sample's tensor bytes with dtype and shape (a binary sample's, which are
its message's value, only as dtype and shape: those bytes once), its predicted classes, and the message it came
in (value, key, headers, position, timestamp) so a dead letter still carries it byte for byte; a label's path
and message.
Every batch of feature records or label messages is one Lua script call: joins, replacements,
evictions and expiries of the batch change together or not at all. The scripts name keys they
compute from the prefix, so they need a single Redis server (or primary), not Redis Cluster.

**Consistency with checkpoints.** A restart resumes both topics from the checkpoint's offsets, so
Redis must hold exactly what it held when that checkpoint was taken; it must neither keep a join
made after it (the re-read label would be unmatched, its sample never learned) nor miss an entry
added after it (the re-read record would replace it and count an expiry). So every change is
journaled under a *generation*: each checkpoint seals the current generation G (the checkpoint
records G and both stores' sizes) and later changes go to G + 1. A change's undo record (for an
added entry: its id; for a removed one: the whole entry) goes to ``undo:G`` in the same script call
as the change. A restart from the checkpoint of generation G replays ``undo:`` of every newer
generation backwards, newest first, in one script call, then checks both stores' sizes against the
checkpoint's. Once a checkpoint of G is written, the journals up to the generation of the previous
checkpoint written are dropped (newer ones stay, so that checkpoint can still be restored if the newest
one turns out unreadable; a checkpoint whose write failed does not count).
A restart with a checkpoint directory but no checkpoint rolls back to generation 0 (empty). A store
that cannot be brought back to a checkpoint (its journal already dropped, or Redis lost its data:
run Redis with ``appendonly yes`` and ``appendfsync always``) is an error at start, never a silent
loss.

**Without checkpoints** nothing is journaled: Redis holds the live state, and a restart resumes with
what was waiting when the service stopped (the source resumes from its group's committed offsets;
after a kill -9 the last batch may be read again, and a re-read feature record replaces its copy).

**Outages.** A call that fails because Redis cannot be reached is retried with back-off (0.1 s
doubling to 5 s) until it succeeds; meanwhile the loop consumes nothing and ``healthy`` is False
(``/readyz`` answers 503), and ``waiting`` is called every second (the service beats its heartbeat
and publishes its gauges: ``/healthz`` sees a paused loop, not a stuck one). Each call carries an
operation number, and the script stores its reply, so a retry of a call that did run (its reply was
lost) returns that reply instead of running twice.
A Redis that comes back without the state it had (restarted without persistence) is an error, not
an empty store.

**Memory.** ``max_pending`` bounds the entries of each kind by count and ``max_bytes`` by the bytes they hold
(the lengths of their entries, kept as running totals in ``meta`` by the script calls that change the
entries, a rollback's included, and counted once from the entries when a store written without them is
opened): past either, the oldest entries leave first, as in the memory store. A sample entry holds its
array (unless binary: see above) and its message, whose value the source bounds (8 MiB by default) and whose
key and headers only the broker does. Redis needs more than the entries: their ids, times and per-key
overhead, and the journal, which holds what changed since the previous checkpoint written (the entries removed
since then, whole).
Give ``maxmemory`` room for both stores' bound and that; once reached (``noeviction``) writes are refused
and consuming waits, as in an outage, until memory is freed (nothing leaves the store meanwhile).
"""

from __future__ import annotations

import json
import logging
import struct
import time
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import redis

from buffers.open import redis_client
from buffers.redis import UNAVAILABLE
from consumers.label_wire import MAX_LABEL_MESSAGE_BYTES, LabelRecord
from consumers.record import DeadLetter, Message, Position, Record
from consumers.urls import mask_url
from consumers.wire import sample_message
from stream_cl.pending import (
    EVICTED,
    REPLACED,
    UNMATCHED,
    PendingStateError,
    Settled,
    advanced,
    array_on_value,
    check_clock_skew,
    default_clock_skew,
    is_value_bytes,
    no_features,
    restored_clock,
    wall_clock,
)

log = logging.getLogger("stream_cl.pending")

REFUSING_WRITES = (
    redis.exceptions.ReadOnlyError,
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.MasterDownError,
    redis.exceptions.TryAgainError,
)
"""Errors of a Redis that is there but cannot take writes now (a replica after a failover, ``maxmemory`` reached
with ``noeviction``): a script fails on its first write, before changing anything, so the call waits as in an
outage."""

DAMAGED_SAMPLE = "its sample's entry in the Redis pending store is damaged"
DAMAGED_LABEL = "its entry in the Redis pending store is damaged"

T = TypeVar("T")

WAITING_EVERY_S = 1.0
"""How often a call waiting for Redis calls back (``waiting``), as often as the run publishes its gauges."""

NO_TIME = "-1e308"
"""A clock that has seen nothing yet, for Lua (which has no infinities in ``tonumber``)."""

_COMMON = """
local p, op, prev, gen = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local ttl, max = tonumber(ARGV[5]), tonumber(ARGV[6])
local max_bytes = tonumber(ARGV[13])  -- nil: no byte bound
local ftime, ltime = tonumber(ARGV[7]), tonumber(ARGV[8])
local ftext, ltext = ARGV[7], ARGV[8]  -- the clocks as sent: a Lua number turned into text loses digits
local limit = tonumber(ARGV[11])  -- the latest event time a clock may take (ARGV[12]: the wall clock)
local meta = p .. 'meta'
local last = redis.call('HGET', meta, 'op') or '0'
if last == op then  -- a retry of a call that ran: its reply, not a second run
  return redis.call('LRANGE', p .. 'reply', 0, -1)
end
if last ~= prev then
  return redis.error_reply('STATELOST pending store at operation ' .. last .. ', expected ' .. prev)
end
local S, L = p .. 's:', p .. 'l:'
local BYTES = {[S] = 'sbytes', [L] = 'lbytes'}  -- meta fields: the bytes each store's entries hold
local undo = p .. 'undo:' .. gen
local out = {}
local function emit(kind, a, b) out[#out + 1] = kind; out[#out + 1] = a; out[#out + 1] = b end
local function add(k, id, ts, blob)
  local seq = redis.call('HINCRBY', meta, 'seq', 1)
  redis.call('ZADD', k .. 'order', seq, id)
  redis.call('HSET', k .. 'data', id, blob)
  redis.call('HINCRBY', meta, BYTES[k], string.len(blob))
  redis.call('HSET', k .. 'ts', id, ts)
  if gen > 0 then redis.call('RPUSH', undo, 'a', k, id, '', '', '') end
end
-- takes entry id out of store k: its blob, '' if the entry is damaged (no blob: a field or key deleted or evicted),
-- false if there is none; whatever part of it exists goes, or expiry would find the same entry again forever
local function remove(k, id)
  local blob, seq = redis.call('HGET', k .. 'data', id), redis.call('ZSCORE', k .. 'order', id)
  if not blob and not seq then return false end
  local ts = redis.call('HGET', k .. 'ts', id)
  redis.call('ZREM', k .. 'order', id)
  redis.call('HDEL', k .. 'data', id)
  redis.call('HDEL', k .. 'ts', id)
  if redis.call('ZCARD', k .. 'order') == 0 then
    -- the last entry: the store holds nothing, even if entries were deleted or evicted behind the scripts' back,
    -- whose bytes the total could not take off (a total that stayed high would evict every later arrival)
    redis.call('HSET', meta, BYTES[k], 0)
  elseif blob then
    redis.call('HINCRBY', meta, BYTES[k], -string.len(blob))
  end
  if gen > 0 then redis.call('RPUSH', undo, 'r', k, id, seq or '', ts or '', blob or '') end
  return blob or ''
end
-- the event time the TTL of the entry stamped ARGV[i] counts from, as text: its timestamp or, if that is not
-- believable (before the epoch: Kafka's "none"; past the limit; NaN), its topic's clock, else the other topic's,
-- else the wall clock (ARGV[12]), as in the memory store
local function expires_from(i, clock, text, other, otext)
  local t = tonumber(ARGV[i])
  if t >= 0 and t <= limit then return ARGV[i] end
  if clock > -1e308 then return text end
  return other > -1e308 and otext or ARGV[12]
end
local function oldest(k)
  local first = redis.call('ZRANGE', k .. 'order', 0, 0)
  if #first == 0 then return nil, nil end
  -- an entry without a readable time (damaged) is as old as can be: it expires on the other topic's first time
  return first[1], tonumber(redis.call('HGET', k .. 'ts', first[1])) or -1e308
end
-- gives up the oldest entries of store k while it holds more than max entries or max_bytes bytes, as the memory
-- store does (an entry larger than max_bytes alone goes too, after all the older ones)
local function evict(k, kind, reason)
  while true do
    local over = max_bytes and tonumber(redis.call('HGET', meta, BYTES[k])) > max_bytes
    if redis.call('ZCARD', k .. 'order') <= max and not over then return end
    emit(kind, remove(k, (oldest(k))), reason)
  end
end
-- gives up the entries of store k older than the other topic's clock by more than the TTL
local function expire(k, clock, kind, reason)
  while true do
    local id, ts = oldest(k)
    if id == nil or ts + ttl >= clock then return end
    emit(kind, remove(k, id), reason)
  end
end
local function finish()
  table.insert(out, 1, redis.call('ZCARD', L .. 'order'))
  table.insert(out, 1, redis.call('ZCARD', S .. 'order'))
  redis.call('HSET', meta, 'op', op, 'ft', ARGV[9], 'lt', ARGV[10])
  if gen > 0 then redis.call('HSET', meta, 'top', gen) end
  redis.call('DEL', p .. 'reply')
  for i = 1, #out, 3000 do  -- in slices: Lua's unpack takes a bounded number of values
    redis.call('RPUSH', p .. 'reply', unpack(out, i, math.min(i + 2999, #out)))
  end
  return out
end
"""

ARRIVE = (
    _COMMON
    + """
-- ARGV[14..]: id, event time, entry of each predicted sample, in arrival order
for i = 14, #ARGV, 3 do
  local id, ts = ARGV[i], tonumber(ARGV[i + 1])
  local label = remove(L, id)
  if label then
    emit('j', (i - 14) / 3, label)
  else
    local older = remove(S, id)
    if older then emit('e', older, '') end
    add(S, id, expires_from(i + 1, ftime, ftext, ltime, ltext), ARGV[i + 2])
    evict(S, 'e', '')
  end
  if ts >= 0 and ts <= limit and ts > ftime then ftime, ftext = ts, ARGV[i + 1] end
  expire(L, ftime, 'u', 'ttl')
  expire(S, ltime, 'e', '')
end
return finish()
"""
)
"""Samples just predicted: each joins its waiting label or waits (replacing an older entry, evicting the
oldest of a full store); then waiting labels and pending samples the clocks have passed expire.
Returns {samples, labels, then per event: kind, a, b}: ``j`` (a: the sample's index, b: the label's
entry), ``e`` (a: an expired sample's entry), ``u`` (a: an unmatched label's entry, b: why)."""

LABEL = (
    _COMMON
    + """
-- ARGV[14..]: id, event time, entry of each label, in arrival order
for i = 14, #ARGV, 3 do
  local id, ts = ARGV[i], tonumber(ARGV[i + 1])
  local sample = remove(S, id)
  if sample then
    emit('j', sample, (i - 14) / 3)
  else
    local older = remove(L, id)
    if older then emit('u', older, 'replaced') end
    add(L, id, expires_from(i + 1, ltime, ltext, ftime, ftext), ARGV[i + 2])
    evict(L, 'u', 'evicted')
  end
  if ts >= 0 and ts <= limit and ts > ltime then ltime, ltext = ts, ARGV[i + 1] end
  expire(S, ltime, 'e', '')
end
return finish()
"""
)
"""Labels just read: each joins its pending sample or waits (as :data:`ARRIVE`). Events as there, with
``j``'s a: the sample's entry, b: the label's index."""

ROLLBACK = """
-- ARGV: prefix, generation G to go back to, changes read per LRANGE. Undoes every newer generation,
-- newest change first, reading each journal from its end in chunks (a long journal is not copied at once).
local p, g, chunk = ARGV[1], tonumber(ARGV[2]), 6 * tonumber(ARGV[3])
local meta = p .. 'meta'
local BYTES = {[p .. 's:'] = 'sbytes', [p .. 'l:'] = 'lbytes'}
local floor = tonumber(redis.call('HGET', meta, 'floor') or '0')
local top = tonumber(redis.call('HGET', meta, 'top') or '0')
if g < floor then
  return redis.error_reply('JOURNALGONE generation ' .. g .. ' is older than the journal kept (' .. floor .. ')')
end
for gen = top, g + 1, -1 do
  local undo = p .. 'undo:' .. gen
  local stop = redis.call('LLEN', undo) - 1
  while stop >= 0 do
    local start = math.max(0, stop - chunk + 1)
    local log = redis.call('LRANGE', undo, start, stop)
    for i = #log - 5, 1, -6 do
      local what, k, id = log[i], log[i + 1], log[i + 2]
      if what == 'a' then
        redis.call('ZREM', k .. 'order', id)
        redis.call('HINCRBY', meta, BYTES[k], -redis.call('HSTRLEN', k .. 'data', id))
        redis.call('HDEL', k .. 'data', id)
        redis.call('HDEL', k .. 'ts', id)
      else  -- a damaged entry comes back as damaged as it was ('': the part it lacked)
        if log[i + 3] ~= '' then redis.call('ZADD', k .. 'order', log[i + 3], id) end
        if log[i + 5] ~= '' then
          redis.call('HSET', k .. 'data', id, log[i + 5])
          redis.call('HINCRBY', meta, BYTES[k], string.len(log[i + 5]))
        end
        if log[i + 4] ~= '' then redis.call('HSET', k .. 'ts', id, log[i + 4]) end
      end
    end
    stop = start - 1
  end
  redis.call('DEL', undo)
end
redis.call('HSET', meta, 'top', g)
return {redis.call('ZCARD', p .. 's:order'), redis.call('ZCARD', p .. 'l:order')}
"""

TOTALS = """
-- ARGV: prefix. Counts the bytes each store's entries hold where meta has no total (a store an earlier version
-- wrote, which kept none), before anything changes the store or a rollback adjusts the totals.
local p = ARGV[1]
for k, field in pairs({[p .. 's:'] = 'sbytes', [p .. 'l:'] = 'lbytes'}) do
  if redis.call('HEXISTS', p .. 'meta', field) == 0 then
    local total = 0
    for _, id in ipairs(redis.call('HKEYS', k .. 'data')) do total = total + redis.call('HSTRLEN', k .. 'data', id) end
    redis.call('HSET', p .. 'meta', field, total)
  end
end
return 0
"""

FORGET = """
-- ARGV: prefix, generation G. Drops the journals of generations up to G (no restore can need them).
local p, g = ARGV[1], tonumber(ARGV[2])
local meta = p .. 'meta'
local floor = tonumber(redis.call('HGET', meta, 'floor') or '0')
for gen = floor + 1, g do redis.call('DEL', p .. 'undo:' .. gen) end
if g > floor then redis.call('HSET', meta, 'floor', g) end
return g
"""


class RedisPending:
    """Samples and labels waiting for each other in Redis (see the module docstring).

    Parameters
    ----------
    client
        A ``redis.Redis`` with ``decode_responses=False``.
    group
        The consumer group: the keys live under ``streamcl:pending:{GROUP}:``.
    label_topic
        The label topic: the dead letter of a label whose entry is damaged names it (the entry cannot say), even
        when that label was stored by an earlier run.
    ttl_s, max_pending, max_clock_skew_s
        As for :class:`stream_cl.pending.MemoryPending`.
    max_bytes
        The most bytes the entries of each kind hold (their lengths in Redis); None: only ``max_pending`` bounds them.
    journal
        Keep the journal a restore from a checkpoint needs (the run checkpoints).
    waiting
        Called about every second while a call waits for Redis (the service keeps its heartbeat and gauges going).
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        group: str,
        label_topic: str,
        ttl_s: float,
        max_pending: int,
        journal: bool,
        max_bytes: int | None = None,
        max_clock_skew_s: float | None = None,
        retry_min_s: float = 0.1,
        retry_max_s: float = 5.0,
        report_every_s: float = 60.0,
        rollback_chunk: int = 1000,
        waiting: Callable[[], None] = lambda: None,
    ) -> None:
        if ttl_s <= 0 or max_pending <= 0 or (max_bytes is not None and max_bytes <= 0):
            raise ValueError(f"ttl_s, max_pending and max_bytes must be > 0, got {ttl_s}, {max_pending}, {max_bytes}")
        max_clock_skew_s = default_clock_skew(ttl_s) if max_clock_skew_s is None else max_clock_skew_s
        check_clock_skew(max_clock_skew_s)
        self.client, self.ttl_s, self.max_pending, self.journal = client, ttl_s, max_pending, journal
        self.max_bytes = max_bytes
        self.max_clock_skew_s = max_clock_skew_s
        self.prefix = f"streamcl:pending:{{{group}}}:"
        self.label_topic = label_topic
        self.retry_min_s, self.retry_max_s = retry_min_s, retry_max_s
        self.report_every_s = report_every_s  # how often a long wait for Redis is logged again
        self.rollback_chunk = rollback_chunk  # journal changes read per LRANGE during a restore
        self.waiting = waiting
        self.healthy = True
        self.gen = 1 if journal else 0
        self.saved_gen = 0  # of the newest checkpoint written (or restored): the one a restore falls back to
        self.feature_time = self.label_time = float("-inf")
        self._arrive, self._label = client.register_script(ARRIVE), client.register_script(LABEL)
        self._rollback, self._forget = client.register_script(ROLLBACK), client.register_script(FORGET)
        self._totals = client.register_script(TOTALS)
        self.op = 0
        self._sizes = (0, 0)

    def arrive(self, records: list[Record], predicted: np.ndarray) -> Settled:
        if not records:
            return Settled()
        args = []
        for record, classes in zip(records, predicted, strict=True):
            args += [record.id, repr(float(record.timestamp)), _sample_entry(record, classes)]
        now, limit = wall_clock(self.max_clock_skew_s)
        clock = advanced(self.feature_time, (r.timestamp for r in records), limit)
        reply = self._call(self._arrive, args, feature_time=clock, label_time=self.label_time, now=now, limit=limit)
        self.feature_time = clock
        settled = Settled()
        for kind, a, b in _events(reply):
            if kind != b"j":
                self._settle_other(kind, a, b, settled)
                continue
            record, label = records[int(a)], _read(_label, b)
            if label is None:  # the label it joins is damaged: the sample cannot learn it, it ends predicted
                settled.expired.append(record)
                settled.unmatched.append(self._damaged_label(b))
            else:
                settled.joined.append((record, predicted[int(a)], label))
        self._warn_damaged(settled)
        return settled

    def label(self, labels: list[LabelRecord]) -> Settled:
        if not labels:
            return Settled()
        args = []
        for label in labels:
            args += [label.id, repr(float(label.timestamp)), _label_entry(label)]
        now, limit = wall_clock(self.max_clock_skew_s)
        clock = advanced(self.label_time, (label.timestamp for label in labels), limit)
        reply = self._call(self._label, args, feature_time=self.feature_time, label_time=clock, now=now, limit=limit)
        self.label_time = clock
        settled = Settled()
        for kind, a, b in _events(reply):
            if kind != b"j":
                self._settle_other(kind, a, b, settled)
                continue
            label, sample = labels[int(b)], _read(_sample, a)
            if sample is None:  # the sample it joins is damaged: it cannot be learned, and the label joins nothing
                settled.expired.append(_damaged_sample(label.id))
                settled.unmatched.append(DeadLetter(label.message, UNMATCHED, DAMAGED_SAMPLE))
            else:
                settled.joined.append((*sample, label))
        self._warn_damaged(settled)
        return settled

    def sizes(self) -> tuple[int, int]:
        return self._sizes

    def pending_ids(self) -> list[str]:
        return [i.decode() for i in self.client.zrange(self.prefix + "s:order", 0, -1)]

    def waiting_ids(self) -> list[str]:
        return [i.decode() for i in self.client.zrange(self.prefix + "l:order", 0, -1)]

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: the generation it seals (later changes go to the next) and the sizes."""
        samples, labels = self._sizes
        state = {
            "store": "redis",
            "prefix": self.prefix,
            "generation": self.gen,
            "samples": samples,
            "labels": labels,
            "feature_time": self.feature_time,
            "label_time": self.label_time,
        }
        if self.journal:
            self.gen += 1
        return state

    def restore(self, state: dict[str, Any] | None) -> None:
        """Bring Redis back to the checkpoint's ``state`` (None: no checkpoint, so nothing waits) or, without
        a journal, take it as it is (the last run's live state). A Redis that cannot be reached or cannot take
        writes now (a failover under way) is waited for, as in :meth:`_call`."""
        self.op = int(self._waiting(lambda: self.client.hget(self.prefix + "meta", "op")) or 0)
        self._waiting(lambda: self._totals(args=[self.prefix]))
        if not self.journal:
            self._waiting(self._take_live_state)
            return
        if state is not None and state.get("store") != "redis":
            raise PendingStateError(
                "the checkpoint holds its pending samples in memory; resume it with --pending memory"
            )
        if state is not None and state["prefix"] != self.prefix:
            raise PendingStateError(
                f"the checkpoint's pending samples are under {state['prefix']}*, not {self.prefix}*: "
                "resume with the consumer group it was written with"
            )
        gen = 0 if state is None else int(state["generation"])
        expected = (0, 0) if state is None else (int(state["samples"]), int(state["labels"]))
        try:
            found = tuple(
                int(n) for n in self._waiting(lambda: self._rollback(args=[self.prefix, gen, self.rollback_chunk]))
            )
        except redis.ResponseError as error:  # a refusal to write now is waited for; this is the journal or a bug
            raise PendingStateError(
                f"the Redis pending store {self.prefix}* cannot go back to the checkpoint: {error}"
            ) from None
        if found != expected:
            what = "no checkpoint" if state is None else f"the checkpoint (generation {gen})"
            raise PendingStateError(
                f"the Redis pending store {self.prefix}* holds {found[0]} samples and {found[1]} labels, but "
                f"{what} expects {expected[0]} and {expected[1]}: Redis lost writes (run it with appendonly yes, "
                f"appendfsync always) or the keys belong to another run (delete {self.prefix}* or use another --group)"
            )
        self._sizes = expected
        self.gen, self.saved_gen = gen + 1, gen
        if state is not None:
            _, limit = wall_clock(self.max_clock_skew_s)
            self.feature_time = restored_clock(float(state["feature_time"]), limit)
            self.label_time = restored_clock(float(state["label_time"]), limit)

    def _take_live_state(self) -> None:
        """Resume with what Redis holds (no journal): every step is idempotent, so an interrupted one is redone."""
        meta = self.prefix + "meta"
        top = int(self.client.hget(meta, "top") or 0)
        self._forget(args=[self.prefix, top])  # journals of an earlier checkpointed run are of no use now
        ft, lt = self.client.hmget(meta, ["ft", "lt"])
        _, limit = wall_clock(self.max_clock_skew_s)
        self.feature_time = restored_clock(float(ft), limit) if ft else float("-inf")
        self.label_time = restored_clock(float(lt), limit) if lt else float("-inf")
        self._sizes = (self.client.zcard(self.prefix + "s:order"), self.client.zcard(self.prefix + "l:order"))

    def saved(self, state: dict[str, Any]) -> None:
        """The checkpoint of ``state``'s generation is written: drop the journals that neither it nor the previous
        checkpoint written needs (generations in between belong to writes that failed)."""
        if not self.journal:
            return
        previous, self.saved_gen = self.saved_gen, int(state["generation"])
        try:
            self._forget(args=[self.prefix, previous])
        except redis.RedisError as error:  # the next checkpoint drops them instead
            log.warning("could not drop the pending store's old journal: %s", error)

    def close(self) -> None:
        self.client.close()

    def _call(
        self,
        script: Any,
        args: list,
        *,
        feature_time: float,
        label_time: float,
        now: float,
        limit: float,
    ) -> list:
        """One script call, waited for while Redis cannot be used (the same operation number: a call that ran
        returns its stored reply)."""
        op = self.op + 1
        head = [self.prefix, op, self.op, self.gen, repr(self.ttl_s), self.max_pending]
        head += [_clock(self.feature_time), _clock(self.label_time), _clock(feature_time), _clock(label_time)]
        head += [repr(limit), repr(now), "" if self.max_bytes is None else self.max_bytes]
        try:
            reply = self._waiting(lambda: script(args=head + args))
        except redis.ResponseError as error:
            if "STATELOST" in str(error):
                raise PendingStateError(
                    f"the Redis pending store {self.prefix}* lost its state ({error}): Redis restarted without "
                    "persistence; restart the service to resume from its checkpoint"
                ) from None
            raise
        self.op = op
        self._sizes = (int(reply[0]), int(reply[1]))
        return reply

    def _waiting(self, call: Callable[[], T]) -> T:
        """``call()``, retried with back-off while Redis cannot be reached or cannot take writes now (``healthy`` is
        False meanwhile); any other error is raised. A long wait is logged again every ``report_every_s``, with
        the latest error, so a service that is not ready (a ``--pending`` on a read-only replica) says why."""
        wait = self.retry_min_s
        started = time.monotonic()
        report_at = started + self.report_every_s
        while True:
            try:
                result = call()
                break
            except (*UNAVAILABLE, *REFUSING_WRITES) as error:
                now, reason = time.monotonic(), f"{type(error).__name__}: {error}"
                if self.healthy:
                    log.warning("the Redis pending store cannot be used (%s); consuming waits for it", reason)
                elif now >= report_at:
                    log.warning(
                        "the Redis pending store still cannot be used after %.0f s (%s); consuming waits for it",
                        now - started,
                        reason,
                    )
                    report_at = now + self.report_every_s
                self.healthy = False
                self._pause(wait)
                wait = min(wait * 2, self.retry_max_s)
        if not self.healthy:
            log.warning("the Redis pending store is reachable again after %.0f s", time.monotonic() - started)
        self.healthy = True
        return result

    def _pause(self, seconds: float) -> None:
        """Sleep ``seconds``, calling :attr:`waiting` at least once a second: the back-off grows to 5 s, longer than
        the gauges' interval."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            time.sleep(min(left, WAITING_EVERY_S))
            self.waiting()

    def _settle_other(self, kind: bytes, a: bytes, b: bytes, settled: Settled) -> None:
        if kind == b"e":
            sample = _read(_sample, a)
            settled.expired.append(_damaged_sample("") if sample is None else sample[0])
            return
        label = _read(_label, a)
        if label is None:
            settled.unmatched.append(self._damaged_label(a))
            return
        detail = {b"ttl": no_features(label.id), b"replaced": REPLACED, b"evicted": EVICTED}[b]
        settled.unmatched.append(DeadLetter(label.message, UNMATCHED, detail))

    def _damaged_label(self, entry: bytes) -> DeadLetter:
        """The dead letter of a label whose entry cannot be read: its stored bytes, on the label topic."""
        message = Message(Position(self.label_topic, 0, -1), float("nan"), None, entry[:MAX_LABEL_MESSAGE_BYTES])
        return DeadLetter(message, UNMATCHED, DAMAGED_LABEL)

    def _warn_damaged(self, settled: Settled) -> None:
        samples = sum(r.message is _DAMAGED for r in settled.expired)
        labels = sum(d.detail == DAMAGED_LABEL for d in settled.unmatched)
        if samples or labels:
            log.warning(
                "the Redis pending store %s* held %d damaged samples and %d damaged labels (given up, not learned)",
                self.prefix,
                samples,
                labels,
            )


def open_redis_pending(
    url: str,
    *,
    group: str,
    label_topic: str,
    ttl_s: float,
    max_pending: int,
    journal: bool,
    max_bytes: int | None = None,
    max_clock_skew_s: float | None = None,
    waiting: Callable[[], None] = lambda: None,
) -> RedisPending:
    """A :class:`RedisPending` at ``url`` (``redis[s]://[user:pass@]HOST:PORT/DB``); a Redis that cannot be
    reached or refuses the credentials is a ``ConnectionError`` naming the URL with its password masked.
    ``waiting`` is called about every second while a call waits for Redis."""
    client = redis_client(url)
    try:
        client.ping()
    except redis.RedisError as error:
        client.close()
        reason = " ".join(str(error).split()) or type(error).__name__
        raise ConnectionError(f"cannot reach the Redis pending store at {mask_url(url)}: {reason}") from None
    return RedisPending(
        client,
        group=group,
        label_topic=label_topic,
        ttl_s=ttl_s,
        max_pending=max_pending,
        journal=journal,
        max_bytes=max_bytes,
        max_clock_skew_s=max_clock_skew_s,
        waiting=waiting,
    )


def _clock(t: float) -> str:
    return NO_TIME if t == float("-inf") else repr(float(t))


def _events(reply: list) -> list[tuple[bytes, bytes, bytes]]:
    flat = reply[2:]
    return [(flat[i], flat[i + 1], flat[i + 2]) for i in range(0, len(flat), 3)]


def _pack(header: dict[str, Any], chunks: list[bytes]) -> bytes:
    """An entry: a 4-byte header length, the JSON header (with each chunk's size), the chunks."""
    head = json.dumps({**header, "sizes": [len(c) for c in chunks]}).encode()
    return struct.pack(">I", len(head)) + head + b"".join(chunks)


def _unpack(entry: bytes) -> tuple[dict[str, Any], list[bytes]]:
    (n,) = struct.unpack_from(">I", entry)
    header = json.loads(entry[4 : 4 + n])
    chunks, at = [], 4 + n
    for size in header["sizes"]:
        chunks.append(entry[at : at + size])
        at += size
    return header, chunks


def _message_parts(message: Message) -> tuple[dict[str, Any], list[bytes]]:
    message = sample_message(message)  # a sample of a batched message keeps only its own part
    p = message.position
    header = {
        "position": [p.stream, p.partition, p.offset, p.index, p.count],
        "timestamp": message.timestamp,
        "has_key": message.key is not None,
        "headers": [name for name, _ in message.headers],
    }
    chunks = [message.value, *([message.key] if message.key is not None else []), *(v for _, v in message.headers)]
    return header, chunks


def _message(header: dict[str, Any], chunks: list[bytes]) -> Message:
    stream, partition, offset, index, count = header["position"]
    value, rest = chunks[0], chunks[1:]
    key = rest.pop(0) if header["has_key"] else None
    headers = tuple(zip(header["headers"], rest, strict=True))
    position = Position(stream, int(partition), int(offset), int(index), int(count))
    return Message(position, float(header["timestamp"]), key, value, headers)


def _sample_entry(record: Record, predicted: np.ndarray) -> bytes:
    """A sample's entry. An array whose bytes are its message's value (binary: the value, or the sample's part of a
    message of several, which is what the entry keeps) is stored as its layout alone: those bytes once."""
    header, chunks = _message_parts(record.message)
    x, classes = np.ascontiguousarray(record.x), np.ascontiguousarray(predicted)
    header.update(
        id=record.id,
        at=record.timestamp,
        dtype=x.dtype.str,
        shape=list(x.shape),
        predicted_dtype=classes.dtype.str,
        predicted_shape=list(classes.shape),
    )
    if is_value_bytes(x, chunks[0]):
        return _pack({**header, "on_value": True}, [classes.tobytes(), *chunks])
    return _pack(header, [x.tobytes(), classes.tobytes(), *chunks])


def _sample(entry: bytes) -> tuple[Record, np.ndarray]:
    header, chunks = _unpack(entry)
    if header.get("on_value"):  # a view on its message's value, as decoded; a layout that does not fit it: damaged
        classes, message = chunks[0], _message(header, chunks[1:])
        x = array_on_value(message.value, header["dtype"], header["shape"], header["id"])
    else:  # an array of its own: JSON, or any sample of an entry written by an earlier version
        classes, message = chunks[1], _message(header, chunks[2:])
        x = np.frombuffer(chunks[0], dtype=np.dtype(header["dtype"])).reshape(header["shape"]).copy()  # writable
    predicted = np.frombuffer(classes, dtype=np.dtype(header["predicted_dtype"])).reshape(header["predicted_shape"])
    return Record(header["id"], x, None, message.position, float(header["at"]), message), predicted


def _label_entry(label: LabelRecord) -> bytes:
    header, chunks = _message_parts(label.message)
    header.update(id=label.id, at=label.timestamp, label=list(label.label))
    return _pack(header, chunks)


def _label(entry: bytes) -> LabelRecord:
    header, chunks = _unpack(entry)
    message = _message(header, chunks)
    return LabelRecord(header["id"], tuple(header["label"]), message.position, float(header["at"]), message)


def _read(decode: Callable[[bytes], T], entry: bytes) -> T | None:
    """An entry decoded, or None if it is damaged (empty: a part of it was deleted or evicted; or not what this
    module writes): a damaged entry must cost that entry, never the service."""
    try:
        return decode(entry)
    except Exception:
        return None


_DAMAGED = Message(Position("", 0, -1), float("nan"), None, b"")


def _damaged_sample(sample_id: str) -> Record:
    """A sample whose entry cannot be read, to be counted as given up (nothing of it can be learned or sent)."""
    return Record(sample_id, np.zeros(0, np.float32), None, _DAMAGED.position, float("nan"), _DAMAGED)
