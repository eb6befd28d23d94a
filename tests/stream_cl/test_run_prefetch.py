"""``stream-cl run --prefetch``: reading ahead on a thread changes nothing the run learns."""

from __future__ import annotations

import json

from stream_cl.cli import main

RUN = ["run", "--max-records", "300", "--metrics-port", "0", "--no-progress", "--no-drift", "--probe-every", "100"]


def test_prefetched_run_learns_exactly_what_the_plain_run_learns(tmp_path) -> None:
    plain, ahead = tmp_path / "plain.json", tmp_path / "ahead.json"
    assert main([*RUN, "--summary-json", str(plain)]) == 0
    assert main([*RUN, "--prefetch", "3", "--summary-json", str(ahead)]) == 0
    a, b = json.loads(plain.read_text()), json.loads(ahead.read_text())
    for key in ("learned", "held_out", "predicted", "dead_letter", "online_accuracy", "final_accuracy", "classes_seen"):
        assert a[key] == b[key], key
    assert a["learned"] + a["held_out"] == 300


def test_negative_prefetch_is_rejected(capsys) -> None:
    assert main([*RUN, "--prefetch", "-1"]) != 0
    assert "--prefetch: must be >= 0" in capsys.readouterr().err
