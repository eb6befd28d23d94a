"""How `stream-cl run` starts and ends as scripts see it: ports, exit codes, interrupts, logs, idle gauges."""

from __future__ import annotations

import io
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from tqdm import tqdm

from consumers.record import Message, Position
from consumers.recorded import RecordedSource, write_messages
from stream_cl.cli import main
from stream_cl.config import DEFAULT_METRICS_PORT
from stream_cl.run import _advance
from tests.fixtures.procs import free_port
from tests.streams import blob_arrays, messages, write_stream

QUIET = ["--no-progress", "--probe-fraction", "0"]


def _hold(port: int) -> socket.socket:
    """Occupy ``127.0.0.1:port`` (if something else holds it already, it is busy all the same)."""
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", port))
        sock.listen()
    except OSError:
        sock.close()
        return socket.socket()
    return sock


def test_busy_default_metrics_port_moves_and_a_busy_chosen_port_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    stream = write_stream(tmp_path / "s.rec.gz", n_classes=2, per_class=10)
    with _hold(DEFAULT_METRICS_PORT):
        assert main(["run", "--source", str(stream), *QUIET]) == 0
        assert f"port {DEFAULT_METRICS_PORT} is in use; serving metrics on port" in caplog.text
        capsys.readouterr()
        assert main(["run", "--source", str(stream), "--metrics-port", str(DEFAULT_METRICS_PORT), *QUIET]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"stream-cl: error: --metrics-port {DEFAULT_METRICS_PORT}: the port is in use on 127.0.0.1; " + (
        "choose another port"
    )


def test_ctrl_c_prints_and_writes_the_partial_summary_and_exits_130(tmp_path: Path) -> None:
    stream = write_stream(tmp_path / "big.rec.gz", n_classes=4, per_class=20000)
    out = tmp_path / "summary.json"
    port = free_port()
    cmd = [sys.executable, "-m", "stream_cl", "run", "--source", str(stream), "--metrics-port", str(port),
           *QUIET, "--summary-json", str(out)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
                if 'streamcl_samples_total{outcome="learned"} 0.0' not in body and "learned" in body:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr and "records learned" in stdout
    summary = json.loads(out.read_text())
    assert 0 < summary["consumed"] < 80000


def test_a_missing_topic_is_an_error_and_an_empty_one_ends_with_code_4(
    kafka_bootstrap: str, make_topic: Callable[..., str], capsys: pytest.CaptureFixture
) -> None:
    run = ["run", "--metrics-port", "0", *QUIET, "--until-idle", "1", "--kafka-session-timeout-ms", "2000"]
    assert main([*run, "--source", f"kafka://{kafka_bootstrap}/no-such-topic"]) == 2
    assert "does not exist" in capsys.readouterr().err
    topic = make_topic(1)
    assert main([*run, "--source", f"kafka://{kafka_bootstrap}/{topic}"]) == 4


def test_json_logs_and_verbose_after_the_command(tmp_path: Path) -> None:
    x, y = blob_arrays(n_classes=2, per_class=10)
    bad = Message(Position("test", 0, 20), 20.0, None, b"{not json", ())  # its dead letter is logged at DEBUG
    write_messages(tmp_path / "s.rec.gz", [*messages(x, y), bad])
    cmd = [sys.executable, "-m", "stream_cl", "--log-format", "json", "run", "--source", str(tmp_path / "s.rec.gz"),
           "--metrics-port", str(free_port()), *QUIET, "-v"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    assert records and all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    assert any(r["level"] == "DEBUG" and "dead letter" in r["message"] for r in records)  # -v after the command
    assert any("serving /metrics" in r["message"] for r in records)
    assert "\r" not in done.stderr  # no progress bar when stderr is not a terminal
    version = subprocess.run([sys.executable, "-m", "stream_cl", "--version"], capture_output=True, text=True)
    assert version.stdout.startswith("stream-cl ")


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--device", "tpu"], "device must be auto, cpu, cuda, cuda:N or mps"),
        (["--until-idle", "-1"], "--until-idle: must be > 0"),
        (["--seed", "-1"], "--seed: must be >= 0"),
        (["--config", "BAD_YAML"], "not valid YAML"),
    ],
)
def test_bad_settings_are_one_line_usage_errors(
    args: list[str], says: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("batch_size: [1,\n  nope: {\n")
    args = [str(bad) if a == "BAD_YAML" else a for a in args]
    assert main(["run", "--metrics-port", "0", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("stream-cl: error:") and "\n" not in err and says in err, err


def test_without_a_probe_set_accuracy_and_forgetting_are_not_available(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    stream = write_stream(tmp_path / "s.rec.gz", n_classes=2, per_class=10)
    out = tmp_path / "summary.json"
    assert main(["run", "--source", str(stream), "--metrics-port", "0", *QUIET, "--summary-json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "final average accuracy    n/a" in printed and "average forgetting        n/a" in printed
    summary = json.loads(out.read_text())
    assert summary["final_accuracy"] is None and summary["forgetting"] is None


def test_the_progress_bar_of_a_file_estimates_its_total(tmp_path: Path) -> None:
    stream = write_stream(tmp_path / "s.rec.gz", n_classes=4, per_class=5000)
    bar = tqdm(total=None, file=io.StringIO(), disable=False)
    estimates = []
    with RecordedSource(stream) as source:
        while not source.exhausted:
            _advance(bar, len(source.poll(0.0, 500)), source, estimate_total=True)
            estimates.append(bar.total)
    assert estimates[0] is not None and 10_000 < estimates[0] <= 20_000  # an estimate from the first batch
    assert estimates[-1] == bar.n == 20_000


def test_an_unreachable_broker_is_one_line_and_exit_1() -> None:
    cmd = [sys.executable, "-m", "stream_cl", "run", "--source", f"kafka://127.0.0.1:{free_port()}/t",
           "--metrics-port", "0", *QUIET]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]  # the Kafka client's retries stay quiet
    assert done.stderr.startswith("stream-cl: error: cannot reach Kafka at 127.0.0.1:")


def test_a_redis_buffer_that_cannot_be_reached_at_start_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The error comes at start, before the first record (a topic may have none for a long time)."""
    url = f"redis://app:hunter2@127.0.0.1:{free_port()}/0"
    assert main(["run", "--buffer", url, "--metrics-port", "0", *QUIET]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("stream-cl: error: cannot reach the Redis buffer at redis://app:***@127.0.0.1:")
    assert "\n" not in err and "hunter2" not in err
