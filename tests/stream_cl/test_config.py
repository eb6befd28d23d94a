"""Service settings: flags > STREAMCL_* environment > file > defaults; bad settings fail at load time."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from stream_cl.cli import main
from stream_cl.config import Config, KafkaConfig, masked


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("STREAMCL_") and key != "STREAMCL_TEST_THREADS":
            monkeypatch.delenv(key)


def effective(capsys: pytest.CaptureFixture, *argv: str) -> dict:
    assert main(["serve", *argv, "--print-config"]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_flags_override_environment_which_overrides_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text(
        "method: er\nbatch_size: 32\nbuffer-size: 100\n"
        "checkpoint: {dir: /var/ckpt, every_records: 500}\nkafka: {session_timeout_ms: 2000}\n"
    )
    monkeypatch.setenv("STREAMCL_BATCH_SIZE", "16")
    monkeypatch.setenv("STREAMCL_CHECKPOINT_EVERY_RECORDS", "250")
    monkeypatch.setenv("STREAMCL_NO_PROGRESS", "true")
    monkeypatch.setenv("STREAMCL_HPARAM", "lr=0.1,replay_batch_size=4")
    got = effective(capsys, "--config", str(config), "--batch-size", "8")
    assert got["batch_size"] == 8  # flag beats environment and file
    assert got["checkpoint_every_records"] == 250  # environment beats file
    assert got["buffer_size"] == 100 and got["checkpoint_dir"] == "/var/ckpt"  # file beats default
    assert got["kafka_session_timeout_ms"] == 2000 and got["no_progress"] is True
    assert got["probe_fraction"] == 0.05  # untouched default
    assert got["hparam"] == [["lr", 0.1], ["replay_batch_size", 4]]


def test_toml_file_and_secrets_are_masked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    config = tmp_path / "serve.toml"
    config.write_text(
        'buffer = "redis://app:hunter2@redis:6379/0"\n[kafka]\nsecurity_protocol = "SASL_SSL"\n'
        'sasl_mechanism = "PLAIN"\nsasl_username = "svc"\n'
    )
    monkeypatch.setenv("STREAMCL_KAFKA_SASL_PASSWORD", "s3cret")
    got = effective(capsys, "--config", str(config))
    assert got["kafka_sasl_password"] == "***" and got["kafka_sasl_username"] == "svc"
    assert got["buffer"] == "redis://app:***@redis:6379/0"
    assert "hunter2" not in str(got) and "s3cret" not in str(got)


@pytest.mark.parametrize(
    ("content", "env", "message"),
    [
        ("bach_size: 3\n", {}, "unknown setting"),
        ("", {"STREAMCL_BATCH_SIZE": "0"}, "batch_size in environment"),
        ("method: nope\n", {}, "not one of"),
        ("overload_policy: subsample\n", {}, "needs max_lag"),
        ("kafka: {security_protocol: SASL_SSL}\n", {}, "sasl_mechanism is required"),
        ("checkpoint_every_records: 10\n", {}, "needs checkpoint_dir"),
        ("- a list\n", {}, "expected a mapping"),
    ],
)
def test_bad_settings_fail_at_load_time(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    content: str,
    env: dict,
    message: str,
) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text(content)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(["serve", "--config", str(config), "--print-config"]) == 2
    assert message in capsys.readouterr().err


def test_sections_and_kafka_client_options() -> None:
    cfg = Config.from_mapping(
        {"predictions": "out.jsonl", "predictions_for": "all", "max_lag": 5, "overload_policy": "predict-only"}
    )
    assert (cfg.predictions.url, cfg.predictions.which) == ("out.jsonl", "all")
    assert (cfg.overload.policy, cfg.overload.max_lag) == ("predict-only", 5)
    sasl = KafkaConfig("SASL_SSL", "SCRAM-SHA-512", "u", "p", ssl_cafile="/ca.pem")
    assert sasl.client_options() == {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "u",
        "sasl_plain_password": "p",
        "ssl_cafile": "/ca.pem",
    }
    assert masked({"x_password": None, "token": "t"}) == {"x_password": None, "token": "***"}


def test_unknown_environment_variables_are_only_warned_about(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    """Orchestrators inject variables such as STREAMCL_SERVICE_HOST: a typo in a file fails, the environment warns."""
    monkeypatch.setenv("STREAMCL_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("STREAMCL_BATCH_SIZE", "7")
    got = effective(capsys, "--metrics-port", "0")
    assert got["batch_size"] == 7
    assert "STREAMCL_SERVICE_HOST" in caplog.text


def test_run_takes_a_config_file_and_the_environment_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("batch_size: 32\nlearner: {seed: 5}\n")
    monkeypatch.setenv("STREAMCL_PROBE_FRACTION", "0.1")
    assert main(["run", "--config", str(config), "--print-config", "--max-records", "9"]) == 0
    got = yaml.safe_load(capsys.readouterr().out)
    assert (got["batch_size"], got["probe_fraction"], got["max_records"]) == (32, 0.1, 9)
    assert "checkpoint_dir" not in got  # run is serve without checkpoints


@pytest.mark.parametrize(
    "url",
    [
        "redis://app:hunter2@redis:6379/0",
        "rediss://redis:6379/0?password=hunter2",
        "rediss://redis:6379/0?ssl_password=hunter2&name=b",
    ],
)
def test_every_form_of_redis_credential_is_masked(
    url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("STREAMCL_BUFFER", url)
    got = effective(capsys)
    assert "hunter2" not in got["buffer"] and "***" in got["buffer"]
