"""``streamcl_buffer_class_samples``: what the replay buffer holds now, per class and level, never a stale count."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from prometheus_client import CollectorRegistry

from buffers.memory import MemoryStore
from monitoring.metrics import Metrics
from stream_cl.labels import LabelTree
from stream_cl.publishing import Publisher


def class_samples(metrics: Metrics) -> dict[tuple[str, str], float]:
    """(level, class) → value of every ``streamcl_buffer_class_samples`` series."""
    (family,) = [f for f in metrics.registry.collect() if f.name == "streamcl_buffer_class_samples"]
    return {(s.labels["level"], s.labels["class"]): s.value for s in family.samples}


def add(store: MemoryStore, n: int, cls: int, level: int = 0) -> None:
    store.add(torch.zeros(n, 2), torch.full((n,), cls), torch.full((n,), level))


def test_a_class_evicted_from_the_buffer_reads_0() -> None:
    tree = LabelTree()
    tree.encode([("a",), ("b",)])
    store = MemoryStore(capacity=4)
    learner = SimpleNamespace(buffer=store, labels=tree)
    metrics = Metrics(CollectorRegistry())
    publisher = Publisher(metrics)
    add(store, 4, cls=0)
    publisher.buffer(learner)
    assert class_samples(metrics) == {("0", "a"): 4}
    add(store, 2000, cls=1)  # the stream moved on: reservoir sampling keeps no a among 4 slots
    assert store.stats(classes=True).class_counts == {(0, 1): 4}
    publisher.buffer(learner)
    assert class_samples(metrics) == {("0", "a"): 0, ("0", "b"): 4}  # a no longer reads 4: the series sum is the size


def test_one_name_at_two_levels_is_two_series() -> None:
    tree = LabelTree()
    tree.encode([("x",), ("y", "x")])  # "x" is a class at level 0 and, under "y", at level 1
    store = MemoryStore(capacity=4)
    add(store, 1, cls=0, level=0)
    add(store, 3, cls=0, level=1)
    metrics = Metrics(CollectorRegistry())
    Publisher(metrics).buffer(SimpleNamespace(buffer=store, labels=tree))
    assert class_samples(metrics) == {("0", "x"): 1, ("1", "x"): 3}
