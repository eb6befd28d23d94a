"""Damaged and foreign entries in a shared Redis buffer, against a real redis-server: a draw leaves the samples
it cannot read (or whose class the learner's tree refuses) out, counts and logs them, and never raises."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from buffers.open import open_store, redis_client
from buffers.redis import CORRUPT_LOG_INTERVAL_S, RedisStore
from consumers.recorded import RecordedSource
from monitoring.metrics import Metrics
from stream_cl.assemble import learner_factory
from stream_cl.build import build_learner
from stream_cl.config import Config
from stream_cl.labels import LabelTree
from stream_cl.run import RunOptions, run_stream
from tests.buffers.test_redis import batch
from tests.streams import FaultAhead, write_stream

PATHS = [("a",), ("b",), ("c",)]
LEARNER = {"device": torch.device("cpu"), "buffer_size": 60, "hparams": {"replay_batch_size": 60}}
"""An ER learner that draws its whole buffer (60 samples) at every step."""


def by_index(redis_server, name: str, **kwargs) -> RedisStore:
    """A store labelling ``"level:y"`` holding samples 0..9 in slots 0..9 (x[:, 0] = position, y = position % 3)."""
    store = RedisStore(redis_client(redis_server.url), 20, name=name, **kwargs)
    store.clear()
    store.add(*batch(0))
    return store


def by_path(redis_server, name: str, tree: LabelTree | None = None, **kwargs) -> RedisStore:
    """As :func:`by_index`, labelled by class path: position p is of class ``PATHS[p % 3]``."""
    tree = tree or LabelTree()
    store = RedisStore(redis_client(redis_server.url), 20, name=name, classes=tree, **kwargs)
    store.clear()
    level, y, _ = tree.encode([PATHS[p % 3] for p in range(10)])
    store.add(batch(0)[0], torch.from_numpy(y), torch.from_numpy(level))
    return store


def positions(replay) -> list[int]:
    return sorted(replay.x[:, 0].tolist())


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "buffers.redis"]


@pytest.mark.parametrize("bad", [b"abc", bytes(40), None], ids=["short", "long", "missing"])
def test_a_sample_of_another_size_is_left_out_counted_and_logged(redis_server, caplog, bad):
    store = by_index(redis_server, f"size-{bad is None}-{len(bad or b'')}")
    client, x_key = redis_server.client(), store.keys[2]
    if bad is None:
        client.hdel(x_key, 3)  # as a lost field reads
    else:
        client.hset(x_key, 3, bad)
    with caplog.at_level(logging.WARNING, logger="buffers.redis"):
        replay = store.sample(10)
    assert positions(replay) == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert torch.equal(replay.x[:, 0], replay.slot) and torch.equal(replay.x[:, 0] % 3, replay.y), "rows stay whole"
    assert "slot 3 holds" in caplog.text and "1 drawn sample(s) left out" in caplog.text
    assert (store.stats().corrupt, store.stats().errors) == (1, 0)
    replay = store.sample_then_add(10, *batch(10))  # the learner goes on, on the shared buffer
    assert len(replay) == 9 and store.seen == 20 and store.stats().corrupt == 2 and store.stats().errors == 0


def test_an_evicted_sample_key_empties_draws_but_is_no_outage(redis_server):
    """allkeys-lru may evict the whole ``x`` hash: every drawn slot then lacks its bytes."""
    store = by_index(redis_server, "evicted")
    redis_server.client().delete(store.keys[2])
    assert len(store.sample(10)) == 0 and store.stats().corrupt == 10
    store.add(*batch(10))
    assert positions(store.sample(20)) == list(range(10, 20))
    assert store.stats().errors == 0 and store.stats().corrupt == 20


def test_warnings_are_rate_limited_but_every_sample_is_counted(redis_server, caplog):
    now = [0.0]
    store = by_index(redis_server, "rate", clock=lambda: now[0])
    redis_server.client().hset(store.keys[2], 3, b"abc")
    with caplog.at_level(logging.WARNING, logger="buffers.redis"):
        for _ in range(5):
            store.sample(10)
        assert len(warnings(caplog)) == 1
        now[0] += CORRUPT_LOG_INTERVAL_S
        store.sample(10)
    assert len(warnings(caplog)) == 2 and "(6 corrupt samples left out of draws so far" in warnings(caplog)[1]
    assert store.stats().corrupt == 6


@pytest.mark.parametrize(
    "label",
    [b"junk", b"[" * 100_000, b"[1]", b"[]", b'["a",""]', b'["a"', b'{"a": 1}', b'["\xff"]', b"0:1"],
    ids=["junk", "nested", "number", "empty", "empty-name", "cut", "object", "not-utf8", "other-kind"],
)
def test_an_unreadable_class_path_is_left_out_and_counted(redis_server, caplog, label):
    tree = LabelTree()
    store = by_path(redis_server, f"path-label-{label[:8].hex()}-{len(label)}", tree)
    redis_server.client().hset(store.keys[3], 3, label)
    with caplog.at_level(logging.WARNING, logger="buffers.redis"):
        replay = store.sample(10)
        assert positions(replay) == [0, 1, 2, 4, 5, 6, 7, 8, 9]
        assert "but this store reads labels by class path" in caplog.text
        assert positions(store.sample(10)) == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert store.stats().corrupt == 2, "counted at every draw: the label is never cached as good"
    assert tree.sizes == [3]


@pytest.mark.parametrize("label", [b"junk", b'["a"]', b"99999999999:0", b"-3:0", b"1:2:3"])
def test_an_unreadable_level_and_index_is_left_out_and_counted(redis_server, label):
    store = by_index(redis_server, f"index-label-{label.hex()}")
    redis_server.client().hset(store.keys[3], 3, label)
    assert positions(store.sample(10)) == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert store.stats().corrupt == 1 and store.stats().errors == 0


def test_a_lost_label_is_left_out_and_is_no_outage(redis_server):
    """A slot whose label field is gone (slots 0..HLEN-1 are drawn) reads as an empty label."""
    store = by_path(redis_server, "lost-label")
    redis_server.client().hdel(store.keys[3], 3)
    replay = store.sample(10)
    assert 3 not in positions(replay) and len(replay) == 8, "9 slots drawn (HLEN is 9), slot 3 among them"
    assert store.stats().corrupt == 1 and store.stats().errors == 0


@pytest.mark.parametrize(
    ("dtype", "shape"),
    [
        *[(b"O", b"4"), (b"garbage", b"4"), (b">i8", b"4"), (b"c8", b"2"), (b"(2,)i8", b"2"), (b"(1e9999,)f4", b"4")],
        *[(b"<i8", b"a,b"), (b"<i8", b"-4"), (b"<i8", b"0"), (b"<i8", b"4," * 100)],
    ],
)
def test_a_foreign_sample_layout_empties_draws_without_raising(redis_server, caplog, dtype, shape):
    """Object, complex, structured or foreign byte-order dtypes and unreadable shapes: nothing is unpickled or
    reshaped; the draw is empty and counted. Once the meta is right again, draws are too."""
    store = by_index(redis_server, f"meta-{dtype.hex()}-{shape[:8].hex()}-{len(shape)}")
    client, meta = redis_server.client(), store.keys[0]
    good = client.hmget(meta, "dtype", "shape")
    client.hset(meta, mapping={"dtype": dtype, "shape": shape})
    with caplog.at_level(logging.WARNING, logger="buffers.redis"):
        assert len(store.sample(10)) == 0
    assert "holds samples of unreadable dtype" in caplog.text
    assert store.stats().corrupt == 10 and store.stats().errors == 0
    client.hset(meta, mapping={"dtype": good[0], "shape": good[1]})
    assert positions(store.sample(10)) == list(range(10))


def test_class_counts_leave_out_unreadable_labels_and_counts(redis_server):
    store = by_path(redis_server, "counts")
    counts_key = store.keys[4]
    redis_server.client().hset(counts_key, mapping={b"junk": 5, b"[" * 100_000: 2, b'["a"]': b"many", b"0:1": 1})
    counts = store.stats(classes=True).class_counts
    assert counts == {store.classes.lookup(("b",)): 3, store.classes.lookup(("c",)): 3}


def write_path(redis_server, name: str, path: tuple[str, ...], slot: int = 3) -> None:
    """Overwrite slot ``slot``'s label in buffer ``name`` with ``path``, as a peer with other limits would store it."""
    key = f"streamcl:buffer:{{{name}}}:lab"
    redis_server.client().hset(key, slot, json.dumps(path, separators=(",", ":")))


