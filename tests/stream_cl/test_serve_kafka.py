"""``stream-cl serve`` against a real broker (tansu) and redis-server, run as a subprocess so it can be killed.

Which records a run learned is read from its predictions file (``--predictions-for all``: one line per
learned or predicted record, written unbuffered before the batch is committed).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition

from consumers.kafka import KafkaSource
from consumers.producer import new_producer
from consumers.wire import encode_binary
from stream_cl import run
from stream_cl.checkpoint import CheckpointStore
from stream_cl.cli import main
from tests.fixtures.procs import free_port
from tests.fixtures.redis import RedisServer
from tests.streams import blob_arrays

BAD = 12
"""Undecodable messages mixed into each produced stream (dead letters: committed past, never learned)."""


def produce(bootstrap: str, topic: str, n: int, *, start: int = 0, unlabelled: int = 0) -> dict[str, tuple[int, int]]:
    """``n`` labelled float records (8 features, 4 classes), ``unlabelled`` ones, and :data:`BAD` bad ones.

    Returns id → (partition, offset) of the labelled records.
    """
    x, y = blob_arrays(n_classes=4, per_class=n // 4, seed=start)
    producer = new_producer(bootstrap)
    futures = {}
    for i, (xi, yi) in enumerate(zip(x, y, strict=True)):
        sample_id = f"r{start + i}"
        value, headers = encode_binary(sample_id, xi, f"c{int(yi)}")
        futures[sample_id] = producer.send(topic, key=sample_id.encode(), value=value, headers=headers)
    for j in range(unlabelled):
        value, headers = encode_binary(f"u{start + j}", x[j], None)
        producer.send(topic, key=f"u{start + j}".encode(), value=value, headers=headers)
    for j in range(BAD):
        producer.send(topic, key=f"bad{start + j}".encode(), value=b"\xff not a record")
    producer.flush()
    producer.close()
    return {k: (f.get().partition, f.get().offset) for k, f in futures.items()}


def serve_args(bootstrap: str, topic: str, tmp: Path, name: str, *args: str | int | Path) -> list[str]:
    cmd = [
        "serve",
        "--source",
        f"kafka://{bootstrap}/{topic}",
        "--group",
        f"g-{topic}",
    ]  # a group per test: no stale members or offsets from another test
    cmd += ["--kafka-session-timeout-ms", "2000", "--kafka-heartbeat-interval-ms", "500", "--no-progress"]
    cmd += ["--no-drift", "--model", "mlp", "--width", "16", "--probe-fraction", "0", "--buffer-size", "100"]
    cmd += ["--metrics-port", "0"]  # tests that probe it pass their own free port (a later flag wins)
    cmd += ["--checkpoint-dir", tmp / "ckpt", "--checkpoint-every-records", "200"]
    cmd += ["--predictions", tmp / f"{name}.jsonl", "--predictions-for", "all", "--summary-json", tmp / f"{name}.json"]
    return [*map(str, cmd), *map(str, args)]


def serve(bootstrap: str, topic: str, tmp: Path, name: str, *args: str | int | Path) -> subprocess.Popen:
    """``stream-cl serve`` as a subprocess, to be killed or signalled."""
    cmd = [sys.executable, "-m", "stream_cl", *serve_args(bootstrap, topic, tmp, name, *args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STREAMCL_TEST_THREADS": "1"}
    with (tmp / f"{name}.log").open("wb") as log:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def serve_here(bootstrap: str, topic: str, tmp: Path, name: str, *args: str | int | Path) -> None:
    """``stream-cl serve`` in this process (saves a Python + torch start-up) for runs that end by themselves."""
    assert main(serve_args(bootstrap, topic, tmp, name, "--until-idle", 6, *args)) == 0


def lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def wait_until(check: Callable[[], bool], proc: subprocess.Popen, log: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert proc.poll() is None, f"serve exited early ({proc.returncode}):\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out:\n{log.read_text()[-3000:]}"
        time.sleep(0.02)


def finish(proc: subprocess.Popen, log: Path, timeout_s: float = 120) -> None:
    assert proc.wait(timeout_s) == 0, log.read_text()[-3000:]


def learned(path: Path) -> list[dict]:
    return [p for p in map(json.loads, path.read_text().splitlines()) if p["learned"]]


def test_kill_9_mid_stream_then_restart_learns_every_record_exactly_once(
    kafka_bootstrap: str, make_topic: Callable[..., str], tmp_path: Path
) -> None:
    topic = make_topic(4)
    where = produce(kafka_bootstrap, topic, 3000)
    first = serve(kafka_bootstrap, topic, tmp_path, "first")
    # a checkpoint is written on a thread of its own: on a loaded machine it may lag the predictions
    written = lambda: CheckpointStore(tmp_path / "ckpt").latest() is not None  # noqa: E731
    wait_until(lambda: lines(tmp_path / "first.jsonl") >= 700 and written(), first, tmp_path / "first.log")
    first.kill()  # SIGKILL: no drain, no final checkpoint; the group has committed past the last checkpoint
    first.wait()
    assert lines(tmp_path / "first.jsonl") < 3000, "the stream must still be flowing when the service dies"

    _, checkpoint = CheckpointStore(tmp_path / "ckpt").latest()
    resume = {(t, p): o for t, p, o in checkpoint["offsets"]}
    serve_here(kafka_bootstrap, topic, tmp_path, "second")

    before = {
        p["id"] for p in learned(tmp_path / "first.jsonl") if p["offset"] < resume.get((topic, p["partition"]), 0)
    }
    after = [p["id"] for p in learned(tmp_path / "second.jsonl")]
    assert len(after) == len(set(after)), "a record was learned twice after the restore"
    assert set(after) == {k for k, (p, o) in where.items() if o >= resume.get((topic, p), 0)}
    assert before | set(after) == set(where) and not before & set(after)
    summary = json.loads((tmp_path / "second.json").read_text())
    assert summary["learned_total"] == len(where) == checkpoint["learned_total"] + summary["learned"]
    assert_accounted(summary, len(where) + BAD)


def assert_accounted(summary: dict, records: int) -> None:
    """Every record of the topic was consumed once over the model's history, with exactly one outcome."""
    outcomes = ("learned_total", "held_out_total", "predict_only_total", "overload_skipped_total", "dead_letter_total")
    assert summary["consumed_total"] == records == sum(summary[k] for k in outcomes), summary


