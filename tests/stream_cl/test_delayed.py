"""The delayed-label join on its own, over both pending stores (memory, and a real redis-server): event-time
expiry in both orders, a full store, checkpoint round trip, and the label message decoder."""

from __future__ import annotations

import dataclasses
import gc
import io
import itertools
import math
import time
import tracemalloc
from collections.abc import Callable

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from consumers.label_wire import LabelRecord, decode_label, encode_label
from consumers.record import DeadLetter, Message, Poll, Position, Record, held_bytes, message_bytes
from consumers.wire import (
    decode,
    decode_samples,
    encode_batch_binary,
    encode_batch_json,
    encode_binary,
    encode_json,
    sample_message,
)
from monitoring.labeljoin import JoinMetrics
from stream_cl.config import load
from stream_cl.delayed import DelayedLabels
from stream_cl.errors import ConfigError
from stream_cl.pending import EVICTED, UNMATCHED, MemoryPending, PendingStateError, PendingStore
from stream_cl.pending_redis import RedisPending
from tests.fixtures.redis import RedisServer

MakeStore = Callable[..., PendingStore]
_groups = itertools.count()


class Labels:
    """A label source that hands out the messages queued on it."""

    exhausted, poll_timeout_s, fetches_ahead = False, 0.0, False

    def __init__(self) -> None:
        self.queued: list[Message] = []

    def send(self, sample_id: str, label: str, at_s: float) -> None:
        position = Position("labels", 0, len(self.queued))
        self.queued.append(Message(position, at_s, None, encode_label(sample_id, label)))

    def poll(self, timeout_s: float, max_records: int) -> Poll:
        taken, self.queued = self.queued[:max_records], self.queued[max_records:]
        poll = Poll()
        for message in taken:
            entry = decode_label(message)
            (poll.dead_letters if isinstance(entry, DeadLetter) else poll.records).append(entry)
        return poll


class Sink:
    backpressure = False

    def __init__(self) -> None:
        self.sent: list[DeadLetter] = []

    def send(self, dead: DeadLetter) -> None:
        self.sent.append(dead)


def feature(sample_id: str, at_s: float) -> Record:
    message = Message(Position("features", 0, int(at_s)), at_s, sample_id.encode(), b"raw bytes", (("k", b"v"),))
    return Record(sample_id, np.full(3, at_s, dtype=np.float32), None, message.position, at_s, message)


@pytest.fixture(params=["memory", "redis"])
def make_store(request: pytest.FixtureRequest) -> MakeStore:
    """Pending stores of one kind; Redis ones on the session's redis-server, a fresh group (key prefix) each."""
    group = f"test-delayed-{next(_groups)}"

    def make(ttl_s: float = 10, max_pending: int = 100, *, journal: bool = True, **options: float) -> PendingStore:
        if request.param == "memory":
            return MemoryPending(ttl_s=ttl_s, max_pending=max_pending, **options)
        server: RedisServer = request.getfixturevalue("redis_server")
        client = server.client()
        store = RedisPending(
            client, group=group, label_topic="labels", ttl_s=ttl_s, max_pending=max_pending, journal=journal, **options
        )
        request.addfinalizer(store.close)
        return store

    return make


def join(make_store: MakeStore, ttl_s: float = 10, max_pending: int = 100) -> tuple[DelayedLabels, Labels, Sink]:
    labels, sink = Labels(), Sink()
    store = make_store(ttl_s, max_pending)
    delayed = DelayedLabels(labels, sink, store=store, metrics=JoinMetrics(CollectorRegistry()))
    delayed.restore(None)
    return delayed, labels, sink


def classes(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.int64).reshape(n, 1)


