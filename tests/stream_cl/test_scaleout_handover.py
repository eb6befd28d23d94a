"""Workers of one run resuming from one checkpoint: a rebalance that hands a partition to a worker that never owned
it must not rewind it to the checkpoint's offset (the run's offsets, shared in the launcher's store, say where the
run got to). Against the real broker (tansu) and a real ``torch.distributed`` store."""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from consumers.kafka import KafkaSource
from consumers.producer import produce_messages
from consumers.record import Poll
from consumers.source import next_offsets
from stream_cl import assemble
from stream_cl.config import load
from stream_cl.scaleout import StoreRunOffsets, run_worker
from tests.consumers.streams import good_messages
from tests.consumers.test_kafka import STABLE_GROUP, _wait
from tests.fixtures.procs import free_port
from tests.stream_cl.test_scaleout import learned_ids, worker_settings
from tests.stream_cl.test_serve_kafka import produce

CHECKPOINT_OFFSET = 5
"""Every partition's next offset in the checkpoint both workers resume from."""


def _learn(source: KafkaSource, seen: list[tuple[int, int]], stop: threading.Event) -> None:
    """A stand-in learner: take a batch, 'learn' it (note each record's partition and offset), commit it."""
    while not stop.is_set():
        poll: Poll = source.poll(0.1, 5)
        if len(poll):
            stop.wait(0.02)
            seen.extend((r.position.partition, r.position.offset) for r in poll.records)
            source.commit(next_offsets(poll.positions()))


def test_a_partition_handed_to_a_worker_that_never_owned_it_goes_on_where_the_run_committed(
    kafka_bootstrap: str, make_topic: Callable[..., str]
) -> None:
    topic = make_topic(4)
    messages = good_messages(400)
    produce_messages(kafka_bootstrap, topic, messages[:200])
    checkpoint = {(topic, p): CHECKPOINT_OFFSET for p in range(4)}
    store = dist.TCPStore("127.0.0.1", free_port(), world_size=1, is_master=True, wait_for_workers=False)
    run_offsets = StoreRunOffsets(store)

    def worker() -> KafkaSource:
        group = f"handover-{topic}"
        return KafkaSource(
            kafka_bootstrap,
            topic,
            group,
            start_offsets=checkpoint,
            from_checkpoint=True,
            run_offsets=run_offsets,
            **STABLE_GROUP,
        )

    seen_a: list[tuple[int, int]] = []
    seen_b: list[tuple[int, int]] = []
    stop_a, stop_b = threading.Event(), threading.Event()
    with worker() as a:
        thread_a = threading.Thread(target=_learn, args=(a, seen_a, stop_a))
        thread_a.start()
        # A alone owns all four partitions and learns what the checkpoint lacks before B joins
        _wait(lambda: len(seen_a) == 200 - 4 * CHECKPOINT_OFFSET)
        with worker() as b:
            thread_b = threading.Thread(target=_learn, args=(b, seen_b, stop_b))
            thread_b.start()
            _wait(lambda: b.assignment() and not a.assignment() & b.assignment())
            produce_messages(kafka_bootstrap, topic, messages[200:])
            _wait(lambda: len(set(seen_a) | set(seen_b)) == 400 - 4 * CHECKPOINT_OFFSET)
            stop_b.set()
            thread_b.join()
            moved = {p for _, p in b.assignment()}
        stop_a.set()
        thread_a.join()
    assert seen_b and {p for p, _ in seen_b} <= moved  # B took over partitions A had learned from
    both = Counter(seen_a) + Counter(seen_b)
    assert min(offset for _, offset in both) == CHECKPOINT_OFFSET  # nothing the checkpoint holds was learned again
    assert max(both.values()) == 1, sorted(k for k, n in both.items() if n > 1)  # nor anything A had learned


def _late_worker(rank: int, port: int, settings: dict, tmp: Path) -> None:
    """Worker ``rank`` of two, as the launcher starts it; worker 1 opens its Kafka source 3 s late, so worker 0
    owns and learns from every partition before a rebalance hands half of them to worker 1."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    if rank == 1:
        open_source = assemble.open_source

        def late(*args, **kwargs):
            time.sleep(3.0)
            return open_source(*args, **kwargs)

        assemble.open_source = late
    summary, _ = run_worker(load(settings, {}))
    (tmp / f"late-{rank}.json").write_text(json.dumps(asdict(summary)))


def test_a_worker_joining_late_takes_partitions_over_where_the_group_left_them(
    kafka_bootstrap: str, make_topic: Callable[..., str], tmp_path: Path
) -> None:
    """``serve --workers 2`` with a checkpoint directory: each worker starts a partition it gets first at the
    checkpoint's offset (here none yet: the earliest), unless a worker of the same run has committed it."""
    topic = make_topic(4)
    where = produce(kafka_bootstrap, topic, 40)
    settings = worker_settings(kafka_bootstrap, topic, tmp_path, "late")
    mp.spawn(_late_worker, args=(free_port(), settings, tmp_path), nprocs=2, join=True)
    summary = json.loads((tmp_path / "late-0.json").read_text())
    ids = Counter(learned_ids(tmp_path, "late", 2))
    assert max(ids.values()) == 1, sorted(k for k, n in ids.items() if n > 1)  # nothing learned twice ...
    assert set(ids) == set(where) and summary["learned_total"] == len(where)  # ... or skipped
    mine = [w["learned"] for w in summary["workers"]]
    assert mine[0] > 0, summary["workers"]  # worker 0 learned before the handover


def test_the_run_offsets_only_go_forward() -> None:
    """A worker evicted mid-step may commit after the partition's next owner got further: its older offset must
    not rewind the run's."""
    store = dist.TCPStore("127.0.0.1", free_port(), world_size=1, is_master=True, wait_for_workers=False)
    run_offsets = StoreRunOffsets(store)
    key = ("t", 0)
    assert run_offsets.get(key) is None
    run_offsets.put(key, 200, 0)  # the next owner
    run_offsets.put(key, 150, 3)  # the evicted one, late
    assert run_offsets.get(key) == (200, 0)
    run_offsets.put(key, 200, 2)
    assert run_offsets.get(key) == (200, 2)
