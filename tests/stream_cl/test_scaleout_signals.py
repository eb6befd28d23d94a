"""``stream-cl serve --workers N`` and signals: SIGTERM to the launcher drains every worker, like one process."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from kafka import KafkaAdminClient

from stream_cl.checkpoint import CheckpointStore
from tests.fixtures.redis import RedisServer
from tests.stream_cl.test_scaleout import GROUP, group_predicting, learned_ids, run, shared_buffer, worker_pid
from tests.stream_cl.test_serve_kafka import produce


def test_sigterm_to_the_launcher_drains_every_worker_and_the_next_run_learns_the_rest_once(
    kafka_bootstrap: str, make_topic: Callable[..., str], redis_server: RedisServer, tmp_path: Path
) -> None:
    topic = make_topic(4)
    where = produce(kafka_bootstrap, topic, 3000)
    buffer = shared_buffer(redis_server, f"signals-{topic}")
    drain = ("--drain-timeout", 20)
    group = group_predicting(
        kafka_bootstrap, topic, tmp_path, "first", *GROUP, *buffer, *drain, ranks=(0, 1), lines=200
    )
    with group as (proc, log):
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()[-3000:]
        assert time.monotonic() - started < 30
    text = log.read_text()
    assert "worker 1 of 2" in text and text.count("worker 1 of 2 (gloo)") == 1  # drained, not restarted
    first = json.loads((tmp_path / "first.json").read_text())  # the group's summary, as after any drain
    learned = learned_ids(tmp_path, "first", 2)
    assert first["learned_total"] == len(learned) < len(where)
    _, checkpoint = CheckpointStore(tmp_path / "ckpt").latest()
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    committed = {
        (tp.topic, tp.partition): om.offset for tp, om in admin.list_group_offsets(f"g-{topic}")[f"g-{topic}"].items()
    }
    admin.close()
    assert {(t, p): o for t, p, o in checkpoint["offsets"]} == committed  # every worker committed what it learned

    # a consumer group of its own, as in test_scaleout: the checkpoint decides where every partition starts
    second = run(kafka_bootstrap, topic, tmp_path, "second", *GROUP, *buffer, "--group", f"second-{topic}")
    rest = learned_ids(tmp_path, "second", 2)
    assert sorted(learned + rest) == sorted(where)  # nothing learned twice, nothing skipped
    assert second["learned_total"] == len(where)


def test_a_drain_that_fails_after_sigterm_exits_3_without_a_summary_and_the_restart_connects_nothing(
    kafka_bootstrap: str, make_topic: Callable[..., str], redis_server: RedisServer, tmp_path: Path
) -> None:
    topic = make_topic(4)
    produce(kafka_bootstrap, topic, 3000)
    buffer = shared_buffer(redis_server, f"failed-drain-{topic}")
    # No drain ends within a millisecond: the workers' watchdogs end them (exit 3), and the agent restarts the group.
    failing = ("--drain-timeout", 0.001)
    group = group_predicting(
        kafka_bootstrap, topic, tmp_path, "first", *GROUP, *buffer, *failing, ranks=(0, 1), lines=200
    )
    with group as (proc, log):
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 3, log.read_text()[-3000:]  # DRAIN_EXIT_CODE, as one process exits
    text = log.read_text()
    assert "drain did not finish within 0.0 s" in text
    # restarted once, its workers stopped before the broker, the buffer and the checkpoint (and a watchdog)
    assert text.count("worker restarted after the stop signal: not starting") == 2, text[-3000:]
    assert "restarted workers started stopped; exiting with code 3 and no summary" in text
    assert not (tmp_path / "first.json").exists()  # no summary of a restarted group that learned nothing


def test_workers_whose_launcher_is_killed_stop_and_the_next_run_learns_the_rest_once(
    kafka_bootstrap: str, make_topic: Callable[..., str], redis_server: RedisServer, tmp_path: Path
) -> None:
    """kill -9 of the launcher alone (the OOM killer, a supervisor that signals only the main process) must not
    leave its workers learning on unsupervised: they would hold the partitions and the checkpoint lock, and
    the supervisor's restart would find the directory in use."""
    topic = make_topic(4)
    where = produce(kafka_bootstrap, topic, 20000)
    buffer = shared_buffer(redis_server, f"orphans-{topic}")
    group = group_predicting(kafka_bootstrap, topic, tmp_path, "first", *GROUP, *buffer, ranks=(0, 1), lines=200)
    with group as (proc, log):
        workers = [worker_pid(log, rank) for rank in (0, 1)]
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 60
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        orphans = [pid for pid in workers if alive(pid)]
        for pid in orphans:
            os.kill(pid, signal.SIGKILL)
        assert not orphans, f"workers still running 60 s after their launcher was killed:\n{log.read_text()[-3000:]}"
    learned = learned_ids(tmp_path, "first", 2)
    _, checkpoint = CheckpointStore(tmp_path / "ckpt").latest()
    second = run(kafka_bootstrap, topic, tmp_path, "second", *GROUP, *buffer, "--group", f"second-{topic}")
    assert second["learned_total"] == len(where)  # resumed at the checkpoint: nothing skipped
    assert set(learned) | set(learned_ids(tmp_path, "second", 2)) == set(where)
    assert checkpoint["offsets"]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie (exited, not yet reaped) is not running
        return stat.read().split(") ")[-1][0] != "Z"


# A worker whose main thread never returns to Python (blocked in a collective, or in a call to its dead launcher's
# store), so torch's SIGINT on the launcher's death never starts its drain; it prints its pid, then blocks.
BLOCKED_WORKER = """
import logging, signal, sys, threading
from stream_cl.scaleout import _exit_when_orphaned
logging.basicConfig(stream=sys.stderr)
signal.signal(signal.SIGINT, signal.SIG_IGN)
_exit_when_orphaned(int(sys.argv[1]), interval_s=0.1, after_s=float(sys.argv[2]), code=3)
print("ready", flush=True)
threading.Event().wait()
"""
# Its launcher: starts it, passes its pid on, and waits to be killed.
LAUNCHER = """
import subprocess, sys, os, time
worker = subprocess.Popen([sys.executable, "-c", sys.argv[1], str(os.getpid()), sys.argv[2]],
                          stdout=subprocess.PIPE, stderr=open(sys.argv[3], "w"), text=True)
assert worker.stdout.readline() == "ready\\n"
print(worker.pid, flush=True)
time.sleep(600)
"""


def test_a_worker_blocked_past_its_launcher_exits_once_the_drain_bound_is_over(tmp_path: Path) -> None:
    """The bound holds however the worker is stuck: --drain-timeout + the margin after its launcher is gone."""
    import subprocess
    import sys

    after_s, log = 1.5, tmp_path / "worker.log"
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, BLOCKED_WORKER, str(after_s), str(log)], stdout=subprocess.PIPE, text=True
    )
    with launcher.stdout:
        worker = int(launcher.stdout.readline())
    launcher.kill()
    launcher.wait()
    gone = time.monotonic()
    deadline = gone + 60
    while alive(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    lived = time.monotonic() - gone
    if alive(worker):
        os.kill(worker, signal.SIGKILL)
    assert after_s <= lived < 30, lived
    assert f"(pid {launcher.pid}) is gone: exiting with code 3" in log.read_text()
