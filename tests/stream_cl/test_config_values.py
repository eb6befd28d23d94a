"""Settings of the wrong type or out of range fail at start as one-line usage errors (exit 2), never later:
a file's ``off`` or list for a string setting, an empty required string, a non-finite number or
hyper-parameter, a duration the drain's watchdog cannot wait, a device torch cannot parse, a buffer too
large to allocate."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import pytest
import torch
import yaml

from stream_cl.cli import main
from stream_cl.config import MAX_BUFFER_SIZE, MAX_SECONDS, Config, load
from stream_cl.device import pick_device
from stream_cl.service import stop_on_signals


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("STREAMCL_") and key != "STREAMCL_TEST_THREADS":
            monkeypatch.delenv(key)


def usage_error(capsys: pytest.CaptureFixture, *argv: str) -> str:
    """The one line ``serve ARGV --print-config`` prints when it exits with code 2."""
    assert main(["serve", *argv, "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("stream-cl: error:") and "\n" not in err, err
    return err


def effective(capsys: pytest.CaptureFixture, *argv: str) -> dict:
    assert main(["serve", *argv, "--print-config"]) == 0
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize(
    ("name", "content", "says"),
    [
        ("a.yaml", "checkpoint_dir: off\n", "checkpoint_dir in config file"),  # YAML 1.1 reads off as False
        ("b.yaml", "group: [a, b]\n", "group in config file"),
        ("c.yaml", "metrics_addr: 0\n", "metrics_addr in config file"),
        ("d.toml", "predictions = true\n", "predictions in config file"),
    ],
)
def test_a_file_value_of_the_wrong_type_for_a_string_setting_is_an_error(
    name: str, content: str, says: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config = tmp_path / name
    config.write_text(content)
    err = usage_error(capsys, "--config", str(config))
    assert says in err


@pytest.mark.parametrize("variable", ["STREAMCL_METRICS_ADDR", "STREAMCL_GROUP", "STREAMCL_BUFFER"])
def test_an_empty_required_string_is_an_error(
    variable: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """An empty bind address would serve /metrics on every interface, an empty group is no consumer group."""
    monkeypatch.setenv(variable, " ")
    err = usage_error(capsys)
    assert f"{variable.removeprefix('STREAMCL_').lower()} in environment: must not be empty" in err


def test_an_empty_optional_string_unsets_it_and_an_empty_drift_runs_no_detectors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("STREAMCL_CHECKPOINT_DIR", "")
    monkeypatch.setenv("STREAMCL_DRIFT", "")
    got = effective(capsys)
    assert got["checkpoint_dir"] is None and got["drift"] == ""
    # from Python a path is as good as its string
    assert Config.from_mapping({"checkpoint_dir": tmp_path}).checkpoint.dir == str(tmp_path)


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--hparam", "lr=nan"], "--hparam: must be finite numbers, got lr=nan"),
        (["--hparam", "replay_batch_size=4", "--hparam", "lr=-inf"], "got lr=-inf"),
        (["--drain-timeout", "1e10"], "--drain-timeout: must be > 0 and at most"),
        (["--drain-timeout", "inf"], "--drain-timeout: must be a finite number"),
        (["--until-idle", "inf"], "--until-idle: must be a finite number"),
        (["--label-ttl-seconds", "inf"], "--label-ttl-seconds: must be a finite number"),
        (["--label-ttl-seconds", "1e12"], "--label-ttl-seconds: must be > 0 and at most"),
        (["--checkpoint-every-seconds", "nan"], "--checkpoint-every-seconds: must be a finite number"),
        (["--subsample-fraction", "inf"], "--subsample-fraction: must be a finite number"),
        (["--subsample-fraction", "2"], "--subsample-fraction: must be in (0, 1]"),
        (["--device", "cpu:x"], "device must be auto, cpu, cuda, cuda:N or mps, got 'cpu:x'"),
        (["--device", "cuda:abc"], "got 'cuda:abc'"),
        (["--buffer-size", "100000000000"], "--buffer-size: must be > 0 and at most 100,000,000"),
    ],
)
def test_out_of_range_numbers_and_devices_fail_at_start(
    argv: list[str], says: str, capsys: pytest.CaptureFixture
) -> None:
    assert says in usage_error(capsys, *argv)


def test_a_hyper_parameter_file_with_an_infinity_fails_at_start(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text("hparam: {lr: .inf}\n")
    assert "hparam in config file" in usage_error(capsys, "--config", str(config))


def test_the_largest_accepted_values_are_usable() -> None:
    cfg = load({"drain_timeout": str(MAX_SECONDS), "buffer_size": str(MAX_BUFFER_SIZE), "device": "cpu:0"}, {})
    assert (cfg.service.drain_timeout, cfg.buffer.size, cfg.learner.device) == (MAX_SECONDS, MAX_BUFFER_SIZE, "cpu:0")


def test_the_drain_watchdog_waits_the_longest_accepted_drain_timeout(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Above threading.TIMEOUT_MAX the watchdog's wait raised OverflowError in its thread: no drain bound at all."""
    failures: list[BaseException] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: failures.append(args.exc_value))
    stop = threading.Event()
    with caplog.at_level(logging.INFO, logger="stream_cl.serve"), stop_on_signals(stop, MAX_SECONDS):
        stop.set()  # as SIGTERM does: the watchdog starts waiting for the drain
        watchdog = next(t for t in threading.enumerate() if t.name == "drain-watchdog")
        watchdog.join(0.5)  # still waiting for the drain; a wait it cannot make would have ended it
        assert watchdog.is_alive() and not failures
    watchdog.join(5)
    assert not watchdog.is_alive() and not failures
    assert "stopping: draining" in caplog.text


def test_pick_device_refuses_a_bad_string_and_a_missing_gpu_index(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="got 'cpu:x'"):
        pick_device("cpu:x")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert pick_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ValueError, match="'cuda:1' requested but this machine has 1 CUDA device"):
        pick_device("cuda:1")
