"""End-to-end: the `stream-cl run` command on small recorded streams, its summary and /metrics."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from consumers.record import Message, Position
from consumers.recorded import write_messages
from stream_cl.cli import main
from tests.fixtures.procs import free_port
from tests.streams import blob_arrays, messages, write_stream

SUMMARY_KEYS = {
    "learned", "predicted", "dead_letter", "online_accuracy", "final_accuracy", "forgetting",
    "classes_seen", "elapsed_seconds", "samples_per_second",
}  # fmt: skip


def test_run_writes_summary(tmp_path: Path) -> None:
    stream = write_stream(tmp_path / "s.rec.gz", n_classes=4, per_class=50)
    out = tmp_path / "summary.json"
    code = main(["run", "--source", str(stream), "--metrics-port", "0", "--no-progress", "--summary-json", str(out)])
    assert code == 0
    summary = json.loads(out.read_text())
    assert summary.keys() >= SUMMARY_KEYS
    assert summary["learned"] + summary["held_out"] == 200
    assert summary["dead_letter"] == {}
    assert summary["classes_seen"] == 4
    assert summary["online_accuracy"] > 0.5  # separable blobs: most are right before being learned


def test_bad_records_are_counted_by_reason(tmp_path: Path) -> None:
    x, y = blob_arrays(n_classes=2, per_class=20)
    msgs = messages(x, y)
    bad_json = Message(Position("test", 0, 40), 40.0, None, b"{not json", ())
    wrong_shape_x = np.zeros(3, dtype=np.float32)
    from consumers.wire import encode_binary

    value, headers = encode_binary("odd", wrong_shape_x, "c0")
    odd = Message(Position("test", 0, 41), 41.0, None, value, tuple(headers))
    write_messages(tmp_path / "mixed.rec.gz", [*msgs, bad_json, odd])
    out = tmp_path / "summary.json"
    args = ["run", "--source", str(tmp_path / "mixed.rec.gz"), "--metrics-port", "0", "--no-progress"]
    assert main([*args, "--summary-json", str(out), "--probe-fraction", "0"]) == 0
    summary = json.loads(out.read_text())
    assert summary["dead_letter"] == {"bad_json": 1, "shape_mismatch": 1}
    assert summary["learned"] == 40


def test_default_stream_runs(tmp_path: Path) -> None:
    out = tmp_path / "summary.json"
    args = ["run", "--max-records", "300", "--metrics-port", "0", "--no-progress", "--summary-json", str(out)]
    assert main(args) == 0
    summary = json.loads(out.read_text())
    assert summary["learned"] + summary["held_out"] == 300
    assert summary["classes_seen"] >= 2


def test_unreadable_source_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--source", str(tmp_path / "missing.rec.gz"), "--metrics-port", "0"]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("stream-cl: error:") and "\n" not in err
    (tmp_path / "junk.rec.gz").write_bytes(b"not a stream")
    assert main(["run", "--source", str(tmp_path / "junk.rec.gz"), "--metrics-port", "0", "--no-progress"]) != 0


def test_bad_arguments_exit_non_zero() -> None:
    assert main(["run", "--batch-size", "0"]) == 2
    with pytest.raises(SystemExit):
        main(["run", "--method", "nope"])


def _learned(port: int) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    match = re.search(r'^streamcl_samples_total\{outcome="learned"\} (\S+)$', body, re.M)
    return float(match.group(1)) if match else 0.0


def test_metrics_move_during_a_run(tmp_path: Path) -> None:
    stream = write_stream(tmp_path / "big.rec.gz", n_classes=5, per_class=4000)
    port = free_port()
    cmd = [sys.executable, "-m", "stream_cl", "run", "--source", str(stream), "--metrics-port", str(port),
           "--no-progress", "--batch-size", "10"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        seen: list[float] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None and len(set(seen)) < 3:
            try:
                value = _learned(port)
            except OSError:
                value = 0.0
            if value > 0:
                seen.append(value)
            time.sleep(0.2)
        assert len(set(seen)) >= 3, f"learned counter did not move while running: {seen}"
        assert seen == sorted(seen)
    finally:
        proc.kill()
        proc.wait()
