"""``stream-cl serve --workers N`` against the real broker (tansu) and redis-server: one model, every record once.

Which records a worker learned is read from its predictions file (``--predictions-for all``; worker r
writes ``NAME.r.jsonl``).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp
from prometheus_client import CollectorRegistry

from consumers.recorded import RecordedSource, write_messages
from monitoring.metrics import Metrics
from stream_cl.build import build_learner
from stream_cl.checkpoint import CheckpointStore
from stream_cl.cli import main
from stream_cl.config import load
from stream_cl.group import Group, model_sha256, process_group
from stream_cl.learner import RunState
from stream_cl.run import RunOptions, RunParts, run_stream
from stream_cl.scaleout import for_rank
from stream_cl.service import serve
from tests.fixtures.procs import free_port
from tests.fixtures.redis import RedisServer
from tests.stream_cl.test_serve_kafka import BAD, assert_accounted, finish, produce, serve_args, wait_until
from tests.streams import blob_arrays, messages

GROUP = ("--workers", 2, "--until-idle", 6, "--kafka-session-timeout-ms", 2000)


def shared_buffer(server: RedisServer, name: str) -> tuple[str, str]:
    return "--buffer", f"{server.url}?name={name}"


def start(bootstrap: str, topic: str, tmp: Path, name: str, *args: str | int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "stream_cl", *serve_args(bootstrap, topic, tmp, name, *args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STREAMCL_TEST_THREADS": "1"}
    with (tmp / f"{name}.log").open("wb") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


@contextmanager
def group_predicting(
    bootstrap: str, topic: str, tmp: Path, name: str, *args: str | int, ranks: tuple[int, ...] = (1,), lines: int = 300
) -> Iterator[tuple[subprocess.Popen, Path]]:
    """The group ``start`` starts and its log, once each worker of ``ranks`` has written ``lines`` predictions;
    killed on leaving (a no-op once it exited): a hung group must not outlive the test."""
    log = tmp / f"{name}.log"
    files = [tmp / f"{name}.{rank}.jsonl" for rank in ranks]
    with start(bootstrap, topic, tmp, name, *args) as proc:
        try:
            wait_until(lambda: all(f.exists() and f.read_bytes().count(b"\n") >= lines for f in files), proc, log)
            yield proc, log
        finally:
            proc.kill()


def worker_pid(log: Path, rank: int) -> int:
    return int(re.search(rf"worker {rank} of 2 \(gloo\), [^,]+, pid (\d+)", log.read_text()).group(1))


def run(bootstrap: str, topic: str, tmp: Path, name: str, *args: str | int) -> dict:
    with start(bootstrap, topic, tmp, name, *args) as proc:
        try:
            finish(proc, tmp / f"{name}.log", timeout_s=180)
        finally:
            proc.kill()  # a no-op once it exited; a hung group must not outlive the test
    return json.loads((tmp / f"{name}.json").read_text())


def learned_ids(tmp: Path, name: str, ranks: int) -> list[str]:
    files = [tmp / f"{name}.{r}.jsonl" for r in range(ranks)] if ranks > 1 else [tmp / f"{name}.jsonl"]
    return [p["id"] for f in files if f.exists() for p in map(json.loads, f.read_text().splitlines()) if p["learned"]]


def test_two_workers_learn_a_4_partition_topic_once_as_one_model_and_restore_into_one_and_two(
    kafka_bootstrap: str, make_topic: Callable[..., str], redis_server: RedisServer, tmp_path: Path
) -> None:
    topic = make_topic(4)
    where = produce(kafka_bootstrap, topic, 400)
    buffer = shared_buffer(redis_server, f"scaleout-{topic}")
    summary = run(kafka_bootstrap, topic, tmp_path, "first", *GROUP, *buffer)

    assert summary["world_size"] == 2
    workers = summary["workers"]
    assert [w["rank"] for w in workers] == [0, 1]
    assert all(w["learned"] > 0 for w in workers), workers  # both workers had partitions and learned
    assert workers[0]["model_sha256"] == workers[1]["model_sha256"] != ""  # one model
    ids = Counter(learned_ids(tmp_path, "first", 2))
    assert set(ids) == set(where) and set(ids.values()) == {1}  # every record learned exactly once by the group
    assert summary["learned_total"] == sum(w["learned"] for w in workers) == len(where)
    assert_accounted(summary, len(where) + BAD)
    _, checkpoint = CheckpointStore(tmp_path / "ckpt").latest()
    ends = Counter(p for p, _ in where.values())  # labelled records per partition, plus the bad ones
    offsets = {p: o for _, p, o in checkpoint["offsets"]}
    assert sorted(offsets) == [0, 1, 2, 3]  # every partition of both workers, in rank 0's checkpoint
    assert sum(offsets.values()) == len(where) + BAD and all(offsets[p] >= n for p, n in ends.items())

    # The group's checkpoint restores into one worker: it resumes every partition where the group stopped.
    more = produce(kafka_bootstrap, topic, 200, start=1000)
    alone = run(kafka_bootstrap, topic, tmp_path, "alone", "--until-idle", 6, *buffer, "--group", f"alone-{topic}")
    assert sorted(learned_ids(tmp_path, "alone", 1)) == sorted(more)
    assert alone["learned_total"] == len(where) + len(more)

    # ... and into two again, averaging parameters every 3 steps.
    last = produce(kafka_bootstrap, topic, 200, start=2000)
    average = ("--sync", "average", "--average-every", 3)
    again = run(kafka_bootstrap, topic, tmp_path, "again", *GROUP, *average, *buffer, "--group", f"again-{topic}")
    assert len(re.findall(r"worker \d of 2 \(gloo\), average every 3,", (tmp_path / "again.log").read_text())) == 2
    assert sorted(learned_ids(tmp_path, "again", 2)) == sorted(last)
    assert again["learned_total"] == len(where) + len(more) + len(last)
    assert again["workers"][0]["model_sha256"] == again["workers"][1]["model_sha256"]
    assert_accounted(again, len(where) + len(more) + len(last) + 3 * BAD)


def test_kill_9_of_one_worker_restarts_the_group_from_the_checkpoint_and_nothing_is_skipped_or_counted_twice(
    kafka_bootstrap: str, make_topic: Callable[..., str], redis_server: RedisServer, tmp_path: Path
) -> None:
    topic = make_topic(4)
    where = produce(kafka_bootstrap, topic, 2000)
    buffer = shared_buffer(redis_server, f"scaleout-{topic}")
    with group_predicting(kafka_bootstrap, topic, tmp_path, "group", *GROUP, *buffer) as (proc, log):
        os.kill(worker_pid(log, 1), signal.SIGKILL)
        finish(proc, log, timeout_s=240)

    # restarted (a restart can itself fail to form the group on a loaded machine; the launcher tries again)
    assert len(re.findall(r"worker 1 of 2 \(gloo\)", log.read_text())) >= 2, "the group was restarted"
    summary = json.loads((tmp_path / "group.json").read_text())
    assert summary["learned_total"] == len(where)  # the restart resumed every partition at the checkpoint
    assert_accounted(summary, len(where) + BAD)
    assert set(learned_ids(tmp_path, "group", 2)) == set(where)  # relearned at most since the last checkpoint
    assert summary["workers"][0]["model_sha256"] == summary["workers"][1]["model_sha256"]


def test_a_hung_worker_fails_the_group_after_the_collective_timeout_and_the_restart_learns_every_record(
    kafka_bootstrap: str, make_topic: Callable[..., str], redis_server: RedisServer, tmp_path: Path
) -> None:
    topic = make_topic(4)
    where = produce(kafka_bootstrap, topic, 2000)
    buffer = shared_buffer(redis_server, f"scaleout-hung-{topic}")
    # a session of 6 s, not 2: under CPU load the short one's missed heartbeats can keep the restarted group
    # rebalancing (tansu) until the run gives up waiting for partitions
    hung = ("--collective-timeout", 5, "--kafka-session-timeout-ms", 6000)
    with group_predicting(kafka_bootstrap, topic, tmp_path, "group", *GROUP, *buffer, *hung) as (proc, log):
        os.kill(worker_pid(log, 1), signal.SIGSTOP)  # alive but hung: only the collectives' timeout can tell
        finish(proc, log, timeout_s=240)  # without the timeout, worker 0 waits 30 minutes in gloo
    assert len(re.findall(r"worker 1 of 2 \(gloo\)", log.read_text())) >= 2, "the group was restarted"
    summary = json.loads((tmp_path / "group.json").read_text())
    assert summary["learned_total"] == len(where)
    assert_accounted(summary, len(where) + BAD)
    assert set(learned_ids(tmp_path, "group", 2)) == set(where)


class RecordingGroup(Group):
    """A group worker that records the model's SHA-256 and label tree after every group step."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.record: list[list] = []

    def finish_step(self, state: RunState) -> None:
        super().finish_step(state)
        self.record.append([model_sha256(state.learner), [list(n) for n in state.learner.labels.names]])