def test_a_sample_joins_its_label_in_either_order_and_keeps_its_arrival_prediction(make_store: MakeStore) -> None:
    delayed, labels, _ = join(make_store)
    assert not delayed.arrive([feature("a", 0)], classes(1)).joined
    labels.send("a", "cat", 4)
    labels.send("b", "dog", 5)  # before its features
    step, offsets, n = delayed.poll(100)
    assert [(j.record.id, j.record.label, int(j.predicted[0])) for j in step.joined] == [("a", ("cat",), 0)]
    assert (offsets, n) == ({("labels", 0): 2}, 2)
    step = delayed.arrive([feature("x", 1), feature("b", 2)], classes(2))
    assert [(j.record.id, j.record.label, int(j.predicted[0])) for j in step.joined] == [("b", ("dog",), 1)]
    assert delayed.store.pending_ids() == ["x"] and list(delayed.delays) == [4.0, 3.0]


def test_expiry_follows_event_time_of_the_other_topic(make_store: MakeStore) -> None:
    delayed, labels, sink = join(make_store, ttl_s=10)
    delayed.arrive([feature("a", 0), feature("b", 5)], classes(2))
    labels.send("ghost", "cat", 6)
    labels.send("late", "cat", 12)  # label time 12 > 0 + 10: a's label can no longer come in time
    step, _, _ = delayed.poll(100)
    assert [r.id for r in step.expired] == ["a"] and delayed.store.pending_ids() == ["b"]
    assert delayed.store.waiting_ids() == ["ghost", "late"] and not sink.sent
    delayed.arrive([feature("c", 17)], classes(1))  # feature time 17 > 6 + 10: ghost's features never came
    assert delayed.store.waiting_ids() == ["late"] and [d.reason for d in sink.sent] == [UNMATCHED]
    assert (delayed.expired, delayed.unmatched, delayed.joined) == (1, 1, 0)


def test_a_full_store_gives_up_its_oldest_entry_and_a_bad_label_message_is_a_dead_letter(make_store: MakeStore) -> None:
    delayed, labels, sink = join(make_store, max_pending=2)
    step = delayed.arrive([feature("a", 0), feature("b", 1), feature("c", 2)], classes(3))
    assert [r.id for r in step.expired] == ["a"] and delayed.store.pending_ids() == ["b", "c"]
    for sample_id in ("p", "q", "r"):
        labels.send(sample_id, "cat", 3)
    labels.queued.append(Message(Position("labels", 0, 3), 3, None, b'{"id": "s"}'))
    delayed.poll(100)
    assert delayed.store.waiting_ids() == ["q", "r"]
    assert [(d.reason, d.message.value) for d in sink.sent] == [
        ("missing_field", b'{"id": "s"}'),
        (UNMATCHED, encode_label("p", "cat")),
    ]


