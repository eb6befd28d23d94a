"""Workers on two "machines": two ``torchrun`` agents on this one, as the README starts a group across machines.

Each agent counts its own restarts (``TORCHELASTIC_RESTART_COUNT``), and a supervisor that restarts a dead
agent starts it counting from 0, so the workers of one group cannot tell which round they are in from it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path

import pytest

from tests.fixtures.procs import free_port, wait_tcp
from tests.fixtures.redis import RedisServer
from tests.stream_cl.test_scaleout import learned_ids, shared_buffer
from tests.stream_cl.test_serve_kafka import BAD, assert_accounted, produce, serve_args


def agent(port: int, bootstrap: str, topic: str, tmp: Path, log: Path, *args: str | int) -> subprocess.Popen:
    """One machine's ``torchrun`` with one worker."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1"]
    torchrun += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"nodes-{topic}"]
    torchrun += ["--rdzv-conf", "is_host=false"]  # the rendezvous store is a machine of its own (rendezvous_store)
    torchrun += ["--max-restarts", "3", "--monitor-interval", "0.2", "-m", "stream_cl"]
    cmd = [*torchrun, *map(str, serve_args(bootstrap, topic, tmp, "group", *args))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STREAMCL_TEST_THREADS": "1"}
    env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"  # as the README says: else a restarted agent cannot rejoin
    with log.open("wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


@contextmanager
def rendezvous_store() -> Iterator[int]:
    """The rendezvous endpoint's key-value store, on no agent's machine: torch's rendezvous cannot outlive the
    agent hosting it, so a machine that may die must not host it."""
    port = free_port()
    serve = (
        f"import time, torch.distributed as d; s = d.TCPStore('127.0.0.1', {port}, is_master=True); time.sleep(3600)"
    )
    with subprocess.Popen([sys.executable, "-c", serve]) as store:
        try:
            wait_tcp(port)
            yield port
        finally:
            store.kill()


def wait_for(check: Callable[[], bool], logs: list[Path], timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "\n\n".join(f"{log.name}:\n{log.read_text()[-3000:]}" for log in logs)
        time.sleep(0.05)


WORKER = re.compile(r"worker (\d) of 2 \(gloo\), [^,]+, pid (\d+)")


@pytest.mark.parametrize("killed", ["machine", "torchrun"])
def test_a_machine_whose_torchrun_is_killed_and_restarted_rejoins_the_group_and_nothing_is_skipped_or_counted_twice(
    kafka_bootstrap: str, make_topic: Callable[..., str], redis_server: RedisServer, tmp_path: Path, killed: str
) -> None:
    """``machine``: its torchrun and worker die. ``torchrun``: only torchrun dies (the OOM killer, a supervisor
    that signals one process): torch starts workers in sessions of their own and signals none, so the worker
    must notice and exit by itself, else it would learn on unsupervised, holding its partitions."""
    topic = make_topic(4)
    where = produce(kafka_bootstrap, topic, 4000)
    args = ("--until-idle", 6, "--kafka-session-timeout-ms", 6000, *shared_buffer(redis_server, f"nodes-{topic}"))
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    with ExitStack() as stack:
        port = stack.enter_context(rendezvous_store())
        agents = [agent(port, kafka_bootstrap, topic, tmp_path, log, *args) for log in logs]
        try:
            files = [tmp_path / f"group.{rank}.jsonl" for rank in (0, 1)]
            wait_for(lambda: all(f.exists() and f.read_bytes().count(b"\n") >= 300 for f in files), logs)
            # The machine without rank 0: its restarted torchrun counts its restarts from 0, the other one's from 1.
            rank1, worker = next(
                (i, int(m[1])) for i, log in enumerate(logs) for m in WORKER.findall(log.read_text()) if m[0] == "1"
            )
            torchrun = agents[rank1].pid
            if killed == "machine":
                os.killpg(agents[rank1].pid, signal.SIGKILL)
                os.kill(worker, signal.SIGKILL)
            else:
                os.kill(agents[rank1].pid, signal.SIGKILL)
            agents[rank1].wait()
            wait_for(lambda: not running(worker), logs, timeout_s=15)
            survivor = logs[1 - rank1]
            wait_for(lambda: "failed (exitcode" in survivor.read_text(), logs)  # its worker failed with the peer
            time.sleep(1)  # its agent counts a restart and waits for the other machine (a supervisor restarts it)
            logs.append(tmp_path / "restarted.log")
            agents[rank1] = agent(port, kafka_bootstrap, topic, tmp_path, logs[-1], *args)
            for proc in agents:
                assert proc.wait(240) == 0, "\n\n".join(f"{log.name}:\n{log.read_text()[-3000:]}" for log in logs)
        finally:
            for proc in agents:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            for log in logs:  # workers left running by a failed test (in sessions of their own)
                for _, pid in WORKER.findall(log.read_text()):
                    with suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)

    if killed == "torchrun":
        gone = f"the process that started this worker (pid {torchrun}) is gone: exiting with code 1"
        assert gone in logs[rank1].read_text()
    summary = json.loads((tmp_path / "group.json").read_text())
    assert summary["world_size"] == 2
    assert summary["learned_total"] == len(where)  # resumed every partition at the checkpoint
    assert_accounted(summary, len(where) + BAD)
    assert set(learned_ids(tmp_path, "group", 2)) == set(where)  # relearned at most since the last checkpoint
    assert summary["workers"][0]["model_sha256"] == summary["workers"][1]["model_sha256"]


def running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:  # a zombie (exited, not yet reaped) is not running
            return stat.read().split(") ")[-1][0] != "Z"
    except FileNotFoundError:
        return False
