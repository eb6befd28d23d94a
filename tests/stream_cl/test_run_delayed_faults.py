"""The delayed-label run loop under faults: a restarted learner joining samples a deeper tree predicted, a full label
dead-letter spool, and a learner that falls behind its stream."""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from consumers.record import Message, Poll, Position
from consumers.recorded import RecordedSource, write_messages
from consumers.wire import encode_binary
from monitoring.labeljoin import JoinMetrics
from monitoring.metrics import Metrics
from stream_cl.build import build_learner
from stream_cl.delayed import DelayedLabels
from stream_cl.learner import RunState
from stream_cl.overload import OverloadPolicy
from stream_cl.pending import MemoryPending
from stream_cl.pending_redis import RedisPending
from stream_cl.run import RunOptions, RunParts, run_stream
from stream_cl.summary import Summary
from tests.fixtures.redis import RedisServer
from tests.stream_cl.test_delayed import Sink
from tests.stream_cl.test_run_delayed_drift import LabelFeed, NoDeadLetters
from tests.stream_cl.test_scaleout_dead_letter_pause import PausedSink

make_learner = partial(build_learner, "er", "mlp", device=torch.device("cpu"), seed=0, width=8)


def _features(path: Path, ids: list[str], start_s: float = 0.0) -> Path:
    """Unlabelled feature records, one per id, a second apart from ``start_s``."""
    rng = np.random.default_rng(0)
    messages = []
    for i, sample_id in enumerate(ids):
        value, headers = encode_binary(sample_id, rng.random(4, dtype=np.float32), None)
        messages.append(Message(Position("features", 0, i), start_s + i, None, value, tuple(headers)))
    write_messages(path, messages)
    return path


def _accounted(summary: Summary) -> int:
    """Every consumed feature record's outcome, or pending (``consumed`` must equal it)."""
    settled = summary.learned + summary.held_out + summary.predicted + summary.overload_skipped
    return settled + sum(summary.dead_letter.values()) + summary.pending


