"""The Redis pending store's sample entries against a real redis-server: a binary sample's bytes stored once (its
array is its message's value), every kind of sample read back exactly, entries of the earlier form (every array
stored) still read, and an entry whose layout does not fit its value given up as damaged."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from unittest import mock

import numpy as np
import pytest

from consumers.record import Record
from consumers.wire import encode_batch_binary, encode_batch_json, encode_binary, encode_json, sample_message
from stream_cl import pending_redis
from stream_cl.pending import UNMATCHED
from stream_cl.pending_redis import DAMAGED_SAMPLE, RedisPending, _pack, _sample_entry, _unpack
from tests.fixtures.redis import RedisServer
from tests.stream_cl.test_delayed import classes, decoded_samples, on_its_message, waiting_samples
from tests.stream_cl.test_pending_redis import label
from tests.stream_cl.test_pending_redis_bytes import counted, totals

ENCODINGS = [encode_binary, encode_json, encode_batch_binary, encode_batch_json]
PREDICTED = np.array([[3], [1], [4], [1]])
_groups = itertools.count()


def fresh(server: RedisServer, *, journal: bool = True, ttl_s: float = 1e9) -> RedisPending:
    pending = RedisPending(
        server.client(),
        group=f"entries-{next(_groups)}",
        label_topic="labels",
        ttl_s=ttl_s,
        max_pending=1000,
        journal=journal,
    )
    pending.restore(None)
    return pending


def with_entries(server: RedisServer, entries: dict[str, bytes], *, ttl_s: float = 1e9) -> RedisPending:
    """A store opened on sample entries written straight into Redis (stamped 1.0, oldest first), as a store an
    earlier version left behind (no checkpoints: it resumes with what Redis holds, its byte totals counted)."""
    group = f"entries-{next(_groups)}"
    prefix, client = f"streamcl:pending:{{{group}}}:", server.client()
    for seq, (sample_id, entry) in enumerate(entries.items()):
        client.zadd(prefix + "s:order", {sample_id: seq})
        client.hset(prefix + "s:data", sample_id, entry)
        client.hset(prefix + "s:ts", sample_id, "1.0")
    pending = RedisPending(client, group=group, label_topic="labels", ttl_s=ttl_s, max_pending=1000, journal=False)
    pending.restore(None)
    return pending


def old_entry(record: Record, predicted: np.ndarray) -> bytes:
    """A sample's entry as written before a binary sample's array was stored as its layout: every array stored, as
    the writer still stores an array that is not its message's value."""
    with mock.patch.object(pending_redis, "is_value_bytes", lambda x, value: False):
        return _sample_entry(record, predicted)


def joined_back(pending: RedisPending, samples: list[Record]) -> list[tuple[Record, np.ndarray]]:
    """The waiting ``samples`` as their labels join them."""
    settled = pending.label([label(s.id, "cat", 2) for s in samples])
    assert not settled.expired and not settled.unmatched
    return [(record, predicted) for record, predicted, _ in settled.joined]


def expired_back(pending: RedisPending, samples: list[Record]) -> list[Record]:
    """The waiting ``samples`` (stamped 1.0, TTL 10) as a label far later expires them, for their dead letters."""
    settled = pending.label([label("late", "cat", 100)])
    assert not settled.joined and [r.id for r in settled.expired] == [s.id for s in samples]
    return settled.expired


def assert_exact(back: Record, live: Record) -> None:
    """``back`` is ``live`` read from its entry: id, array (values, dtype, shape) and its message (a sample of a
    message of several: its own part, see sample_message) byte for byte."""
    assert back.id == live.id and (back.x.dtype, back.x.shape) == (live.x.dtype, live.x.shape)
    assert np.array_equal(back.x, live.x) and back.message == sample_message(live.message)
    assert (back.position, back.timestamp) == (live.position, live.timestamp)


