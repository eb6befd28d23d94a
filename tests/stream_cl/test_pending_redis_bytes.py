"""The Redis pending store's byte bound against a real redis-server: the oldest entries leave past it as in the
memory store, and its running totals stay equal to what the entries hold through a rollback, a retried call, an
upgrade from a store that kept no totals, and entries deleted behind the scripts' back."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from consumers.label_wire import LabelRecord
from consumers.record import Message, Position, Record
from stream_cl.pending import EVICTED, MemoryPending, PendingStore, Settled
from stream_cl.pending_redis import RedisPending
from tests.fixtures.redis import RedisServer
from tests.stream_cl.test_delayed import classes, feature
from tests.stream_cl.test_pending_redis import contents, label

MIB = 1024 * 1024
_groups = itertools.count()


def bounded(server: RedisServer, group: str, max_bytes: int | None, *, journal: bool = True) -> RedisPending:
    """A store bounded by bytes only: room for 100 entries, and a TTL no test reaches."""
    return RedisPending(
        server.client(),
        group=group,
        label_topic="labels",
        ttl_s=1e9,
        max_pending=100,
        journal=journal,
        max_bytes=max_bytes,
    )


def totals(server: RedisServer, pending: RedisPending) -> tuple[int, int]:
    """The running totals the store keeps: the bytes its samples and its labels hold (none kept: 0)."""
    samples, labels = server.client().hmget(pending.prefix + "meta", ["sbytes", "lbytes"])
    return int(samples or 0), int(labels or 0)


def counted(server: RedisServer, pending: RedisPending) -> tuple[int, int]:
    """What the entries hold, counted from the data themselves."""
    client = server.client()
    return tuple(  # type: ignore[return-value]
        sum(client.hstrlen(pending.prefix + kind + "data", i) for i in client.hkeys(pending.prefix + kind + "data"))
        for kind in ("s:", "l:")
    )


def entry_length(server: RedisServer) -> int:
    """The length in Redis of the entry of each sample ``feature(i, t)`` below (one-letter ids, t in 0-9)."""
    probe = bounded(server, f"probe-{next(_groups)}", None)
    probe.restore(None)
    probe.arrive([feature(i, t) for t, i in enumerate("abcde")], classes(5))
    (length,) = {server.client().hstrlen(probe.prefix + "s:data", i) for i in "abcde"}
    return length


def large(sample_id: str, at_s: float, mib: int = 1) -> Record:
    record = feature(sample_id, at_s)
    return Record(sample_id, np.zeros(mib * MIB // 4, np.float32), None, record.position, at_s, record.message)


def large_label(label_id: str, n: int) -> LabelRecord:
    message = Message(Position("labels", 0, n), 1.0, None, b"x" * 2 * MIB)
    return LabelRecord(label_id, ("x",), message.position, 1.0, message)


def outcome(settled: Settled) -> tuple[list[str], list[tuple[bytes, str]]]:
    return [r.id for r in settled.expired], [(d.message.value, d.detail) for d in settled.unmatched]


def test_past_the_byte_bound_the_oldest_entries_leave_as_in_the_memory_store(redis_server: RedisServer) -> None:
    """1 MiB samples and 2 MiB labels against a 3 MiB bound (as the memory store's own test), then a sample larger
    than the bound alone: both stores give up the same entries, in the same order, with the same outcomes."""
    memory = MemoryPending(ttl_s=1e9, max_pending=100, max_bytes=3 * MIB)
    redis_store = bounded(redis_server, f"bytes-{next(_groups)}", 3 * MIB)
    redis_store.restore(None)
    steps = [
        (lambda s: s.arrive([large(i, t) for t, i in enumerate("abcde")], classes(5)), (["a", "b", "c"], [])),
        (lambda s: s.label([large_label("p", 0), large_label("q", 1)]), ([], [(b"x" * 2 * MIB, EVICTED)])),
        # larger than the bound alone: it leaves too, after every older sample (as the memory store's does)
        (lambda s: s.arrive([large("f", 5, mib=4)], classes(1)), (["d", "e", "f"], [])),
    ]
    stores: list[PendingStore] = [memory, redis_store]
    for step, expected in steps:
        assert [outcome(step(s)) for s in stores] == [expected, expected]
        assert contents(redis_store) == (memory.pending_ids(), memory.waiting_ids())
        assert totals(redis_server, redis_store) == counted(redis_server, redis_store)
    assert contents(redis_store) == ([], ["q"]) and totals(redis_server, redis_store)[1] <= 3 * MIB


def test_the_byte_bound_holds_the_entries_whose_lengths_add_up_to_it(redis_server: RedisServer) -> None:
    length = entry_length(redis_server)
    for max_bytes, kept in [(3 * length, ["c", "d", "e"]), (3 * length - 1, ["d", "e"])]:
        pending = bounded(redis_server, f"exact-{next(_groups)}", max_bytes)
        pending.restore(None)
        settled = pending.arrive([feature(i, t) for t, i in enumerate("abcde")], classes(5))
        assert [r.id for r in settled.expired] == [i for i in "abcde" if i not in kept]
        assert pending.pending_ids() == kept
        assert totals(redis_server, pending) == (len(kept) * length, 0)


def test_a_rollback_to_a_checkpoint_restores_the_byte_totals(redis_server: RedisServer) -> None:
    group, length = f"bytes-rollback-{next(_groups)}", entry_length(redis_server)
    first = bounded(redis_server, group, 3 * length)
    first.restore(None)
    first.arrive([feature("a", 0), feature("b", 1)], classes(2))
    first.label([label("x", "cat", 2)])
    checkpoint = first.state_dict()
    first.saved(checkpoint)
    at_checkpoint = totals(redis_server, first)
    assert at_checkpoint == counted(redis_server, first) and at_checkpoint[0] == 2 * length
    # every kind of change: a join (a), a replacement (b), an eviction past the bound (the new b), labels added and
    # replaced
    first.label([label("a", "dog", 3)])
    settled = first.arrive([feature(i, t) for t, i in enumerate("bcde", start=4)], classes(4))
    assert [r.id for r in settled.expired] == ["b", "b"] and first.pending_ids() == ["c", "d", "e"]
    first.label([label("y", "cat", 8), label("x", "dog", 8)])
    assert totals(redis_server, first) != at_checkpoint

    restarted = bounded(redis_server, group, 3 * length)
    restarted.restore(checkpoint)
    assert contents(restarted) == (["a", "b"], ["x"])
    assert totals(redis_server, restarted) == at_checkpoint == counted(redis_server, restarted)
    restarted.arrive([feature("c", 4), feature("d", 5)], classes(2))  # the bound counts from the restored totals
    assert restarted.pending_ids() == ["b", "c", "d"]


def test_a_retried_call_that_already_ran_does_not_count_its_bytes_twice(redis_server: RedisServer) -> None:
    length = entry_length(redis_server)
    pending = bounded(redis_server, f"bytes-retry-{next(_groups)}", 3 * length)
    pending.restore(None)
    pending.arrive([feature("a", 0), feature("b", 1)], classes(2))
    first = pending.arrive([feature("c", 2), feature("d", 3)], classes(2))
    after = totals(redis_server, pending)
    pending.op -= 1  # as if the reply had been lost: the same call again
    again = pending.arrive([feature("c", 2), feature("d", 3)], classes(2))
    assert outcome(again) == outcome(first) == (["a"], [])
    assert totals(redis_server, pending) == after == counted(redis_server, pending) == (3 * length, 0)


@pytest.mark.parametrize("journal", [True, False])
def test_a_store_written_without_byte_totals_gets_them_counted_when_opened(
    redis_server: RedisServer, journal: bool
) -> None:
    """An earlier version kept no totals: opened (rolled back to its checkpoint, or taken as it is), the store counts
    them once from its entries, and the bound then holds what was already there."""
    group, length = f"bytes-upgrade-{next(_groups)}", entry_length(redis_server)
    earlier = bounded(redis_server, group, None, journal=journal)
    earlier.restore(None)
    earlier.arrive([feature("a", 0), feature("b", 1)], classes(2))
    earlier.label([label("x", "cat", 2)])
    checkpoint = earlier.state_dict() if journal else None
    if journal:
        earlier.saved(checkpoint)
        earlier.arrive([feature("c", 3)], classes(1))  # after the checkpoint: its undo must take c's bytes off
    redis_server.client().hdel(earlier.prefix + "meta", "sbytes", "lbytes")  # as the earlier version left it

    opened = bounded(redis_server, group, 3 * length, journal=journal)
    opened.restore(checkpoint)
    assert totals(redis_server, opened) == counted(redis_server, opened)
    assert totals(redis_server, opened)[0] == 2 * length
    settled = opened.arrive([feature("d", 4), feature("e", 5)], classes(2))
    assert [r.id for r in settled.expired] == ["a"] and opened.pending_ids() == ["b", "d", "e"]


def test_a_total_counting_entries_deleted_behind_the_scripts_back_starts_afresh_once_the_store_empties(
    redis_server: RedisServer,
) -> None:
    """Redis evicted the samples' data (``allkeys-*``): the total still counts those bytes, and the entries give up
    nothing when they leave. Once the store has emptied, later arrivals wait again instead of being evicted on
    arrival for good."""
    length = entry_length(redis_server)
    pending = bounded(redis_server, f"bytes-damaged-{next(_groups)}", 3 * length)
    pending.restore(None)
    pending.arrive([feature(i, t) for t, i in enumerate("abc")], classes(3))
    redis_server.client().delete(pending.prefix + "s:data")
    settled = pending.arrive([feature("d", 3)], classes(1))
    assert [r.id for r in settled.expired] == ["", "", "", "d"] and pending.pending_ids() == []
    assert not pending.arrive([feature(i, t) for t, i in enumerate("efg", start=4)], classes(3)).expired
    assert pending.pending_ids() == ["e", "f", "g"]
    assert totals(redis_server, pending) == counted(redis_server, pending) == (3 * length, 0)