def _lockstep_worker(rank: int, port: int, tmp: Path, sync: str = "allreduce", every: int = 1) -> None:
    """Rank 0 streams classes c0-c2 (150 records), rank 1 only 40 records of c0 and c3: rank 1 runs dry
    early (empty steps), c3 is a class only rank 1 sees, c1 and c2 only rank 0. The seeds differ, so
    the learners start apart: the group starts from rank 0's parameters."""
    torch.set_num_threads(1)
    with process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2):
        x, y = blob_arrays(n_classes=4, per_class=50, shape=(8,))
        keep = y < 3 if rank == 0 else np.isin(y, [0, 3]) & (np.arange(len(y)) % 50 < 20)
        path = tmp / f"stream-{rank}.rec.gz"
        write_messages(path, messages(x[keep], y[keep]))
        group = RecordingGroup(rank, 2, torch.device("cpu"), sync=sync, average_every=every)
        learner = partial(build_learner, "er", "mlp", device=torch.device("cpu"), seed=rank, width=16, buffer_size=50)
        with RecordedSource(path) as source:
            summary, state = run_stream(
                source,
                group.wrap(learner),
                Metrics(CollectorRegistry()),
                RunOptions(batch_size=10, progress=False),
                RunParts(lockstep=group),
            )
        summary = group.summarize(summary, state.learner)
        result = {"steps": group.record, "learned": summary.learned, "end": model_sha256(state.learner)}
        (tmp / f"steps-{rank}.json").write_text(json.dumps(result))


