"""Every command that talks to Kafka takes the same security settings, from flags, STREAMCL_KAFKA_* or a file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from consumers.datasets import LabelledArrays
from consumers.record import Message, Position
from consumers.recorded import write_messages
from stream_cl.cli import main
from stream_cl.commands import produce, record, replay

SASL = {
    "security_protocol": "SASL_SSL",
    "sasl_mechanism": "SCRAM-SHA-512",
    "sasl_plain_username": "svc",
    "sasl_plain_password": "s3cret",
    "ssl_cafile": "/etc/ca.pem",
}


@pytest.fixture(autouse=True)
def sasl_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("STREAMCL_") and key != "STREAMCL_TEST_THREADS":
            monkeypatch.delenv(key)
    monkeypatch.setenv("STREAMCL_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("STREAMCL_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("STREAMCL_KAFKA_SASL_USERNAME", "svc")
    monkeypatch.setenv("STREAMCL_KAFKA_SASL_PASSWORD", "s3cret")


def _capture(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    def fake(*args: Any, **kwargs: Any) -> int:
        seen.update(kwargs)
        return 0

    monkeypatch.setattr(module, name, fake)
    return seen


def test_record_replay_and_produce_pass_the_security_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = "kafka://127.0.0.1:9/t"
    flag = ["--kafka-ssl-cafile", "/etc/ca.pem"]
    seen = _capture(monkeypatch, record, "record_topic")
    assert main(["record", "--source", url, "--out", str(tmp_path / "o.rec.gz"), *flag]) == 0
    assert seen["client_options"] == SASL

    stream = tmp_path / "s.rec.gz"
    write_messages(stream, [Message(Position("s", 0, 0), 0.0, None, b"{}", ())])
    seen = _capture(monkeypatch, replay, "produce_messages")
    assert main(["replay", str(stream), "--to", url, "--compression", "zstd", *flag]) == 0
    assert seen["client_options"] == SASL and seen["compression"] == "zstd"

    images = tmp_path / "fm"
    images.mkdir()
    seen = _capture(monkeypatch, produce, "produce_messages")
    monkeypatch.setitem(produce.DATASETS, "fashion-mnist", lambda *_: _tiny_dataset())
    assert main(["produce", "fashion-mnist", "--data-dir", str(images), "--to", url, *flag]) == 0
    assert seen["client_options"] == SASL


def test_a_sasl_protocol_without_a_mechanism_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.delenv("STREAMCL_KAFKA_SASL_MECHANISM")
    assert main(["record", "--source", "kafka://127.0.0.1:9/t", "--out", "x.rec.gz"]) == 2
    assert "sasl_mechanism is required" in capsys.readouterr().err


def _tiny_dataset() -> LabelledArrays:
    return LabelledArrays(np.zeros((2, 4, 4, 1), np.uint8), np.array([0, 1]), ("a", "b"), np.array([0, 0]), ("all",))
