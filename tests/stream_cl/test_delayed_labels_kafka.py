"""Delayed labels against a real broker (tansu): features and labels on separate topics, joined by id.

Label messages carry event timestamps, so which labels join and which samples expire is exact whatever
order the service happens to read the two topics in.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition

from consumers.label_wire import encode_label
from consumers.producer import new_producer
from consumers.wire import encode_binary
from stream_cl.checkpoint import CheckpointStore
from stream_cl.cli import main
from stream_cl.commands.checkpoint import describe
from tests.fixtures.procs import free_port
from tests.fixtures.redis import RedisServer
from tests.stream_cl.test_serve_kafka import finish, lines, serve, wait_until
from tests.streams import blob_arrays

T0_MS = 1_700_000_000_000
TTL_S = 30


def produce_features(bootstrap: str, topic: str, ids: range, x: np.ndarray) -> None:
    """Unlabelled feature records ``f{i}`` at event time T0 + i seconds."""
    producer = new_producer(bootstrap)
    for i in ids:
        value, headers = encode_binary(f"f{i}", x[i], None)
        producer.send(topic, key=f"f{i}".encode(), value=value, headers=headers, timestamp_ms=T0_MS + i * 1000)
    producer.flush()
    producer.close()


def produce_labels(bootstrap: str, topic: str, labels: list[tuple[float, bytes]]) -> None:
    """Label messages ``(event time in seconds after T0, value)``, in event-time order as a label feed sends them."""
    producer = new_producer(bootstrap)
    for at_s, value in sorted(labels, key=lambda label: label[0]):
        producer.send(topic, value=value, timestamp_ms=T0_MS + int(at_s * 1000))
    producer.flush()
    producer.close()


def committed(bootstrap: str, group: str, topic: str) -> int:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        offsets = admin.list_group_offsets(group).get(group, {})
    finally:
        admin.close()
    return sum(meta.offset for tp, meta in offsets.items() if tp.topic == topic and meta.offset > 0)


def read_topic(bootstrap: str, topic: str) -> list:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=3000)
    consumer.assign([TopicPartition(topic, 0)])
    messages = list(consumer)
    consumer.close()
    return messages


def test_late_early_missing_and_unknown_labels_join_with_exact_counts(
    kafka_bootstrap: str, make_topic: Callable[..., str], tmp_path: Path
) -> None:
    features, labels = make_topic(1), make_topic(1)
    x, y = blob_arrays(n_classes=4, per_class=25, seed=3)
    order = np.random.default_rng(3).permutation(100)  # classes interleaved, not one after another
    x, y = x[order], y[order]
    delay = np.random.default_rng(4).integers(1, 21, size=100)  # 1-20 s after the sample: out of id order
    never = set(range(40, 45)) | set(range(90, 100))
    sent = [(i + delay[i], encode_label(f"f{i}", f"c{y[i]}")) for i in range(100) if i not in never]
    ghosts = [(10 + j, encode_label(f"ghost{j}", "c0")) for j in range(5)]  # ids no feature record has
    again = [(25, encode_label("f0", "c1"))]  # f0's second label: f0 has joined already
    tail = [(1000, encode_label("tail", "c0"))]  # a late label: the label feed has moved past every sample
    produce_labels(kafka_bootstrap, labels, [*sent, *ghosts, *again, (5, b"not json"), *tail])
    produce_features(kafka_bootstrap, features, range(50), x)

    args = ["--labels", f"kafka://{kafka_bootstrap}/{labels}", "--label-ttl-seconds", TTL_S]
    args += ["--until-idle", 6, "--checkpoint-every-records", 50, "--predictions-for", "unlabelled"]
    service = serve(kafka_bootstrap, features, tmp_path, "run", *args)
    read = lambda: committed(kafka_bootstrap, f"g-{features}-labels", labels) == len(sent) + 8  # noqa: E731
    wait_until(read, service, tmp_path / "run.log")  # every label read, f50-f89's waiting for their features
    produce_features(kafka_bootstrap, features, range(50, 100), x)
    finish(service, tmp_path / "run.log")

    summary = json.loads((tmp_path / "run.json").read_text())
    joined = 100 - len(never)
    assert summary["consumed"] == 100 and lines(tmp_path / "run.jsonl") == 100  # a prediction per feature record
    assert (summary["labels_joined"], summary["learned"]) == (joined, joined)
    assert (summary["pending_expired"], summary["predicted"], summary["pending"]) == (len(never), len(never), 0)
    assert (summary["labels_consumed"], summary["labels_unmatched"], summary["labels_waiting"]) == (joined + 8, 7, 1)
    expected = np.percentile([delay[i] for i in range(100) if i not in never], [50, 95])
    assert np.allclose([summary["label_delay_seconds"]["p50"], summary["label_delay_seconds"]["p95"]], expected)
    assert 0 < summary["online_accuracy"] <= 1

    dead = read_topic(kafka_bootstrap, labels + ".dlq")
    reasons = sorted(dict(m.headers)["reason"].decode() for m in dead)
    assert reasons == ["bad_json"] + ["label_unmatched"] * 6
    unmatched_ids = sorted(json.loads(m.value)["id"] for m in dead if dict(m.headers)["reason"] == b"label_unmatched")
    assert unmatched_ids == ["f0"] + [f"ghost{j}" for j in range(5)]


@pytest.mark.parametrize("pending", ["memory", "redis"])
def test_kill_9_mid_join_then_restart_joins_every_label_exactly_once(
    kafka_bootstrap: str, make_topic: Callable[..., str], tmp_path: Path, pending: str, request: pytest.FixtureRequest
) -> None:
    """With either pending store: the memory one travels in the checkpoint, the Redis one is rolled back to it."""
    features, labels = make_topic(1), make_topic(1)
    n = 4000  # long enough that the service is still learning when a loaded machine's watcher sees a checkpoint
    x, y = blob_arrays(n_classes=4, per_class=n // 4, seed=5)
    delay = np.random.default_rng(6).uniform(0, 50, size=n)
    labelled = [i for i in range(n) if i % 20 != 7]
    produce_features(kafka_bootstrap, features, range(n), x)
    produce_labels(
        kafka_bootstrap,
        labels,
        [(i + delay[i], encode_label(f"f{i}", f"c{y[i]}")) for i in labelled]
        + [(n + 1000, encode_label("tail", "c0"))],
    )
    extra = ["--labels", f"kafka://{kafka_bootstrap}/{labels}", "--label-ttl-seconds", "100"]
    extra += ["--checkpoint-every-records", "100", "--predictions-for", "unlabelled"]
    if pending == "redis":
        extra += ["--pending", request.getfixturevalue("redis_server").url]
    first = serve(kafka_bootstrap, features, tmp_path, "first", *extra)

    def joining_and_checkpointed() -> bool:
        """Both consumers have learned past a checkpoint (a labels consumer can join its group late)."""
        if lines(tmp_path / "first.jsonl") < 600:
            return False
        latest = CheckpointStore(tmp_path / "ckpt").latest()
        return latest is not None and {t for t, _, _ in latest[1]["offsets"]} == {features, labels}

    try:
        wait_until(joining_and_checkpointed, first, tmp_path / "first.log")
    finally:
        first.kill()  # SIGKILL: no drain; both groups have committed past the last checkpoint
        first.wait()
    assert lines(tmp_path / "first.jsonl") < n, "the stream must still be flowing when the service dies"
    _, checkpoint = CheckpointStore(tmp_path / "ckpt").latest()
    shown = describe(checkpoint, Path("ckpt"))["pending"]
    assert shown["samples"] + shown["labels"] > 0, "the kill must fall mid-join"
    assert (checkpoint["pending"].get("store") == "redis") == (pending == "redis")

    second = serve(kafka_bootstrap, features, tmp_path, "second", *extra, "--until-idle", 6)
    finish(second, tmp_path / "second.log")
    summary = json.loads((tmp_path / "second.json").read_text())
    assert summary["labels_joined_total"] == summary["learned_total"] == len(labelled)
    assert summary["pending_expired_total"] == summary["predict_only_total"] == n - len(labelled)
    assert summary["labels_consumed_total"] == len(labelled) + 1 and summary["labels_unmatched_total"] == 0
    assert (summary["pending"], summary["labels_waiting"]) == (0, 1)
    assert summary["consumed_total"] == n == summary["learned_total"] + summary["predict_only_total"]


def test_without_checkpoints_the_redis_pending_store_keeps_the_samples_for_the_next_run(
    kafka_bootstrap: str, make_topic: Callable[..., str], tmp_path: Path, redis_server: RedisServer
) -> None:
    features, labels = make_topic(1), make_topic(1)
    x, y = blob_arrays(n_classes=2, per_class=25, seed=7)
    produce_features(kafka_bootstrap, features, range(40), x)
    args = ["run", "--source", f"kafka://{kafka_bootstrap}/{features}", "--group", f"g-{features}", "--no-progress"]
    args += ["--model", "mlp", "--width", "8", "--probe-fraction", "0", "--no-drift", "--until-idle", "4"]
    args += ["--metrics-port", "0"]
    args += ["--labels", f"kafka://{kafka_bootstrap}/{labels}", "--pending", redis_server.url]
    assert main([*args, "--summary-json", str(tmp_path / "first.json")]) == 0  # no labels yet: all 40 wait
    first = json.loads((tmp_path / "first.json").read_text())
    assert (first["consumed"], first["pending"], first["learned"]) == (40, 40, 0)

    produce_features(kafka_bootstrap, features, range(40, 50), x)
    produce_labels(kafka_bootstrap, labels, [(i + 1, encode_label(f"f{i}", f"c{y[i]}")) for i in range(50)])
    assert main([*args, "--summary-json", str(tmp_path / "second.json")]) == 0  # a new process, no checkpoint
    second = json.loads((tmp_path / "second.json").read_text())
    assert (second["consumed"], second["labels_joined"], second["learned"]) == (10, 50, 50)
    assert (second["pending"], second["labels_waiting"], second["labels_unmatched"]) == (0, 0, 0)


def readyz(port: int) -> int:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5).status
    except urllib.error.HTTPError as error:
        return error.code


def test_a_redis_outage_pauses_consuming_reports_unready_and_loses_nothing(
    kafka_bootstrap: str, make_topic: Callable[..., str], tmp_path: Path, redis_aof: RedisServer
) -> None:
    features, labels = make_topic(1), make_topic(1)
    n = 400
    x, y = blob_arrays(n_classes=2, per_class=n // 2, seed=8)
    produce_features(kafka_bootstrap, features, range(n // 2), x)
    produce_labels(kafka_bootstrap, labels, [(i + 0.5, encode_label(f"f{i}", f"c{y[i]}")) for i in range(n)])
    port = free_port()
    extra = ["--labels", f"kafka://{kafka_bootstrap}/{labels}", "--pending", redis_aof.url, "--metrics-port", port]
    service = serve(kafka_bootstrap, features, tmp_path, "run", *extra, "--until-idle", 6)
    log = tmp_path / "run.log"
    wait_until(lambda: lines(tmp_path / "run.jsonl") >= n // 2 and readyz(port) == 200, service, log)

    redis_aof.kill()
    produce_features(kafka_bootstrap, features, range(n // 2, n), x)  # their labels wait in the dead Redis
    wait_until(lambda: readyz(port) == 503, service, log)
    time.sleep(1)
    stalled = lines(tmp_path / "run.jsonl")
    assert stalled <= n // 2 + 10  # one batch predicted, then nothing consumed until Redis is back
    redis_aof.start()
    wait_until(lambda: readyz(port) == 200, service, log)
    finish(service, log)

    summary = json.loads((tmp_path / "run.json").read_text())
    assert (summary["consumed"], summary["labels_consumed"], summary["labels_joined"], summary["learned"]) == (n,) * 4
    assert (summary["pending"], summary["labels_waiting"], summary["labels_unmatched"]) == (0, 0, 0)