def test_workers_hold_identical_parameters_and_label_trees_after_every_step(tmp_path: Path) -> None:
    mp.spawn(_lockstep_worker, args=(free_port(), tmp_path), nprocs=2, join=True)
    zero, one = (json.loads((tmp_path / f"steps-{r}.json").read_text()) for r in (0, 1))
    assert len(zero["steps"]) == len(one["steps"]) == 15  # rank 0's 150 records in batches of 10
    assert zero["steps"] == one["steps"]  # the same parameters and tree after every step ...
    # ... and every step changed them, on both, but the second: with c0 alone the softmax has one class, no gradient
    assert len({sha for sha, _ in zero["steps"]}) == 14 and zero["steps"][0][0] == zero["steps"][1][0]
    trees = [tree for _, tree in zero["steps"]]
    assert trees[0] == [["c0"]] and trees[2] == [["c0", "c3"]] and trees[-1] == [["c0", "c3", "c1", "c2"]]
    assert zero["learned"] == one["learned"] == 150 + 40  # the group's summary, on both workers


def test_averaging_workers_step_apart_and_hold_identical_parameters_after_every_average(tmp_path: Path) -> None:
    """``--sync average --average-every 4`` on the stream above: each worker steps its own optimizer."""
    mp.spawn(_lockstep_worker, args=(free_port(), tmp_path, "average", 4), nprocs=2, join=True)
    zero, one = (json.loads((tmp_path / f"steps-{r}.json").read_text()) for r in (0, 1))
    assert len(zero["steps"]) == len(one["steps"]) == 15
    for step, (mine, theirs) in enumerate(zip(zero["steps"], one["steps"], strict=True), start=1):
        assert mine[1] == theirs[1]  # the label trees agree after every step
        if step % 4 == 0:
            assert mine[0] == theirs[0], step  # one model after each average
    # between averages, while both learn (rank 1 has 40 records: steps 1-4), their models differ
    assert zero["steps"][2][0] != one["steps"][2][0]
    # rank 1 has run dry after step 4: at step 5 it takes no step and keeps the average while rank 0 learns
    # (at step 6 rank 0 brings class c1: new heads, which the workers average before learning)
    assert one["steps"][3][0] == one["steps"][4][0] != zero["steps"][4][0]
    # the run ends with an average: of rank 0 alone, the only worker that stepped since step 12
    assert zero["end"] == one["end"] == zero["steps"][-1][0] != one["steps"][-1][0]
    assert zero["learned"] == one["learned"] == 150 + 40


