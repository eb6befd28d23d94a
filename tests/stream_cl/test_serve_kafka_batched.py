"""``stream-cl serve`` killed with SIGKILL while a checkpoint sits mid-message (wire format 2), then restarted."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from consumers.producer import new_producer
from consumers.wire import encode_batch_binary
from stream_cl.checkpoint import CheckpointStore
from tests.stream_cl.test_serve_kafka import assert_accounted, learned, lines, serve, serve_here
from tests.streams import blob_arrays

PER_MESSAGE = 7  # not a divisor of the batch size (10) nor of the checkpoint cadence (200)
NAN_SAMPLE = 555  # a sample with a NaN: a dead letter of its own, its message's other samples are learned


def produce_batched(bootstrap: str, topic: str, n: int) -> dict[str, tuple[int, int, int]]:
    """``n`` labelled samples in messages of :data:`PER_MESSAGE`, alternating over partitions 0 and 1.

    Returns id → (partition, offset, index in the message) of every good sample.
    """
    x, y = blob_arrays(n_classes=4, per_class=n // 4, seed=0)
    x[NAN_SAMPLE, 0] = np.nan
    producer = new_producer(bootstrap)
    where, futures = {}, []
    for k, first in enumerate(range(0, n, PER_MESSAGE)):
        ids = [f"r{i}" for i in range(first, min(first + PER_MESSAGE, n))]
        labels = [f"c{int(c)}" for c in y[first : first + PER_MESSAGE]]
        value, headers = encode_batch_binary(ids, x[first : first + PER_MESSAGE], labels)
        futures.append((ids, producer.send(topic, value=value, headers=headers, partition=k % 2)))
    producer.flush()
    producer.close()
    for ids, future in futures:
        meta = future.get()
        where.update({sample: (meta.partition, meta.offset, i) for i, sample in enumerate(ids)})
    del where[f"r{NAN_SAMPLE}"]
    return where


def mid_message_checkpoint(directory: Path) -> dict | None:
    found = CheckpointStore(directory).latest() if directory.exists() else None
    return found[1] if found is not None and found[1].get("within") else None


def test_kill_9_with_a_checkpoint_mid_message_then_restart_learns_every_sample_exactly_once(
    kafka_bootstrap: str, make_topic: Callable[..., str], tmp_path: Path
) -> None:
    topic = make_topic(2)
    n = 2800
    where = produce_batched(kafka_bootstrap, topic, n)
    first = serve(kafka_bootstrap, topic, tmp_path, "first")
    deadline = time.monotonic() + 120
    while mid_message_checkpoint(tmp_path / "ckpt") is None or lines(tmp_path / "first.jsonl") < 600:
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint taken mid-message"
        time.sleep(0.05)
    first.kill()  # SIGKILL: no drain, no final checkpoint
    first.wait()
    assert lines(tmp_path / "first.jsonl") < n, "the stream must still be flowing when the service dies"

    _, checkpoint = CheckpointStore(tmp_path / "ckpt").latest()
    resume = {p: o for t, p, o in checkpoint["offsets"]}
    within = {p: k for t, p, k in checkpoint["within"]}
    assert within, "the newest checkpoint must sit mid-message for this test to mean anything"
    serve_here(kafka_bootstrap, topic, tmp_path, "second")

    def covered(sample: str) -> bool:
        partition, offset, index = where[sample]
        start = resume.get(partition, 0)
        return offset < start or (offset == start and index < within.get(partition, 0))

    before = {p["id"] for p in learned(tmp_path / "first.jsonl")} & {s for s in where if covered(s)}
    after = [p["id"] for p in learned(tmp_path / "second.jsonl")]
    assert len(after) == len(set(after)), "a sample was learned twice after the restore"
    assert set(after) == {s for s in where if not covered(s)}  # none skipped, none learned again
    assert before | set(after) == set(where) and not before & set(after)
    summary = json.loads((tmp_path / "second.json").read_text())
    assert summary["learned_total"] == len(where) == checkpoint["learned_total"] + summary["learned"]
    assert_accounted(summary, n)  # every sample once: the NaN one as a dead letter
    assert summary["dead_letter_total"] == 1
