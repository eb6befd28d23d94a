"""``stream-cl bench scaleout``: its setups, one real group run measured, and the report written from it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from stream_cl.bench.scaleout import Setup, _measure, _stream, setups
from stream_cl.bench.scaleout_report import write_report
from tests.fixtures.redis import RedisServer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_one_worker_is_the_reference_then_each_group_size_by_every_synchronisation() -> None:
    names = [s.name for s in setups([2, 4], [1, 10])]
    assert names == [
        "1 worker",
        "2 workers, all-reduce",
        "2 workers, average every 1",
        "2 workers, average every 10",
        "4 workers, all-reduce",
        "4 workers, average every 1",
        "4 workers, average every 10",
    ]


def test_a_group_run_is_measured_and_reported(redis_server: RedisServer, tmp_path: Path) -> None:
    stream, held_out = _stream(60)  # 100 records of the shipped stream: 90 streamed, 10 held out
    assert (len(stream), len(held_out)) == (90, 10)
    args = argparse.Namespace(batch_size=10, buffer_size=50, device="cpu")
    row = _measure("mlp", Setup(2, "average", 2), stream, held_out, redis_server.url, args, tmp_path / "run")
    assert row["records"] == 90 and row["same_model"] and row["setup"] == "2 workers, average every 2"
    assert row["group_steps"] == 5  # 45 records per worker in batches of 10
    assert row["records_per_s"] > 0 and row["sync_ms_per_step"] > 0 and row["held_out"] == 10
    assert 0 <= row["final_accuracy"] <= 1 and 0 <= row["online_accuracy"] <= 1
    settings = {"models": ["mlp"], "stride": [60], "workers": [2], "average_every": [2], "repeats": 1}
    settings |= {"device": "cpu", "batch_size": 10, "buffer_size": 50, "handler": print}
    write_report(tmp_path / "report", settings, [row | {"repeats": 1, "stride": 60}])
    doc = json.loads((tmp_path / "report" / "results.json").read_text())
    assert doc["rows"][0]["records"] == 90 and "handler" not in doc["settings"] and doc["provenance"]
    readme = (tmp_path / "report" / "README.md").read_text()
    assert "`stream-cl bench scaleout --models mlp --stride 60 --workers 2 --average-every 2 --repeats 1`" in readme
    assert "| MLP (stride 60) | 2 workers, average every 2 | 90 | 5 |" in readme
    assert (tmp_path / "report" / "scaleout.png").read_bytes().startswith(PNG_MAGIC)