def _conflict_worker(rank: int, port: int, tmp: Path) -> None:
    """Both workers bring class x in the first step, rank 0 under a, rank 1 under b; then both bring b/y."""
    torch.set_num_threads(1)
    with process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2):
        x, y = blob_arrays(n_classes=2, per_class=20, shape=(8,))
        path = tmp / f"conflict-{rank}.rec.gz"
        write_messages(path, messages(x, y, paths={0: ["ab"[rank], "x"], 1: ["b", "y"]}))
        group = RecordingGroup(rank, 2, torch.device("cpu"))
        learner = partial(build_learner, "er", "mlp", device=torch.device("cpu"), seed=rank, width=16, buffer_size=50)
        with RecordedSource(path) as source:
            summary, state = run_stream(
                source,
                group.wrap(learner),
                Metrics(CollectorRegistry()),
                RunOptions(batch_size=10, progress=False),
                RunParts(lockstep=group),
            )
        summary = group.summarize(summary, state.learner)
        result = {"steps": group.record, "summary": asdict(summary), "mine": summary.workers[rank]["learned"]}
        (tmp / f"conflict-{rank}.json").write_text(json.dumps(result))


def test_a_class_two_workers_bring_with_two_parents_in_one_step_is_dead_lettered_on_one_not_failing_the_group(
    tmp_path: Path,
) -> None:
    mp.spawn(_conflict_worker, args=(free_port(), tmp_path), nprocs=2, join=True)
    zero, one = (json.loads((tmp_path / f"conflict-{r}.json").read_text()) for r in (0, 1))
    assert zero["steps"] == one["steps"]  # the same tree and parameters after every step
    assert zero["steps"][-1][1] == [["a", "b"], ["x", "y"]]  # a/x came first in sorted order: it won
    summary = zero["summary"]
    assert summary["dead_letter"] == {"label_conflict": 20}  # rank 1's b/x records, with the reason
    assert (zero["mine"], one["mine"]) == (40, 20) and summary["learned"] == 60
    assert summary["workers"][0]["model_sha256"] == summary["workers"][1]["model_sha256"]


def worker_settings(bootstrap: str, topic: str, tmp: Path, name: str, **extra: object) -> dict:
    """Settings of a group's worker serving ``topic``: a consumer group of its own, short group timings, a small
    MLP, checkpoints under ``tmp/ckpt``, and every record's prediction in ``tmp/NAME.r.jsonl``."""
    return {
        "source": f"kafka://{bootstrap}/{topic}",
        "group": f"g-{topic}",
        "kafka_session_timeout_ms": 2000,
        "kafka_heartbeat_interval_ms": 500,
        "until_idle": 6,
        "no_progress": True,
        "no_drift": True,
        "model": "mlp",
        "width": 16,
        "probe_fraction": 0.0,
        "buffer_size": 100,
        "metrics_port": 0,
        "checkpoint_dir": str(tmp / "ckpt"),
        "predictions": str(tmp / f"{name}.jsonl"),
        "predictions_for": "all",
        **extra,
    }


