"""The Redis store against real redis-server processes: many writers, restarts, outages, AUTH, TLS."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from buffers.open import open_store, redis_client
from buffers.redis import RedisStore
from buffers.store import BufferStats
from stream_cl.bench.buffer import CountingConnection
from stream_cl.build import build_learner
from stream_cl.group import GroupLearner, KnownClasses
from stream_cl.labels import LabelTree
from tests.fixtures.procs import free_port
from tests.fixtures.redis import RedisServer

ROOT = Path(__file__).resolve().parents[2]


def batch(start: int, n: int = 10, level: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.arange(start, start + n, dtype=torch.int64).view(-1, 1).repeat(1, 4)
    return x, torch.arange(start, start + n) % 3, torch.full((n,), level, dtype=torch.long)


def test_two_processes_keep_one_exact_reservoir(redis_server):
    """Two OS processes insert concurrently: seen counts both streams, retention is uniform over both."""
    repeats, total, capacity = 10, 400, 80
    client = redis_server.client()
    client.delete("ready", "go", *(k for r in range(repeats) for k in client.keys(f"streamcl:buffer:{{shared-{r}}}:*")))
    cmd = [sys.executable, "-m", "tests.buffers.redis_worker", redis_server.url]
    procs = [
        subprocess.Popen([*cmd, str(p), str(repeats), str(total), str(capacity)], cwd=ROOT, stdout=subprocess.PIPE)
        for p in (0, 1)
    ]
    while int(client.get("ready") or 0) < 2:
        assert all(p.poll() is None for p in procs), "a worker died before starting"
        time.sleep(0.01)
    client.set("go", 1)
    interleaved = [int(p.communicate(timeout=120)[0]) for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert min(interleaved) > 0, "the two writers really ran at the same time"

    held = np.zeros((2, total), dtype=np.int64)
    for r in range(repeats):
        store = open_store(f"{redis_server.url}?name=shared-{r}", capacity)
        assert store.refresh()
        assert store.seen == 2 * total and len(store) == min(capacity, store.seen)
        x = store.sample(capacity).x
        held[x[:, 0].numpy(), x[:, 1].numpy()] += 1
    assert held.sum() == repeats * capacity
    p = chisquare(held.reshape(2, 10, -1).sum(axis=2).ravel()).pvalue
    assert p > 1e-3, f"retention is not uniform over both streams (p = {p:.2g})"


def three_classes(order: tuple[int, ...] = (0, 1, 2)) -> LabelTree:
    """Class names that a space-, colon- or JSON-splitting encoding would get wrong, seen in ``order``."""
    names = [("a b", 'c:"d"'), ("naïve 0:1",), ("[x]", "y z")]
    tree = LabelTree()
    tree.encode([names[i] for i in order])
    return tree


def by_slot(store) -> torch.Tensor:
    replay = store.sample(store.capacity)
    return replay.x[replay.slot.argsort()]


def test_contents_survive_a_crash_and_restart_with_aof(redis_aof):
    store = open_store(f"{redis_aof.url}?name=aof", 50, seed=0)
    for start in range(0, 300, 10):
        store.add(*batch(start))
    meta, seen, x, lab, counts = store.keys[:5]
    raw = redis_aof.client()
    before = [raw.hgetall(meta), raw.get(seen), raw.hgetall(x), raw.hgetall(lab), raw.hgetall(counts)]
    class_counts, samples = store.stats(classes=True).class_counts, by_slot(store)
    redis_aof.restart(crash=True)  # kill -9: only what the AOF holds comes back
    raw = redis_aof.client()
    assert [raw.hgetall(meta), raw.get(seen), raw.hgetall(x), raw.hgetall(lab), raw.hgetall(counts)] == before
    assert (
        store.refresh()
        and store.seen == 300
        and len(store) == 50
        and store.stats(classes=True).class_counts == class_counts
    )
    assert torch.equal(by_slot(store), samples)
    store.add(*batch(300))  # the script cache is empty after a restart: reloaded on the fly
    assert store.seen == 310 and store.stats().errors == 0


def test_outage_falls_back_backs_off_and_resumes(redis_aof):
    now = [0.0]
    store = RedisStore(
        redis_client(redis_aof.url), 40, name="outage", fallback_capacity=15, retry_min_s=1, retry_max_s=4,
        clock=lambda: now[0],
    )  # fmt: skip
    store.add(*batch(0, 30))
    redis_aof.kill()
    assert (store.add(*batch(100, 10, level=1)) == -1).all() and store.stats().errors == 1
    assert len(store.fallback) == 10
    replay = store.sample(5)  # inside the back-off: Redis is not tried, the fallback answers
    assert store.stats().errors == 1 and len(replay) == 5 and (replay.level == 1).all()
    now[0] = 1.0
    assert len(store.sample(5)) == 5 and store.stats().errors == 2  # tried and failed: back-off doubles to 2 s
    now[0] = 2.9
    redis_aof.start()
    store.sample(5)
    assert store.stats().errors == 2, "still backing off"
    now[0] = 3.0
    replay = store.sample(30)
    assert store.stats().errors == 2 and len(replay) == 30 and (replay.level == 0).all(), "back on the shared buffer"
    store.add(*batch(200))
    assert store.seen == 40
    assert store.stats().errors == 2, "errors are cumulative: reading them does not reset them"


def test_without_fallback_an_outage_means_no_replay(redis_aof):
    store = RedisStore(redis_client(redis_aof.url), 10, name="nofb", fallback_capacity=0, retry_min_s=0)
    store.add(*batch(0))
    redis_aof.kill()
    assert len(store.sample_then_add(5, *batch(10))) == 0 and store.stats().errors == 1
    assert len(store.sample(5)) == 0 and store.stats().errors == 2
    assert len(store) == 0 and store.stats(classes=True) == BufferStats(0, 0, 0, 3), "no replay: nothing to report"


def test_an_outage_reports_the_fallback_replay_draws_from(redis_aof):
    """Size, bytes and class counts during an outage are the local fallback's, not the shared buffer's last reply."""
    store = RedisStore(redis_client(redis_aof.url), 100, name="stale", fallback_capacity=20, retry_min_s=0)
    store.add(*batch(0, 90))
    shared = {(0, 0): 30, (0, 1): 30, (0, 2): 30}
    assert store.up and len(store) == 90 and store.stats(classes=True) == BufferStats(90, 100, 90 * 40, 0, shared)
    redis_aof.kill()
    for start in (100, 105, 110):
        store.sample_then_add(10, *batch(start, 5, level=1))
    assert not store.up and len(store) == 15
    local = {(1, 0): 5, (1, 1): 5, (1, 2): 5}
    nbytes = store.fallback.stats().nbytes
    assert store.stats(classes=True) == BufferStats(15, 20, nbytes, 4, local), "tried Redis once more: 4 failures"
    redis_aof.start()
    assert store.refresh() and store.up, "back on the shared buffer (AOF kept it)"
    assert len(store) == 90 and store.stats(classes=True) == BufferStats(90, 100, 90 * 40, 4, shared)


@pytest.mark.parametrize("by_path", [False, True], ids=["by-index", "by-path"])
def test_one_round_trip_per_learner_step(redis_server, by_path):
    client = redis_client(redis_server.url)
    client.connection_pool.connection_class = CountingConnection
    store = RedisStore(client, 100, name=f"trips-{by_path}", classes=three_classes() if by_path else None)
    store.clear()
    store.add(*batch(0, 20))  # loads the scripts if the server lacks them
    CountingConnection.round_trips = 0
    for step in range(10):
        replay = store.sample_then_add(8, *batch(100 + 10 * step))
        assert len(replay) == 8
    assert CountingConnection.round_trips == 10


def test_capacity_mismatch_between_learners_is_refused(redis_server):
    first = open_store(f"{redis_server.url}?name=mismatch", 5)
    first.clear()
    first.add(*batch(0))
    with pytest.raises(ValueError, match="capacity 5"):
        open_store(f"{redis_server.url}?name=mismatch", 6).add(*batch(0))


def test_auth_passes_through_the_url(tmp_path):
    server = RedisServer(tmp_path, password="s3cret/+")
    server.start()
    try:
        store = open_store(f"{server.url}?name=auth", 10)
        store.add(*batch(0))
        assert len(store.sample(4)) == 4 and store.stats().errors == 0
    finally:
        server.stop()


def test_open_store_refuses_a_redis_it_cannot_reach(redis_server):
    good = f"redis://app:hunter2@127.0.0.1:{redis_server.port}/0"
    wrong_port = good.replace(str(redis_server.port), str(free_port()))  # nothing listens there
    with pytest.raises(ConnectionError, match=r"^cannot reach the Redis buffer at redis://app:\*\*\*@127") as info:
        open_store(f"{wrong_port}?name=unreachable", 10)
    assert "hunter2" not in str(info.value) and "\n" not in str(info.value)


def test_open_store_refuses_wrong_credentials(tmp_path):
    server = RedisServer(tmp_path, password="s3cret")
    server.start()
    try:
        at = f"127.0.0.1:{server.port}/0"
        for url in (f"redis://:wrong-pw@{at}", f"redis://{at}?password=wrong-pw", f"redis://{at}"):
            with pytest.raises(ConnectionError, match=r"^cannot reach the Redis buffer at redis://") as info:
                open_store(url, 10)
            assert "wrong-pw" not in str(info.value), "the password is masked"
        assert len(open_store(f"{server.url}?name=auth", 10)) == 0, "the right password opens it"
    finally:
        server.stop()


def test_a_bad_scheme_does_not_echo_secrets():
    with pytest.raises(ValueError, match=r"app:\*\*\*@host") as info:
        open_store("redi://app:hunter2@host:1/0?password=p2x&ssl_password=p3x", 3)
    assert "hunter2" not in str(info.value) and "p2x" not in str(info.value) and "p3x" not in str(info.value)


def test_tls_passes_through_the_url(tmp_path):
    server = RedisServer(tmp_path, password="pw", tls=True)
    server.start()
    try:
        store = open_store(f"{server.url}&name=tls", 10)
        store.add(*batch(0))
        assert len(store.sample(4)) == 4 and store.stats().errors == 0
    finally:
        server.stop()


def test_open_store_refuses_unknown_specs():
    with pytest.raises(ValueError, match="memory"):
        open_store("kafka://x", 3)
    with pytest.raises(ValueError, match="class-balanced"):
        open_store("redis://127.0.0.1:1/0", 3, policy="balanced-reservoir")


def test_a_draw_larger_than_luas_stack_limit(redis_server):
    """The script reads drawn slots in chunks: one unpack() of 9000 fields would overflow Lua's C stack."""
    store = open_store(f"{redis_server.url}?name=big-draw", 9000)
    store.clear()
    pos = torch.arange(9000)
    store.add(pos.to(torch.int32).view(-1, 1), pos % 7, torch.zeros(9000, dtype=torch.long))
    replay = store.sample(9000)
    assert sorted(replay.x[:, 0].tolist()) == list(range(9000)) and torch.equal(replay.x[:, 0].long() % 7, replay.y)


