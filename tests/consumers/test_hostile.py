"""The decoder against hostile input: every message returns, with the exact reason it must get."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from consumers.record import DeadLetter, Message, Position, Record
from consumers.recorded import write_messages
from consumers.wire import REASONS, decode
from tests.consumers.hostile import hostile_binary, hostile_json
from tests.consumers.streams import good_messages

CASES = [*((f"json-{n}", m, r) for n, m, r in hostile_json()), *((f"binary-{n}", m, r) for n, m, r in hostile_binary())]


@pytest.mark.parametrize(
    ("message", "reason"),
    [(m, r) for _, m, r in CASES],
    ids=[name for name, _, _ in CASES],
)
def test_hostile_message_gets_its_reason(message: Message, reason: str | None) -> None:
    result = decode(message)
    if reason is None:
        assert isinstance(result, Record), result
    else:
        assert isinstance(result, DeadLetter), result
        assert (result.reason, result.message) == (reason, message), result.detail
        assert reason in REASONS and len(result.detail) <= 200


def test_recorded_file_of_hostile_and_good_records_learns_the_good_ones(tmp_path: Path) -> None:
    good = good_messages(40)  # 4x4x1 uint8, as every accepted hostile entry of that layout
    accepted, dead = [], Counter()
    for _, message, reason in CASES:
        if reason is not None:
            dead[reason] += 1
        elif (record := decode(message)).x.shape == (4, 4, 1) and record.x.dtype.name == "uint8":
            accepted.append(message)
    hostile = [m for _, m, r in CASES if r is not None]
    ordered = [*good[:20], *hostile, *accepted, *good[20:]]
    stream = tmp_path / "hostile.rec.gz"
    write_messages(
        stream, [replace(m, position=Position("src", 0, i), timestamp=float(i)) for i, m in enumerate(ordered)]
    )
    out = tmp_path / "summary.json"
    args = ["run", "--source", str(stream), "--summary-json", str(out), "--metrics-port", "0", "--no-progress"]
    done = subprocess.run(
        [sys.executable, "-m", "stream_cl", *args, "--probe-fraction", "0", "--width", "16"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(out.read_text())
    assert summary["dead_letter"] == dict(dead)
    unlabelled = sum(decode(m).label is None for m in accepted)
    assert (summary["learned"], summary["predicted"]) == (len(good) + len(accepted) - unlabelled, unlabelled)
    assert unlabelled == 1 and len(accepted) > 10


def test_kafka_source_turns_hostile_records_into_dead_letters_and_keeps_fetching(
    kafka_bootstrap: str, make_topic
) -> None:
    from consumers.kafka import KafkaSource
    from consumers.producer import produce_messages
    from tests.fixtures.kafka import FAST_GROUP

    topic = make_topic(1)
    hostile = [(m, r) for _, m, r in CASES if r is not None and len(m.value) < 900_000]  # under the broker's limit
    good = good_messages(10)
    produce_messages(kafka_bootstrap, topic, [*good[:5], *(m for m, _ in hostile), *good[5:]])
    polled = []
    deadline = time.monotonic() + 30
    with KafkaSource(kafka_bootstrap, topic, "hostile", **FAST_GROUP) as source:
        while sum(map(len, polled)) < len(good) + len(hostile) and time.monotonic() < deadline:
            polled.append(source.poll(0.5, 500))
    assert [r.id for p in polled for r in p.records] == [m.key.decode() for m in good]
    assert [(d.message.value, d.reason) for p in polled for d in p.dead_letters] == [(m.value, r) for m, r in hostile]