def test_a_path_deeper_than_the_trees_max_depth_is_refused(redis_server, caplog):
    """The reviewer's case: a shallow tree must not grow to a peer's depth (12) through a draw."""
    tree = LabelTree(max_depth=2)
    store = by_path(redis_server, "deep", tree)
    write_path(redis_server, "deep", tuple(f"l{i}" for i in range(12)))
    with caplog.at_level(logging.WARNING, logger="buffers.redis"):
        for _ in range(2):
            assert positions(store.sample(10)) == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert tree.depth == 1 and tree.sizes == [3]
    assert store.stats().corrupt == 2 and "deeper than max_depth=2" in caplog.text


def test_a_path_that_gives_a_known_class_another_parent_is_refused(redis_server):
    tree = LabelTree()
    tree.encode([("a", "x")])
    store = by_path(redis_server, "parent", tree)
    write_path(redis_server, "parent", ("b", "x"))
    assert positions(store.sample(10)) == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert tree.sizes == [3, 1] and store.stats().corrupt == 1


def test_a_draw_grows_the_tree_no_further_than_max_classes(redis_server):
    by_path(redis_server, "limit")  # classes a, b, c in slots 0..9
    for slot, name in ((0, "d"), (1, "e")):
        write_path(redis_server, "limit", (name,), slot)
    tree = LabelTree()
    tree.encode([("a",)])
    reader = RedisStore(redis_client(redis_server.url), 20, name="limit", classes=tree, max_classes=3)
    replay = reader.sample(10)
    assert sum(tree.sizes) == 3
    kept = {tree.path(level, y) for level, y in zip(replay.level.tolist(), replay.y.tolist(), strict=True)}
    assert kept == {tree.path(0, i) for i in range(3)}, "only the classes that fit are drawn"
    assert len(replay) + reader.stats().corrupt == 10 and reader.stats().corrupt >= 2
    assert len(reader.sample(10)) == len(replay), "the refused classes stay refused"