def test_each_worker_writes_files_of_its_own_and_serves_metrics_on_a_port_of_its_own(tmp_path: Path) -> None:
    settings = {
        "source": "kafka://127.0.0.1:9092/t",
        "group": "g",
        "metrics_port": 9100,
        "checkpoint_dir": str(tmp_path / "ckpt"),
        "predictions": str(tmp_path / "out.jsonl"),
        "dead_letter_out": str(tmp_path / "dead.rec.gz"),  # appended to by one writer only
    }
    one = for_rank(load(settings, {}), 1, 2)
    assert (one.metrics.port, one.predictions.url) == (9101, str(tmp_path / "out.1.jsonl"))
    assert one.source.dead_letter_out == str(tmp_path / "dead.rec.1.gz")
    assert one.source.dead_letter_spool == str(tmp_path / "ckpt" / "dead-letter-spool") + "-1"


def _serving_worker(rank: int, port: int, settings: dict, tmp: Path) -> None:
    """One worker of a group serving the real broker and Redis, recording its model after every group step."""
    torch.set_num_threads(1)
    with process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2):
        cfg = for_rank(load(settings, {}), rank, 2)
        group = RecordingGroup(rank, 2, torch.device("cpu"), sync="average", average_every=cfg.service.average_every)
        summary = serve(cfg, group=group)
        (tmp / f"served-{rank}.json").write_text(json.dumps({"steps": group.record, "summary": asdict(summary)}))


def test_averaging_workers_learn_a_4_partition_topic_once_and_are_one_model_after_every_average(
    kafka_bootstrap: str, make_topic: Callable[..., str], redis_server: RedisServer, tmp_path: Path
) -> None:
    topic = make_topic(4)
    where = produce(kafka_bootstrap, topic, 400)
    buffer = f"{redis_server.url}?name=average-{topic}"
    average = {"sync": "average", "average_every": 3}
    settings = worker_settings(
        kafka_bootstrap, topic, tmp_path, "avg", buffer=buffer, checkpoint_every_records=100, **average
    )
    mp.spawn(_serving_worker, args=(free_port(), settings, tmp_path), nprocs=2, join=True)
    zero, one = (json.loads((tmp_path / f"served-{r}.json").read_text()) for r in (0, 1))
    assert len(zero["steps"]) == len(one["steps"]) >= 400 // 10 // 2  # both workers made every group step
    averages = [(mine[0], theirs[0]) for mine, theirs in zip(zero["steps"], one["steps"], strict=True)][2::3]
    assert averages and all(mine == theirs for mine, theirs in averages)  # one model after each average
    assert any(mine[0] != theirs[0] for mine, theirs in zip(zero["steps"], one["steps"], strict=True))
    summary = zero["summary"]
    workers = summary["workers"]
    assert all(w["learned"] > 0 for w in workers), workers
    assert workers[0]["model_sha256"] == workers[1]["model_sha256"] != ""  # one model at the end
    ids = Counter(learned_ids(tmp_path, "avg", 2))
    assert set(ids) == set(where) and set(ids.values()) == {1}  # every record learned exactly once
    assert summary["learned_total"] == len(where)
    assert_accounted(summary, len(where) + BAD)
    _, checkpoint = CheckpointStore(tmp_path / "ckpt").latest()
    offsets = {p: o for _, p, o in checkpoint["offsets"]}
    assert sorted(offsets) == [0, 1, 2, 3] and sum(offsets.values()) == len(where) + BAD


def test_workers_refuse_what_a_group_cannot_learn_before_starting_any(tmp_path: Path, capsys) -> None:
    stream = tmp_path / "s.rec.gz"
    write_messages(stream, messages(*blob_arrays(n_classes=2, per_class=5)))
    assert main(["serve", "--workers", "2", "--source", str(stream), "--metrics-port", "0"]) == 2
    assert "several workers need a Kafka source" in capsys.readouterr().err  # a file would be learned twice
    kafka = ["serve", "--workers", "2", "--source", "kafka://127.0.0.1:1/t", "--metrics-port", "0"]
    assert main([*kafka, "--method", "pl-fms"]) == 2
    assert "cannot learn with several workers" in capsys.readouterr().err
    assert main([*kafka, "--hparam", "iterations=2"]) == 2  # ER's compute-matched steps: several per batch
    assert "iterations must be 1 with several workers" in capsys.readouterr().err
