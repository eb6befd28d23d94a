"""``stream-cl serve`` over a recorded stream: restart from the newest *valid* checkpoint, predictions out,
``stream-cl checkpoint ls|show|restore``, and the overload policies."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from consumers.record import Record
from monitoring.metrics import Metrics
from stream_cl.checkpoint import CheckpointStore
from stream_cl.cli import main
from stream_cl.overload import OverloadPolicy
from stream_cl.service import DRAIN_EXIT_CODE, stop_on_signals
from tests.streams import blob_arrays, messages, write_stream

N = 400


def serve(*args: str | Path) -> int:
    """``stream-cl serve`` in this process (the Kafka tests run it as a subprocess, to kill it)."""
    cmd = ["serve", "--no-progress", "--no-drift", "--metrics-port", "0", "--model", "mlp", "--width", "16"]
    return main([*cmd, "--probe-fraction", "0", "--checkpoint-keep", "3", *map(str, args)])


def predictions(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_truncated_newest_checkpoint_falls_back_and_nothing_is_skipped_or_relearned(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stream = write_stream(tmp_path / "s.rec.gz", n_classes=4, per_class=N // 4)
    ckpt, first, second = tmp_path / "ckpt", tmp_path / "p1.jsonl", tmp_path / "p2.jsonl"
    common = ("--source", stream, "--checkpoint-dir", ckpt, "--checkpoint-every-records", 100)
    assert serve(*common, "--max-records", 250, "--predictions", first, "--predictions-for", "all") == 0
    # checkpoints at 100, 200 and 250 records, unless a slow disk folded a due one into a later one
    store = CheckpointStore(ckpt)
    *_, fallback, newest = store.list()
    assert store.load(newest)["offsets"] == [["test", 0, 250]]
    [[_, _, resume]] = store.load(fallback)["offsets"]
    assert 100 <= resume < 250
    newest.path.write_bytes(newest.path.read_bytes()[:1000])

    caplog.set_level(logging.INFO, logger="stream_cl")
    assert (
        serve(*common, "--predictions", second, "--predictions-for", "all", "--summary-json", tmp_path / "s.json") == 0
    )
    assert f"skipping checkpoint {newest.id}" in caplog.text and f"restored checkpoint {fallback.id}" in caplog.text
    again = predictions(second)
    assert [p["offset"] for p in again] == list(range(resume, N))  # resumed at its offset, in order
    assert json.loads((tmp_path / "s.json").read_text())["learned_total"] == N
    # the online accuracy window (1,000) went on from the restored checkpoint's: a verdict for every record
    [[level, verdicts]] = CheckpointStore(ckpt).latest()[1]["accuracy"]["levels"]
    assert level == 0 and len(verdicts) == N
    assert {p["model_version"] for p in again} >= {fallback.id}
    assert set(again[0]) == {"id", "predicted", "confidence", "model_version", "latency_ms", "learned"} | {
        "topic",
        "partition",
        "offset",
    }


def test_checkpoint_command_ls_show_restore(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    stream = write_stream(tmp_path / "s.rec.gz", n_classes=2, per_class=60)
    ckpt = tmp_path / "ckpt"
    assert serve("--source", stream, "--checkpoint-dir", ckpt, "--checkpoint-every-records", 50) == 0
    capsys.readouterr()
    assert main(["checkpoint", "ls", str(ckpt)]) == 0
    listing = capsys.readouterr().out.splitlines()
    # at 50 and 100 records and the final one; the one at 100 waits while the write at 50 is still going on
    ids = [int(line.split()[0]) for line in listing[1:]]
    assert ids in ([1, 2, 3], [1, 2]) and all("ok" in r for r in listing[1:])
    newest = ids[-1]
    assert main(["checkpoint", "show", str(ckpt)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["id"] == newest and shown["learned_total"] == 120 and shown["method"] == "er"
    assert shown["offsets"] == [{"topic": "test", "partition": 0, "next_offset": 120}]
    assert main(["checkpoint", "restore", str(ckpt), "1"]) == 0
    assert f"restored as {newest + 1}" in capsys.readouterr().out
    assert main(["checkpoint", "show", str(ckpt)]) == 0
    rolled_back = json.loads(capsys.readouterr().out)
    assert rolled_back["id"] == newest + 1 and rolled_back["learned_total"] == 50
    assert main(["checkpoint", "show", str(ckpt), "9"]) == 2


def _records(n: int) -> list[Record]:
    from consumers.wire import decode

    x, y = blob_arrays(n_classes=2, per_class=n // 2)
    return [decode(m) for m in messages(x, y)]


@pytest.mark.parametrize(("policy", "learned"), [("queue", 100), ("predict-only", 0), ("subsample", 47)])
def test_overload_policies_only_act_above_max_lag(policy: str, learned: int) -> None:
    lag = [50]
    metrics = Metrics(CollectorRegistry())
    overload = OverloadPolicy(policy, max_lag=10, lag=lambda: lag[0], fraction=0.5, metrics=metrics, seed=1)
    admitted = overload.admit(_records(100))
    assert sum(r.label is not None for r in admitted) == learned
    assert metrics.registry.get_sample_value("streamcl_overload_records_total", {"policy": policy}) == 100
    assert metrics.registry.get_sample_value("streamcl_overloaded") == 1
    lag[0] = 10  # between resume_lag (5) and max_lag: still behind, no flapping around the threshold
    assert (sum(r.label is not None for r in overload.admit(_records(100))) == 100) == (policy == "queue")
    assert metrics.registry.get_sample_value("streamcl_overloaded") == 1
    lag[0] = 5
    assert all(r.label is not None for r in overload.admit(_records(100)))
    assert metrics.registry.get_sample_value("streamcl_overloaded") == 0
    lag[0] = 10  # back above resume_lag but not above max_lag: stays caught up
    assert all(r.label is not None for r in overload.admit(_records(100)))


def test_sigterm_only_sets_the_stop_flag_and_handlers_are_restored_after() -> None:
    before = signal.getsignal(signal.SIGTERM)
    stop = threading.Event()
    with stop_on_signals(stop, drain_timeout=30):
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.wait(5)
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_drain_longer_than_the_bound_ends_the_process_with_exit_code_3() -> None:
    code = (
        "import os, signal, threading, time\n"
        "from stream_cl.service import stop_on_signals\n"
        "with stop_on_signals(threading.Event(), drain_timeout=0.5):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(60)  # a drain that never finishes\n"
    )
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == DRAIN_EXIT_CODE, done.stderr
    assert "drain did not finish within 0.5 s" in done.stderr
    assert time.monotonic() - started < 60