def test_class_balanced_insert_with_more_tied_classes_than_luas_stack(redis_server):
    """Once full, CBRS marks every largest class full in one SADD: 9000 tied classes are more than unpack() takes."""
    store = open_store(f"{redis_server.url}?name=tied", 9000, policy="class-balanced")
    store.clear()
    pos = torch.arange(9000)
    store.add(pos.to(torch.int32).view(-1, 1), pos, torch.zeros(9000, dtype=torch.long))
    slots = store.add(torch.tensor([[9000]], dtype=torch.int32), torch.tensor([9000]), torch.zeros(1, dtype=torch.long))
    assert store.stats().errors == 0 and store.seen == 9001 and slots[0] >= 0
    assert redis_server.client().scard(store.keys[6]) == 9000


class Corrupting(FaultAhead):
    """A source that damages the shared buffer once ``at`` records were polled: one sample's bytes, one label
    nested too deep, one class path deeper than the learner's tree takes, one junk class count."""

    def __init__(self, source: RecordedSource, server, name: str, at: int) -> None:
        super().__init__(source)
        self.client, self.at = server.client(), at
        self.keys = [f"streamcl:buffer:{{{name}}}:{k}" for k in ("meta", "seen", "x", "lab", "counts")]

    def before_poll(self) -> None:
        if self.polled >= self.at and self.at >= 0:
            self.at = -1
            self.client.hset(self.keys[2], 0, b"abc")
            self.client.hset(self.keys[3], mapping={1: b"[" * 100_000, 2: json.dumps([f"l{i}" for i in range(12)])})
            self.client.hset(self.keys[4], b"junk", 1)