@pytest.mark.parametrize("encode", [encode_binary, encode_batch_binary])
def test_redis_holds_the_bytes_of_a_waiting_binary_sample_once(redis_server: RedisServer, encode: Callable) -> None:
    """A binary sample's array is a view on its message's bytes: its entry holds those bytes, not also a copy of the
    array (twice Redis's memory, and the byte bound reached at half the samples)."""
    n, size = 32, 64 * 1024
    xs = np.arange(n * size, dtype=np.uint8).reshape(n, size)
    pending = fresh(redis_server)
    pending.arrive(decoded_samples(encode, [f"s{i}" for i in range(n)], xs), classes(n))
    stored = totals(redis_server, pending)[0]
    assert stored == counted(redis_server, pending)[0] and n * size < stored < 1.1 * n * size


@pytest.mark.parametrize("encode", ENCODINGS)
def test_a_waiting_sample_joins_as_it_arrived(redis_server: RedisServer, encode: Callable) -> None:
    samples = waiting_samples(encode)
    pending = fresh(redis_server)
    pending.arrive(samples, PREDICTED)
    back = joined_back(pending, samples)
    assert [r.id for r, _ in back] == [s.id for s in samples]
    for (record, predicted), live, sent in zip(back, samples, PREDICTED, strict=True):
        assert_exact(record, live)
        assert np.array_equal(predicted, sent) and predicted.dtype == sent.dtype
    # a binary sample's array is a view on its message's bytes again, as decoding made it
    assert [on_its_message(r) for r, _ in back] == [encode in (encode_binary, encode_batch_binary)] * 4


@pytest.mark.parametrize("encode", ENCODINGS)
def test_an_expired_sample_carries_its_message_byte_for_byte(redis_server: RedisServer, encode: Callable) -> None:
    samples = waiting_samples(encode)
    pending = fresh(redis_server, ttl_s=10)
    pending.arrive(samples, PREDICTED)
    for record, live in zip(expired_back(pending, samples), samples, strict=True):
        assert_exact(record, live)


@pytest.mark.parametrize("encode", ENCODINGS)
def test_entries_that_stored_every_array_are_read_as_before(redis_server: RedisServer, encode: Callable) -> None:
    """A store (or an undo journal) written before binary arrays were stored as their layouts is read exactly."""
    samples = waiting_samples(encode)
    old = {s.id: old_entry(s, p) for s, p in zip(samples, PREDICTED, strict=True)}
    differs = [_sample_entry(s, p) != old[s.id] for s, p in zip(samples, PREDICTED, strict=True)]
    assert differs == [encode in (encode_binary, encode_batch_binary)] * 4
    back = joined_back(with_entries(redis_server, old), samples)
    for (record, predicted), live, sent in zip(back, samples, PREDICTED, strict=True):
        assert_exact(record, live)
        assert np.array_equal(predicted, sent) and predicted.dtype == sent.dtype
    for record, live in zip(expired_back(with_entries(redis_server, old, ttl_s=10), samples), samples, strict=True):
        assert_exact(record, live)


@pytest.mark.parametrize(
    ("dtype", "shape"),
    [("<f4", [2, 4]), ("<f8", [2, 3]), ("no such dtype", [2, 3]), ("<f4", [2.0, 3.0]), ("<f4", [-1])],
)
def test_an_entry_whose_layout_does_not_fit_its_value_is_given_up_as_damaged(
    redis_server: RedisServer, dtype: str, shape: list
) -> None:
    """A binary sample's entry names its array's layout; one that does not fit its message's value (24 bytes:
    float32 of shape [2, 3]) is damaged: the sample is given up and its label dead, as for any damaged entry."""
    (sample,) = waiting_samples(encode_binary)[:1]
    header, chunks = _unpack(_sample_entry(sample, PREDICTED[0]))
    assert (header["dtype"], header["shape"], len(chunks[1])) == ("<f4", [2, 3], 24)
    damaged = _pack({**header, "dtype": dtype, "shape": shape}, chunks)
    settled = with_entries(redis_server, {sample.id: damaged}).label([label(sample.id, "cat", 2)])
    assert not settled.joined and [r.id for r in settled.expired] == [sample.id]
    assert [(d.reason, d.detail) for d in settled.unmatched] == [(UNMATCHED, DAMAGED_SAMPLE)]
    settled = with_entries(redis_server, {sample.id: damaged}, ttl_s=10).label([label("late", "cat", 100)])
    assert [(r.id, r.message.value) for r in settled.expired] == [("", b"")]  # given up: nothing of it to send