def test_the_memory_store_gives_up_its_oldest_entries_past_its_byte_bound() -> None:
    """Large messages: 1 MiB samples and 2 MiB labels against a 3 MiB bound, with room for 100 entries of each."""
    mib = 1024 * 1024
    store = MemoryPending(ttl_s=1e9, max_pending=100, max_bytes=3 * mib)
    big = [
        Record(r.id, np.zeros(mib // 4, np.float32), None, r.position, r.timestamp, r.message)
        for r in map(feature, "abcde", range(5))
    ]
    settled = store.arrive(big, classes(5))
    assert [r.id for r in settled.expired] == ["a", "b", "c"] and store.pending_ids() == ["d", "e"]
    assert store.pending_bytes == sum(map(held_bytes, big[3:])) <= 3 * mib
    labels = [
        LabelRecord(
            label_id,
            ("x",),
            Position("labels", 0, n),
            1.0,
            Message(Position("labels", 0, n), 1.0, None, b"x" * 2 * mib),
        )
        for n, label_id in enumerate("pq")
    ]
    settled = store.label(labels)
    assert [(d.message.value, d.detail) for d in settled.unmatched] == [(labels[0].message.value, EVICTED)]
    assert store.waiting_ids() == ["q"] and store.waiting_bytes == held_bytes(labels[1])
    restored = MemoryPending(ttl_s=1e9, max_pending=100, max_bytes=3 * mib)
    restored.restore(torch.load(io.BytesIO(_saved(store.state_dict())), weights_only=True))
    assert (restored.pending_bytes, restored.waiting_bytes) == (store.pending_bytes, store.waiting_bytes)


MIB = 1024 * 1024


def large_message_samples(n: int, encode: Callable = encode_batch_binary) -> list[Record]:
    """The 256 unlabelled samples (1,024 float32 each) of a 1 MiB message."""
    ids = [f"m{n}-{i}" for i in range(256)]
    value, headers = encode(ids, np.full((256, 1024), n, np.float32), [None] * 256)
    samples = decode_samples(Message(Position("features", 0, n), float(n), None, value, tuple(headers)), 16 * MIB)
    assert all(isinstance(s, Record) and s.label is None for s in samples)
    return samples  # type: ignore[return-value]


@pytest.mark.parametrize("encode", [encode_batch_binary, encode_batch_json])
def test_the_samples_of_a_message_count_what_they_keep_alive_once(encode: Callable) -> None:
    """A waiting sample keeps its whole message (and for JSON the message's decoded array) alive: the byte bound
    counts that once while any sample of the message waits, and lets it go with the last."""
    store = MemoryPending(ttl_s=1e9, max_pending=1000, max_bytes=64 * MIB)
    samples = large_message_samples(0, encode)
    store.arrive(samples[:1], classes(1))
    one = store.pending_bytes
    assert one > MIB if encode is encode_batch_binary else one > 2 * MIB  # JSON: its text and its array
    store.arrive(samples[1:], classes(255))
    assert (len(store.pending), store.pending_bytes) == (256, one)
    store.label([label_record(s.id, 1) for s in samples[:-1]])
    assert (store.pending_ids(), store.pending_bytes) == ([samples[-1].id], one)
    store.label([label_record(samples[-1].id, 1)])
    assert (store.pending_ids(), store.pending_bytes) == ([], 0)


def test_the_byte_bound_holds_what_samples_of_large_messages_keep_alive() -> None:
    """One sample of each of eight 1 MiB messages waits, against a 3 MiB bound: each counts its whole message,
    so two stay, and what stays alive is within the bound."""
    store = MemoryPending(ttl_s=1e9, max_pending=100, max_bytes=3 * MIB)
    tracemalloc.start()
    try:
        for n in range(8):
            store.arrive(large_message_samples(n)[:1], classes(1))
        gc.collect()
        alive = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert store.pending_ids() == ["m6-0", "m7-0"] and alive <= 3 * MIB and store.pending_bytes <= 3 * MIB


def _saved(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def restored(store: MemoryPending) -> MemoryPending:
    """A memory store with ``store``'s bounds, restored from a checkpoint of it."""
    again = MemoryPending(ttl_s=store.ttl_s, max_pending=store.max_pending, max_bytes=store.max_bytes)
    again.restore(torch.load(io.BytesIO(_saved(store.state_dict())), weights_only=True))
    return again


def on_its_message(record: Record) -> bool:
    """Whether a record's array is a view on its message's bytes (so it holds them once)."""
    return np.shares_memory(record.x, np.frombuffer(record.message.value, np.uint8))


@pytest.mark.parametrize("encode", [encode_binary, encode_json])
def test_a_restored_sample_of_a_message_of_one_holds_and_counts_what_it_did_before_the_checkpoint(
    encode: Callable,
) -> None:
    """A binary sample's array is a view on its message's bytes; restored, it is again (not a copy next to them), so a
    store near its byte bound before a restart gives up nothing on the next arrival after it."""
    samples = []
    for n in range(3):
        value, headers = encode(f"s{n}", np.full(MIB // 4, n, np.float32), None)
        samples.append(decode(Message(Position("features", 0, n), float(n), None, value, tuple(headers)), 16 * MIB))
    store = MemoryPending(ttl_s=1e9, max_pending=100, max_bytes=4 * held_bytes(samples[0]))
    store.arrive(samples, classes(3))
    again = restored(store)
    assert again.pending_bytes == store.pending_bytes == sum(map(held_bytes, samples))
    assert [on_its_message(p.record) for p in again.pending.values()] == [encode is encode_binary] * 3
    assert not again.arrive([feature("d", 3)], classes(1)).expired and len(again.pending) == 4


@pytest.mark.parametrize("encode", [encode_batch_binary, encode_batch_json])
def test_a_restored_sample_of_a_message_of_several_holds_and_counts_its_own_part(encode: Callable) -> None:
    """A checkpoint keeps a waiting sample's own part of its message: restored, the sample holds that part (a binary
    sample's array a view on it, as decoding made it) and counts exactly what it holds."""
    store = MemoryPending(ttl_s=1e9, max_pending=1000, max_bytes=64 * MIB)
    store.arrive(large_message_samples(0, encode)[:2], classes(2))
    records = [p.record for p in restored(store).pending.values()]
    assert [on_its_message(r) for r in records] == [encode is encode_batch_binary] * 2
    held = sum(message_bytes(r.message) + (0 if on_its_message(r) else r.x.nbytes) for r in records)
    assert restored(store).pending_bytes == held < store.pending_bytes


def test_restored_samples_of_one_byte_count_their_own_messages() -> None:
    """Two messages of several one-byte samples, one sample of each waiting: restored, each sample's own part is a
    one-byte value, an object CPython shares, yet each counts its own message (its headers differ)."""
    samples = []
    for n in range(2):
        value, headers = encode_batch_binary(["a", "b" * (n + 1)], np.full((2, 1), 7, np.uint8), [None] * 2)
        samples.append(decode_samples(Message(Position("features", 0, n), float(n), None, value, tuple(headers)))[1])
    store = MemoryPending(ttl_s=1e9, max_pending=100, max_bytes=MIB)
    store.arrive(samples, classes(2))
    again = restored(store)
    assert again.pending_bytes == sum(message_bytes(p.record.message) for p in again.pending.values())


SINGLE = (encode_binary, encode_json)


def decoded_samples(encode: Callable, ids: list[str], xs: np.ndarray, offset: int = 0) -> list[Record]:
    """The samples ``xs``, each encoded as a message of its own (``SINGLE``) or all as one message, decoded."""
    if encode in SINGLE:
        encoded = [encode(sample_id, x, None) for sample_id, x in zip(ids, xs, strict=True)]
    else:
        encoded = [encode(ids, xs, [None] * len(ids))]
    samples = []
    for n, (value, headers) in enumerate(encoded):
        message = Message(Position("features", 0, offset + n), 1.0, b"k", value, tuple(headers))
        samples += decode_samples(message, 16 * MIB)
    assert all(isinstance(s, Record) for s in samples)
    return samples  # type: ignore[return-value]


def waiting_samples(encode: Callable) -> list[Record]:
    """Four samples of two layouts (float32 of shape [2, 3], uint8 of shape [5]): the first and last of three of
    each, sent in messages of one or in one message."""
    layouts = [np.arange(18, dtype=np.float32).reshape(3, 2, 3) / 7, np.arange(15, dtype=np.uint8).reshape(3, 5)]
    return [
        sample
        for n, xs in enumerate(layouts)
        for sample in decoded_samples(encode, [f"m{n}-{i}" for i in range(3)], xs, 10 * n)[::2]
    ]


def _round_trip(state: dict) -> MemoryPending:
    again = MemoryPending(ttl_s=1e9, max_pending=100)
    again.restore(torch.load(io.BytesIO(_saved(state)), weights_only=True))
    return again


@pytest.mark.parametrize("encode", [encode_binary, encode_batch_binary])
def test_a_checkpoint_holds_the_bytes_of_a_waiting_binary_sample_once(encode: Callable) -> None:
    """A binary sample's array is a view on its message's bytes: a checkpoint keeps those bytes, not also a copy of
    the array (twice the disk, and twice the copying of each snapshot)."""
    n, size = 32, 64 * 1024
    xs = np.arange(n * size, dtype=np.uint8).reshape(n, size)
    samples = decoded_samples(encode, [f"s{i}" for i in range(n)], xs)
    store = MemoryPending(ttl_s=1e9, max_pending=n)
    store.arrive(samples, classes(n))
    state = store.state_dict()
    assert len(_saved(state)) < 1.2 * n * size + 64 * 1024
    again = _round_trip(state)
    assert all(
        np.array_equal(p.record.x, x) and on_its_message(p.record)
        for p, x in zip(again.pending.values(), xs, strict=True)
    )


@pytest.mark.parametrize("encode", [encode_binary, encode_json, encode_batch_binary, encode_batch_json])
def test_a_checkpoint_round_trip_restores_each_waiting_sample_exactly(encode: Callable) -> None:
    """Ids, arrays (values, dtype, shape), predicted classes, messages byte for byte (a sample of a message of
    several: its own part, see sample_message) and the bytes counted: with messages of one, those counted before."""
    samples = waiting_samples(encode)
    store = MemoryPending(ttl_s=1e9, max_pending=100)
    store.arrive(samples, np.array([[3], [1], [4], [1]]))
    again = _round_trip(store.state_dict())
    assert again.pending_ids() == store.pending_ids() == [s.id for s in samples]
    for live, back in zip(store.pending.values(), again.pending.values(), strict=True):
        assert (back.record.x.dtype, back.record.x.shape) == (live.record.x.dtype, live.record.x.shape)
        assert np.array_equal(back.record.x, live.record.x) and np.array_equal(back.predicted, live.predicted)
        assert back.record.message == sample_message(live.record.message)
    records = [p.record for p in again.pending.values()]
    binary = encode in (encode_binary, encode_batch_binary)
    assert [on_its_message(r) for r in records] == [binary] * 4
    held = sum(message_bytes(r.message) + (0 if binary else r.x.nbytes) for r in records)
    assert again.pending_bytes == held
    if encode in SINGLE:
        assert held == store.pending_bytes
    assert _round_trip(again.state_dict()).pending_bytes == held


def old_form(store: MemoryPending) -> dict:
    """``store``'s checkpoint as written before a binary sample's array was saved as its layout: every array saved."""
    state = store.state_dict()
    for entry, waiting in zip(state["pending"], store.pending.values(), strict=True):
        entry.pop("dtype", None)
        entry.pop("shape", None)
        entry["x"] = torch.from_numpy(waiting.record.x.copy())
    return state


@pytest.mark.parametrize("encode", [encode_binary, encode_batch_binary])
def test_a_checkpoint_that_saved_binary_arrays_restores_as_before(encode: Callable) -> None:
    store = MemoryPending(ttl_s=1e9, max_pending=100)
    store.arrive(waiting_samples(encode), classes(4))
    state = old_form(store)
    assert all("x" in entry and "shape" not in entry for entry in state["pending"])
    old, new = _round_trip(state), _round_trip(store.state_dict())
    assert old.pending_ids() == new.pending_ids() and old.pending_bytes == new.pending_bytes
    for a, b in zip(old.pending.values(), new.pending.values(), strict=True):
        assert a.record.message == b.record.message and on_its_message(a.record)
        assert (a.record.x.dtype, a.record.x.shape) == (b.record.x.dtype, b.record.x.shape)
        assert np.array_equal(a.record.x, b.record.x) and np.array_equal(a.predicted, b.predicted)


@pytest.mark.parametrize(
    ("dtype", "shape"), [("<f4", [2, 4]), ("<f8", [2, 3]), ("no such dtype", [2, 3]), ("<f4", [2.0, 3.0])]
)
def test_a_saved_layout_that_does_not_fit_its_message_is_a_clear_error(dtype: str, shape: list) -> None:
    store = MemoryPending(ttl_s=1e9, max_pending=100)
    store.arrive(waiting_samples(encode_binary)[:1], classes(1))
    state = store.state_dict()
    (entry,) = state["pending"]
    assert (entry["dtype"], entry["shape"]) == ("<f4", [2, 3])
    entry["dtype"], entry["shape"] = dtype, shape
    with pytest.raises(PendingStateError, match=r"pending sample 'm0-0' has an array of dtype .* does not fit its"):
        MemoryPending(ttl_s=1e9, max_pending=100).restore(state)


def test_the_stores_survive_a_checkpoint_round_trip_byte_for_byte(make_store: MakeStore) -> None:
    delayed, labels, _ = join(make_store)
    delayed.arrive([feature("a", 0)], classes(1))
    labels.send("b", "dog", 1)
    delayed.poll(100)
    buffer = io.BytesIO()
    torch.save(delayed.state_dict(), buffer)
    delayed.arrive([feature("c", 2)], classes(1))  # after the checkpoint: a restart from it has no c
    labels.send("a", "cat", 2)
    delayed.poll(100)  # nor a join of a

    again = Labels()
    restored = DelayedLabels(again, Sink(), store=make_store(), metrics=JoinMetrics(CollectorRegistry()))
    restored.restore(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    assert (restored.store.pending_ids(), restored.store.waiting_ids()) == (["a"], ["b"])
    again.send("a", "cat", 3)
    (kept,) = restored.poll(100)[0].joined
    assert kept.record.message == feature("a", 0).message and np.array_equal(kept.record.x, feature("a", 0).x)
    assert (kept.record.label, int(kept.predicted[0])) == (("cat",), 0)
    step = restored.arrive([feature("b", 0.5)], classes(1))
    assert [j.record.label for j in step.joined] == [("dog",)]


FAR_AHEAD = 9e12  # a producer's CreateTime of 9e15 ms: year 287,000


def test_a_timestamp_far_ahead_of_the_wall_clock_or_not_a_number_does_not_move_the_clocks(
    make_store: MakeStore,
) -> None:
    """Such an entry still waits and joins, but later arrivals are not expired as if from the far future."""
    delayed, labels, sink = join(make_store, ttl_s=10)
    for sample_id, at_s in [("bad-label", FAR_AHEAD), ("nan-label", math.nan), ("inf-label", math.inf)]:
        labels.send(sample_id, "cat", at_s)
    delayed.poll(100)
    for i in range(5):  # each sample labelled 1 s after it arrived
        assert not delayed.arrive([feature(f"s{i}", 100 + i)], classes(1)).expired
        labels.send(f"s{i}", "dog", 101 + i)
        assert [j.record.id for j in delayed.poll(100)[0].joined] == [f"s{i}"]
    nan_feature = dataclasses.replace(feature("nan-feature", 109), timestamp=math.nan)
    delayed.arrive([feature("bad-feature", FAR_AHEAD), nan_feature], classes(2))
    labels.send("w", "cat", 110)  # its features come 1 s later
    delayed.poll(100)
    assert not delayed.arrive([feature("x", 110.5)], classes(1)).joined and "w" in delayed.store.waiting_ids()
    step = delayed.arrive([feature("w", 111), feature("bad-label", 112)], classes(2))
    assert [j.record.id for j in step.joined] == ["w", "bad-label"] and not sink.sent
    labels.send("bad-feature", "cat", 113)
    assert [j.record.id for j in delayed.poll(100)[0].joined] == ["bad-feature"]
    assert (delayed.expired, delayed.unmatched) == (0, 0)

    near = time.time() + delayed.store.max_clock_skew_s / 2  # within the skew tolerated: a clock may run ahead
    labels.send("near", "cat", near)
    assert [r.id for r in delayed.poll(100)[0].expired] == ["nan-feature", "x"]  # nan-feature as if at 104


def test_the_skew_tolerated_is_a_setting_and_a_far_clock_of_an_older_checkpoint_is_dropped_on_restore(
    make_store: MakeStore,
) -> None:
    store = make_store(ttl_s=10, max_clock_skew_s=60)
    store.restore(None)
    now = time.time()
    store.arrive([feature("a", now - 5), feature("far", FAR_AHEAD)], classes(2))  # far: as if at now - 5
    assert not store.label([label_record("ahead", now + 120)]).expired  # more than 60 s ahead: the clock stays
    assert [r.id for r in store.label([label_record("soon", now + 30)]).expired] == ["a", "far"]

    checkpoint = store.state_dict()
    store.saved(checkpoint)
    checkpoint["label_time"] = FAR_AHEAD  # written before clocks were bounded
    restored = make_store(ttl_s=10)
    restored.restore(checkpoint)
    assert not restored.arrive([feature("b", 20)], classes(1)).expired and restored.pending_ids() == ["b"]


def test_one_label_half_a_day_ahead_does_not_expire_the_samples_that_follow(make_store: MakeStore) -> None:
    """Within a day of the wall clock, but far past a one-hour TTL: it would expire everything for half a day."""
    delayed, labels, sink = join(make_store, ttl_s=3600)
    now = time.time()
    delayed.arrive([feature("a", now - 3600)], classes(1))
    labels.send("ahead", "cat", now + 12 * 3600)
    assert not delayed.poll(100)[0].expired and delayed.store.pending_ids() == ["a"]
    for i in range(10):  # the hour that follows: each sample labelled 1 s after it came
        assert not delayed.arrive([feature(f"s{i}", now - 3600 + 360 * i)], classes(1)).expired
        labels.send(f"s{i}", "cat", now - 3599 + 360 * i)
        assert [j.record.id for j in delayed.poll(100)[0].joined] == [f"s{i}"]
    assert (delayed.expired, delayed.unmatched, sink.sent) == (0, 0, [])

    checkpoint = delayed.state_dict()
    checkpoint["label_time"] = now + 12 * 3600  # written while a day of skew was tolerated
    restored = make_store(ttl_s=3600)
    restored.restore(checkpoint)
    assert not restored.arrive([feature("b", now)], classes(1)).expired and restored.pending_ids() == ["a", "b"]


def test_a_sample_without_a_timestamp_waits_as_if_stamped_with_the_clock_when_it_came(make_store: MakeStore) -> None:
    """Kafka's -1 ms ("none") is not an event time of 1970, which the label clock is long past."""
    delayed, labels, _ = join(make_store, ttl_s=3600)
    now = time.time()
    labels.send("first", "cat", now)  # the label topic has a clock
    delayed.poll(100)
    no_timestamp = dataclasses.replace(feature("none", 0), timestamp=-0.001)
    assert not delayed.arrive([no_timestamp], classes(1)).expired and delayed.store.pending_ids() == ["none"]
    labels.send("later", "cat", now + 1)
    assert not delayed.poll(100)[0].expired
    labels.send("none", "cat", now + 2)
    assert [j.record.id for j in delayed.poll(100)[0].joined] == ["none"]


def test_a_sample_without_a_timestamp_holds_no_expiry_back_in_a_replay_of_old_records(make_store: MakeStore) -> None:
    """Before its own topic has a clock it counts from the label topic's: counted from the wall clock, it would
    keep every sample after it from expiring while the replay's event times stay decades in the past."""
    delayed, labels, _ = join(make_store, ttl_s=100)
    labels.send("x", "cat", 1000)
    delayed.poll(100)
    first = dataclasses.replace(feature("first", 0), timestamp=-0.001)
    assert not delayed.arrive([first], classes(1)).expired
    assert not delayed.arrive([feature(f"s{i}", 1000 + i) for i in range(5)], classes(5)).expired
    labels.send("y", "cat", 5000)
    assert sorted(r.id for r in delayed.poll(100)[0].expired) == ["first", "s0", "s1", "s2", "s3", "s4"]


def label_record(label_id: str, at_s: float) -> LabelRecord:
    entry = decode_label(Message(Position("labels", 0, 0), at_s, None, encode_label(label_id, "cat")))
    assert isinstance(entry, LabelRecord)
    return entry


def test_label_messages_decode_or_say_why_not() -> None:
    def decoded(value: bytes) -> object:
        entry = decode_label(Message(Position("l", 0, 0), 1.0, None, value))
        return entry.reason if isinstance(entry, DeadLetter) else (entry.id, entry.label)

    assert decoded(encode_label("a", ["animal", "dog"])) == ("a", ("animal", "dog"))
    assert decoded(b'{"id": "a", "y": null}') == "missing_field"
    assert decoded(b'{"y": "dog"}') == "missing_field"
    assert decoded(b'{"id": "a", "y": 3}') == "bad_label"
    assert decoded(b"\xff") == "undecodable"
    assert decoded(b"[1]") == "bad_json"
    assert decoded(b" " * 70_000) == "oversized"


def test_a_label_message_with_a_huge_key_or_headers_is_refused_as_oversized() -> None:
    """A waiting label keeps its whole message, and a Redis store is bounded by count only: 100,000 labels of
    1 MiB of headers each would take 100 GiB."""
    value = encode_label("a", "cat")
    for key, headers in [(b"k" * 70_000, ()), (None, (("trace", b"t" * 70_000),))]:
        entry = decode_label(Message(Position("l", 0, 0), 1.0, key, value, headers))
        assert isinstance(entry, DeadLetter) and entry.reason == "oversized"
    assert isinstance(decode_label(Message(Position("l", 0, 0), 1.0, b"a", value, (("trace", b"t"),))), LabelRecord)


def test_the_metrics_follow_the_join(make_store: MakeStore) -> None:
    delayed, labels, _ = join(make_store, ttl_s=10)
    delayed.arrive([feature("a", 0), feature("b", 1)], classes(2))
    labels.send("a", "cat", 3)
    labels.send("ghost", "cat", 4)
    labels.send("late", "cat", 20)  # label time 20 > 1 + 10: b expires
    delayed.poll(100)
    delayed.arrive([feature("c", 30)], classes(1))  # feature time 30 > 4 + 10: ghost is unmatched
    registry = delayed.metrics.registry
    value = registry.get_sample_value
    assert value("streamcl_labels_total", {"outcome": "joined"}) == 1
    assert value("streamcl_labels_total", {"outcome": "unmatched"}) == 1
    assert value("streamcl_pending_expired_total") == 1
    assert (value("streamcl_pending_samples"), value("streamcl_labels_waiting")) == (1, 1)
    assert (value("streamcl_label_delay_seconds_count"), value("streamcl_label_delay_seconds_sum")) == (1, 3)


def test_pending_comes_from_the_flag_or_the_environment_and_must_be_memory_or_redis() -> None:
    assert load({}, {}).labels.pending == "memory"
    from_env = load({}, {"STREAMCL_PENDING": "redis://app:pw@redis:6379/2"})
    assert from_env.labels.pending == "redis://app:pw@redis:6379/2"
    assert load({"pending": "rediss://redis:6380/0"}, {}, sections=("labels", "source")).labels.pending.startswith(
        "rediss"
    )
    with pytest.raises(ConfigError, match="must be 'memory' or a Redis URL") as error:
        load({"pending": "postgres://app:pw@db/0"}, {})
    assert "pw" not in str(error.value)


def test_a_join_with_a_timestamp_the_clocks_do_not_believe_is_not_measured_as_a_delay(make_store: MakeStore) -> None:
    """A far-future, NaN or missing (Kafka's -1 ms) timestamp would put an absurd or infinite delay in the
    histogram's sum for good; such joins still count, unmeasured."""
    delayed, labels, _ = join(make_store, ttl_s=1e9)
    no_timestamp = dataclasses.replace(feature("none", 0), timestamp=-0.001)
    delayed.arrive([feature("far", 100), feature("nan", 101), no_timestamp, feature("ok", 102)], classes(4))
    for sample_id, at_s in [("far", FAR_AHEAD), ("nan", math.nan), ("none", 103), ("ok", 107)]:
        labels.send(sample_id, "cat", at_s)
    assert len(delayed.poll(100)[0].joined) == 4
    value = delayed.metrics.registry.get_sample_value
    assert value("streamcl_labels_total", {"outcome": "joined"}) == 4
    assert (value("streamcl_label_delay_seconds_count"), value("streamcl_label_delay_seconds_sum")) == (1, 5)
    assert list(delayed.delays) == [5.0]