def test_a_restarted_learner_joins_samples_a_deeper_tree_predicted_in_redis(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Without checkpoints a Redis store keeps its samples across a restart; the fresh learner's tree is shallower
    than the one that predicted them on arrival, and only the levels both have are scored."""

    def run(stream: Path, feed: LabelFeed) -> Summary:
        metrics = Metrics(CollectorRegistry())
        client, group = redis_server.client(), "restart-width"
        store = RedisPending(client, group=group, label_topic="labels", ttl_s=1e6, max_pending=1000, journal=False)
        labels = DelayedLabels(feed, NoDeadLetters(), store=store, metrics=JoinMetrics(metrics.registry))
        labels.restore(None)
        try:
            with RecordedSource(stream) as source:
                summary, _ = run_stream(
                    source, make_learner, metrics, RunOptions(progress=False, batch_size=5), RunParts(labels=labels)
                )
        finally:
            store.close()
        return summary

    ids = [f"a{i}" for i in range(20)]
    deep = LabelFeed()
    for i in range(10):  # the first half joins as two-level paths; the second half waits with two-level predictions
        deep.send(ids[i], ["animal", "dog" if i % 2 else "cat"], 100 + i)
    first = run(_features(tmp_path / "first.rec.gz", ids), deep)
    assert (first.learned, first.pending) == (10, 10)

    flat = LabelFeed()
    for sample_id in ids[10:]:
        flat.send(sample_id, "cat", 200)
    second = run(_features(tmp_path / "second.rec.gz", []), flat)  # a fresh learner, labels only
    assert (second.labels_joined, second.learned, second.pending) == (10, 10, 0)


class Features(RecordedSource):
    """A recorded feature stream that counts the records read, and those read while the label spool was full."""

    def __init__(self, path: Path, spool: PausedSink) -> None:
        super().__init__(path)
        self.spool, self.read, self.read_while_full = spool, 0, 0

    def poll(self, timeout_s: float, max_records: int) -> Poll:
        full = self.spool.backpressure
        poll = super().poll(timeout_s, max_records)
        self.read += len(poll.records)
        self.read_while_full += len(poll.records) if full else 0
        return poll


class FollowingLabels(LabelFeed):
    """Each sample's label is produced right after its features have been read (labels that come soon after)."""

    def __init__(self, features: Features) -> None:
        super().__init__()
        self.features, self.taken = features, 0

    def poll(self, timeout_s: float, max_records: int) -> Poll:
        poll = super().poll(timeout_s, min(max_records, self.features.read - self.taken))
        self.taken += len(poll)
        return poll


class Peer:
    """The rest of a worker group, which always has records: every turn is a group step, ended once this worker is."""

    def __init__(self, spool: PausedSink) -> None:
        self.spool = spool
        self.turns: list[tuple[bool, int, bool]] = []  # (label spool full, records polled, ended)
        self.finished = 0

    def agree(self, polled: int, ended: bool, stopping: bool) -> tuple[bool, bool]:
        self.turns.append((self.spool.backpressure, polled, ended))
        time.sleep(0.001)  # the group's collective round trip
        return ended, True

    def finish_step(self, state: RunState) -> None:
        self.finished += 1


class FullOnceLookedAt(PausedSink):
    """A label dead-letter sink whose spool is full for ``pause_s`` from the run loop's first look at it, however
    long the setup before the run took."""

    def __init__(self, pause_s: float) -> None:
        super().__init__(pause_s)
        self.pause_s, self.until = pause_s, None

    @property
    def backpressure(self) -> bool:
        if self.until is None:
            self.until = time.monotonic() + self.pause_s
        return time.monotonic() < self.until


FULL_S = 0.5
N = 100


@pytest.mark.parametrize("grouped", [False, True], ids=["alone", "group-worker"])
def test_a_full_label_spool_pauses_feature_reading_so_no_sample_is_evicted(tmp_path: Path, grouped: bool) -> None:
    """Labels cannot be read while their dead-letter spool is full; features read meanwhile would fill the pending
    store (here 20 entries) and evict samples whose labels then find nothing. A group's worker still makes every
    group step meanwhile, with no records and not ended."""
    metrics = Metrics(CollectorRegistry())
    ids = [f"s{i}" for i in range(N)]
    stream = _features(tmp_path / "features.rec.gz", ids)
    spool = FullOnceLookedAt(FULL_S)
    peer = Peer(spool) if grouped else None
    with Features(stream, spool) as source:
        feed = FollowingLabels(source)
        for i, sample_id in enumerate(ids):
            feed.send(sample_id, "cat" if i % 2 else "dog", i + 0.5)
        store = MemoryPending(ttl_s=1e6, max_pending=20)
        labels = DelayedLabels(feed, spool, store=store, metrics=JoinMetrics(metrics.registry))
        labels.restore(None)
        started = time.monotonic()
        summary, _ = run_stream(
            source, make_learner, metrics, RunOptions(progress=False), RunParts(labels=labels, lockstep=peer)
        )

    assert (summary.labels_joined, summary.learned, summary.pending_expired) == (N, N, 0)
    assert (summary.labels_unmatched, summary.labels_waiting, spool.sent) == (0, 0, [])
    assert source.read_while_full == 0
    assert time.monotonic() - started >= FULL_S
    if peer is not None:
        paused = [turn for turn in peer.turns if turn[0]]
        assert paused and all(polled == 0 and not ended for _, polled, ended in paused)
        assert peer.finished == len(peer.turns) - 1  # every step but the one that ended the group


@pytest.mark.parametrize(
    ("policy", "learned"), [("queue", N), ("subsample", None), ("predict-only", 0)], ids=lambda p: str(p)
)
def test_an_overload_policy_decides_which_joined_samples_are_learned(
    tmp_path: Path, policy: str, learned: int | None
) -> None:
    """Feature records arrive unlabelled, so the policy acts when their labels join: the samples it skips were
    predicted on arrival and end ``overload_skipped``."""
    metrics = Metrics(CollectorRegistry())
    ids = [f"s{i}" for i in range(N)]
    feed = LabelFeed()
    for i, sample_id in enumerate(ids):
        feed.send(sample_id, "cat" if i % 2 else "dog", i + 0.5)
    labels = DelayedLabels(
        feed, Sink(), store=MemoryPending(ttl_s=1e6, max_pending=10 * N), metrics=JoinMetrics(metrics.registry)
    )
    labels.restore(None)
    overload = OverloadPolicy(policy, max_lag=10, lag=lambda: 1000, fraction=0.5, metrics=metrics)  # always behind
    with RecordedSource(_features(tmp_path / "features.rec.gz", ids)) as source:
        summary, _ = run_stream(
            source, make_learner, metrics, RunOptions(progress=False), RunParts(labels=labels, overload=overload)
        )

    assert summary.labels_joined == N and summary.pending == 0
    if learned is None:
        assert 0 < summary.learned < N
    else:
        assert summary.learned == learned
    assert summary.overload_skipped == N - summary.learned
    assert summary.predicted == 0  # a skipped sample is counted once, as overload_skipped
    assert summary.consumed == _accounted(summary) == N
    value = metrics.registry.get_sample_value
    assert value("streamcl_samples_total", {"outcome": "overload_skipped"}) == N - summary.learned
    assert value("streamcl_samples_total", {"outcome": "learned"}) == summary.learned
    assert value("streamcl_overload_records_total", {"policy": policy}) == N
    assert value("streamcl_overloaded") == 1