def test_a_reader_sees_the_writers_samples(redis_server):
    writer = open_store(f"{redis_server.url}?name=shared-view", 20, seed=1)
    writer.clear()
    for start in range(0, 50, 10):
        writer.add(*batch(start))
    reader = open_store(f"{redis_server.url}?name=shared-view", 20, seed=2)
    replay = reader.sample(5)
    assert len(reader) == 20 and len(replay) == 5 and replay.x.dtype == torch.int64 and replay.x.shape == (5, 4)
    assert torch.equal(replay.x[:, 0] % 3, replay.y)
    counts = reader.stats(classes=True).class_counts
    assert counts == writer.stats(classes=True).class_counts and sum(counts.values()) == 20, "read from Redis"


@pytest.mark.parametrize("policy", ["reservoir", "class-balanced"])
def test_stores_with_their_own_class_numbering_share_classes_by_name(redis_server, policy):
    """Each store reads every sample under its own learner's index of the sample's class path."""
    trees = three_classes((0, 1, 2)), three_classes((2, 0, 1))
    url = f"{redis_server.url}?name=by-path-{policy}"
    stores = [
        open_store(url, 30, seed=seed, policy=policy, classes=tree) for seed, tree in zip((1, 2), trees, strict=True)
    ]
    stores[0].clear()
    paths = [trees[0].path(*trees[0].lookup(path)) for path in (("a b", 'c:"d"'), ("naïve 0:1",), ("[x]", "y z"))]
    for start in range(0, 60, 10):  # x[:, 0] names the class: position % 3 indexes paths
        store, tree = stores[start // 10 % 2], trees[start // 10 % 2]
        pos = torch.arange(start, start + 10)
        level, y, _ = tree.encode([paths[i] for i in (pos % 3).tolist()])
        store.add(pos.view(-1, 1), torch.from_numpy(y), torch.from_numpy(level))
    for store, tree in zip(stores, trees, strict=True):
        replay = store.sample(30)
        assert len(replay) == 30
        want = [tree.lookup(paths[i]) for i in (replay.x[:, 0] % 3).tolist()]
        assert list(zip(replay.level.tolist(), replay.y.tolist(), strict=True)) == want
        counts = store.stats(classes=True).class_counts
        assert set(counts) == {tree.lookup(path) for path in paths} and sum(counts.values()) == 30


def test_a_group_worker_draws_only_the_classes_its_group_added(redis_server):
    """A class in the shared buffer that the group has not added is left out of the draw, not added to
    one worker's tree; once the group adds it, draws include it again (the miss was not cached)."""
    url = f"{redis_server.url}?name=group-known"
    everything, group_tree = three_classes(), LabelTree()
    writer = open_store(url, 30, seed=1, classes=everything)
    writer.clear()
    paths = [everything.path(*everything.lookup(p)) for p in (("a b", 'c:"d"'), ("naïve 0:1",), ("[x]", "y z"))]
    pos = torch.arange(30)
    level, y, _ = everything.encode([paths[i] for i in (pos % 3).tolist()])
    writer.add(pos.view(-1, 1), torch.from_numpy(y), torch.from_numpy(level))
    group_tree.encode([paths[1]])
    worker = open_store(url, 30, seed=2, classes=KnownClasses(group_tree))
    replay = worker.sample(30)
    assert len(replay) == 10 and (replay.x[:, 0] % 3 == 1).all() and (replay.level == 0).all()
    assert group_tree.sizes == [1] and len(replay.slot) == len(replay.y) == 10
    group_tree.encode([paths[0]])  # the group adds a class: its samples are drawn from now on
    replay = worker.sample(30)
    assert sorted(set((replay.x[:, 0] % 3).tolist())) == [0, 1] and len(replay) == 20
    assert group_tree.sizes == [2, 1]


def test_a_group_learner_reads_its_shared_buffer_through_the_groups_classes(redis_server):
    learner = build_learner(
        "er", "mlp", (4,), np.dtype(np.float32), device=torch.device("cpu"), buffer_spec=f"{redis_server.url}?name=gl"
    )
    grouped = GroupLearner(learner, SimpleNamespace(sync="average"), (4,), np.dtype(np.float32))
    assert isinstance(grouped.inner.buffer.classes, KnownClasses)


def test_a_store_leaves_out_labels_of_the_other_kind_and_says_why(redis_server, caplog):
    """A buffer shared by stores that label differently is a deployment mistake: said in the log and counted,
    not raised to every learner whose draw meets such a sample (the buffer outlives restarts)."""
    by_path = open_store(f"{redis_server.url}?name=kinds", 10)
    by_path.clear()
    by_path.classes = three_classes()
    by_path.add(*batch(0, 3))
    by_index = open_store(f"{redis_server.url}?name=kinds", 10)
    with caplog.at_level(logging.WARNING, logger="buffers.redis"):
        assert len(by_index.sample(3)) == 0
    assert 'reads labels as "level:y": every learner sharing a buffer must store labels the same way' in caplog.text
    assert by_index.stats() == BufferStats(3, 10, by_index.stats().nbytes, errors=0, corrupt=3)