def test_a_learner_keeps_learning_over_a_damaged_shared_buffer_and_publishes_the_count(redis_server, tmp_path):
    """Before, the first draw that met the damage raised out of the run loop, after every restart."""
    path = write_stream(tmp_path / "blobs.rec.gz", n_classes=3, per_class=40, shape=(8,))
    url = f"{redis_server.url}?name=damaged"
    open_store(url, 60).clear()
    made = []

    def learner(shape: tuple[int, ...], dtype: np.dtype):
        made.append(build_learner("er", "mlp", shape, dtype, **LEARNER, buffer_spec=url))
        return made[-1]

    registry = CollectorRegistry()
    source = Corrupting(RecordedSource(path), redis_server, "damaged", at=60)
    summary, _ = run_stream(source, learner, Metrics(registry), RunOptions(progress=False, probe_every=10**6))
    store = made[-1].buffer
    assert summary.learned == 120 and store.stats().errors == 0
    assert made[-1].labels.sizes == [3], "the 12-deep path did not grow the heads"
    assert store.stats().corrupt >= 3, "the draw after the damage met all three samples"
    assert registry.get_sample_value("streamcl_buffer_corrupt_samples_total") == store.stats().corrupt


def test_the_configured_learner_bounds_its_shared_buffer_draws_by_max_classes(redis_server):
    """``--max-classes`` reaches the Redis store, so a peer's classes cannot grow the heads past it."""
    settings = {"buffer": f"{redis_server.url}?name=configured", "max_classes": 7, "metrics_port": 0}
    factory = learner_factory(Config.from_mapping(settings), torch.device("cpu"))
    assert factory((8,), np.dtype(np.float32)).buffer.max_classes == 7


DAMAGE = {
    "seen junk": lambda c, k: c.set(k["seen"], b"not a count"),
    "seen of another type": lambda c, k: (c.delete(k["seen"]), c.rpush(k["seen"], b"1")),
    "seen evicted": lambda c, k: c.delete(k["seen"]),
    "seen below the samples": lambda c, k: c.set(k["seen"], 3),
    "seen infinite": lambda c, k: c.set(k["seen"], b"inf"),
    "a count evicted": lambda c, k: c.hdel(k["counts"], "0:1"),
    "a count junk": lambda c, k: c.hset(k["counts"], "0:1", b"x"),
    "counts of another type": lambda c, k: (c.delete(k["counts"]), c.set(k["counts"], b"{}")),
    "a stream count junk": lambda c, k: c.hset(k["stream"], "0:1", b"1.5e"),
    "a class set of another type": lambda c, k: (c.delete(k["cls:0:1"]), c.set(k["cls:0:1"], b"x")),
    "a class set evicted": lambda c, k: c.delete(k["cls:0:1"]),
    "meta of another type": lambda c, k: (c.delete(k["meta"]), c.sadd(k["meta"], b"x")),
}


CLASS_BALANCED_ONLY = (
    "a stream count junk",
    "a class set of another type",
    "a class set evicted",
)  # keys only that policy reads


@pytest.mark.parametrize(
    ("policy", "damage"),
    [
        (p, d)
        for p in ("reservoir", "class-balanced")
        for d in DAMAGE
        if p == "class-balanced" or d not in CLASS_BALANCED_ONLY
    ],
)
def test_a_damaged_or_foreign_counter_is_rebuilt_from_the_samples_not_an_outage(redis_server, caplog, policy, damage):
    """Before, every call of the script raised: the learners took it for an outage, for good."""
    store = by_index(redis_server, f"repair-{policy}-{damage}".replace(" ", "-"), policy=policy)
    store.add(*batch(10, 20))  # full (20 of 30 kept), so inserts decide by the counters
    client = redis_server.client()
    keys = dict(zip(("meta", "seen", "x", "lab", "counts", "stream", "full"), store.keys, strict=False))
    keys["cls:0:1"] = store.keys[-1] + "0:1"
    DAMAGE[damage](client, keys)
    with caplog.at_level(logging.WARNING, logger="buffers.redis"):
        replay = store.sample_then_add(10, *batch(30))
    assert len(replay) == 10 and store.stats().errors == 0, "the step drew and inserted on the shared buffer"
    assert store.stats().repairs >= 1 and "damaged or foreign" in caplog.text
    labels = client.hvals(keys["lab"])
    assert store.seen >= len(labels) == store.stats().size
    assert {k: int(v) for k, v in client.hgetall(keys["counts"]).items()} == {
        label: labels.count(label) for label in set(labels)
    }, "the class counts agree with the labels stored"
    repairs = store.stats().repairs
    store.sample_then_add(10, *batch(40))
    assert (store.stats().repairs, store.stats().errors) == (repairs, 0), "repaired once, not at every step"