def test_a_restart_waiting_for_the_dead_members_partitions_does_not_stop_as_idle(
    kafka_bootstrap: str, make_topic: Callable[..., str], tmp_path: Path
) -> None:
    """After kill -9 the group hands the dead member's partitions over only once its session expires (here 8 s),
    longer than --until-idle: the idle clock starts at the first assignment, so the restart still learns."""
    topic = make_topic(2)
    where = produce(kafka_bootstrap, topic, 2000)
    slow = ("--kafka-session-timeout-ms", 8000, "--kafka-heartbeat-interval-ms", 1000)
    first = serve(kafka_bootstrap, topic, tmp_path, "first", *slow)
    wait_until(lambda: lines(tmp_path / "first.jsonl") >= 300, first, tmp_path / "first.log")
    first.kill()
    first.wait()
    assert main(serve_args(kafka_bootstrap, topic, tmp_path, "second", *slow, "--until-idle", 3)) == 0
    summary = json.loads((tmp_path / "second.json").read_text())
    assert summary["learned"] > 0 and summary["learned_total"] == len(where)
    assert_accounted(summary, len(where) + BAD)


def test_a_restart_the_group_never_gives_a_partition_ends_with_code_4_though_the_model_has_a_history(
    kafka_bootstrap: str, make_topic: Callable[..., str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    """A group that never assigns the service a partition (a stale member it keeps as leader, more members than
    partitions) learns nothing: --until-idle ends it with exit code 4, not 0, even though the model learned before."""
    topic = make_topic(1)
    where = produce(kafka_bootstrap, topic, 100)
    serve_here(kafka_bootstrap, topic, tmp_path, "first")
    monkeypatch.setattr(run, "ASSIGNMENT_GRACE_S", 2.0)  # 60 s in service
    monkeypatch.setattr(KafkaSource, "_assign", lambda self, partitions: None)  # the group's answer never comes
    with caplog.at_level(logging.WARNING, logger="stream_cl"):
        assert main(serve_args(kafka_bootstrap, topic, tmp_path, "second", "--until-idle", 1)) == 4
    summary = json.loads((tmp_path / "second.json").read_text())
    assert summary["never_assigned"] and summary["learned"] == 0 and summary["learned_total"] == len(where)
    assert "never assigned this service a partition" in caplog.text


def test_sigterm_drains_within_the_bound_and_the_next_start_resumes_at_the_committed_offsets(
    kafka_bootstrap: str, make_topic: Callable[..., str], tmp_path: Path
) -> None:
    topic = make_topic(4)
    where = produce(kafka_bootstrap, topic, 3000)
    port = free_port()
    first = serve(kafka_bootstrap, topic, tmp_path, "first", "--drain-timeout", 20, "--metrics-port", port)
    wait_until(lambda: lines(tmp_path / "first.jsonl") >= 500, first, tmp_path / "first.log")
    base = f"http://127.0.0.1:{port}"
    assert urllib.request.urlopen(f"{base}/healthz").status == 200
    assert urllib.request.urlopen(f"{base}/readyz").status == 200  # model loaded, partitions assigned
    assert b"streamcl_predictions_total" in urllib.request.urlopen(f"{base}/metrics").read()

    started = time.monotonic()
    first.send_signal(signal.SIGTERM)
    finish(first, tmp_path / "first.log", timeout_s=30)
    assert time.monotonic() - started < 20
    assert lines(tmp_path / "first.jsonl") < 3000

    _, checkpoint = CheckpointStore(tmp_path / "ckpt").latest()
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    committed = {
        (tp.topic, tp.partition): om.offset for tp, om in admin.list_group_offsets(f"g-{topic}")[f"g-{topic}"].items()
    }
    admin.close()
    assert {(t, p): o for t, p, o in checkpoint["offsets"]} == committed  # the drain checkpointed what it committed

    serve_here(kafka_bootstrap, topic, tmp_path, "second")
    one, two = learned(tmp_path / "first.jsonl"), learned(tmp_path / "second.jsonl")
    for partition in range(4):
        offsets = [p["offset"] for p in two if p["partition"] == partition]
        assert not offsets or min(offsets) >= committed.get((topic, partition), 0)
    ids_one, ids_two = {p["id"] for p in one}, [p["id"] for p in two]
    assert len(ids_two) == len(set(ids_two)) and not ids_one & set(ids_two)
    assert ids_one | set(ids_two) == set(where)
    assert json.loads((tmp_path / "second.json").read_text())["learned_total"] == len(where)


def test_redis_restart_during_the_run_keeps_the_service_running_and_replay_resumes(
    kafka_bootstrap: str, make_topic: Callable[..., str], tmp_path: Path
) -> None:
    server = RedisServer(tmp_path / "redis-data")
    (tmp_path / "redis-data").mkdir()
    server.start()
    try:
        topic = make_topic(4)
        where = produce(kafka_bootstrap, topic, 1000)
        proc = serve(kafka_bootstrap, topic, tmp_path, "run", "--buffer", server.url)
        wait_until(lambda: lines(tmp_path / "run.jsonl") >= 1000, proc, tmp_path / "run.log")
        assert server.client().dbsize() > 0
        server.restart(crash=True)  # kill -9, no AOF: the buffer is gone
        assert server.client().dbsize() == 0
        where |= produce(kafka_bootstrap, topic, 1000, start=1000)
        wait_until(lambda: lines(tmp_path / "run.jsonl") >= 2000, proc, tmp_path / "run.log")
        wait_until(lambda: server.client().dbsize() > 0, proc, tmp_path / "run.log", timeout_s=30)
        proc.send_signal(signal.SIGTERM)
        finish(proc, tmp_path / "run.log")
    finally:
        server.kill()
    assert {p["id"] for p in learned(tmp_path / "run.jsonl")} == set(where)
    assert json.loads((tmp_path / "run.json").read_text())["learned_total"] == len(where)


def test_crash_before_the_first_checkpoint_relearns_from_the_start_not_from_the_group_offsets(
    kafka_bootstrap: str, make_topic: Callable[..., str], tmp_path: Path
) -> None:
    topic = make_topic(4)
    where = produce(kafka_bootstrap, topic, 1000)
    never = ("--checkpoint-every-records", 10**6, "--checkpoint-every-seconds", 3600)
    first = serve(kafka_bootstrap, topic, tmp_path, "first", *never)
    wait_until(lambda: lines(tmp_path / "first.jsonl") >= 300, first, tmp_path / "first.log")
    first.kill()
    first.wait()
    assert CheckpointStore(tmp_path / "ckpt").latest() is None  # the group has committed offsets; the model is gone
    serve_here(kafka_bootstrap, topic, tmp_path, "second", *never)
    after = [p["id"] for p in learned(tmp_path / "second.jsonl")]
    assert sorted(after) == sorted(where)
    assert json.loads((tmp_path / "second.json").read_text())["learned_total"] == len(where)


def test_predict_only_overload_policy_predicts_what_it_does_not_learn(
    kafka_bootstrap: str, make_topic: Callable[..., str], tmp_path: Path
) -> None:
    topic = make_topic(4)
    where = produce(kafka_bootstrap, topic, 3000)
    serve_here(kafka_bootstrap, topic, tmp_path, "run", "--overload-policy", "predict-only", "--max-lag", 100)
    out = [json.loads(line) for line in (tmp_path / "run.jsonl").read_text().splitlines()]
    summary = json.loads((tmp_path / "run.json").read_text())
    skipped = [p for p in out if not p["learned"]]
    assert {p["id"] for p in out} == set(where) and len(out) == len(where)
    assert 0 < len(skipped) == summary["overload_skipped"] and summary["predicted"] == 0  # none is unlabelled
    assert summary["learned"] + summary["overload_skipped"] == len(where)


def test_predictions_of_unlabelled_records_go_to_a_kafka_topic(
    kafka_bootstrap: str, make_topic: Callable[..., str], tmp_path: Path
) -> None:
    topic, out = make_topic(4), make_topic(1)
    produce(kafka_bootstrap, topic, 400, unlabelled=40)
    url = f"kafka://{kafka_bootstrap}/{out}"
    serve_here(kafka_bootstrap, topic, tmp_path, "run", "--predictions", url, "--predictions-for", "unlabelled")
    consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=3000)
    consumer.assign([TopicPartition(out, 0)])
    published = [json.loads(m.value) for m in consumer]
    consumer.close()
    assert sorted(p["id"] for p in published) == sorted(f"u{j}" for j in range(40))
    assert all(not p["learned"] and len(p["predicted"]) == len(p["confidence"]) == 1 for p in published)
    assert all(p["predicted"][0] in {"c0", "c1", "c2", "c3"} and 0 < p["confidence"][0] <= 1 for p in published)
    assert json.loads((tmp_path / "run.json").read_text())["predicted"] == 40
