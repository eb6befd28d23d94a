"""``stream-cl bench throughput``: the quick run writes its report; path (c) runs on real Kafka and Redis."""

from __future__ import annotations

import json

import pytest
import redis
import torch

from stream_cl.bench.perf.data import Case, batched_messages, make_stream, messages
from stream_cl.bench.perf.service_path import run_service
from stream_cl.bench.perf.services import produce
from stream_cl.bench.provenance import provenance
from stream_cl.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_quick_run_writes_json_markdown_and_plots(tmp_path) -> None:
    out = tmp_path / "report"
    assert main(["bench", "throughput", "--quick", "--out", str(out), "--no-progress"]) == 0
    result = json.loads((out / "throughput.json").read_text())
    assert [c["case"]["name"] for c in result["cases"]] == ["er-resnet", "er-mlp"]
    assert result["provenance"] == provenance()
    for case in result["cases"]:
        assert set(case["paths"]) == {"a", "learner", "b", "b+prefetch", "b-batched10", "b-batched100"}
        steps = case["case"]["n_records"] // case["case"]["batch_size"]
        for path in case["paths"].values():
            assert path["steps"] == steps  # every record went through one learner step, in every path
            assert path["samples_per_second"] > 0
            assert path["step_latency_ms"]["p50"] <= path["step_latency_ms"]["p99"]
        assert set(case["ratios"]) == {"learner/a", "b/a", "b+prefetch/a", "b-batched10/a", "b-batched100/a"}
        assert (
            case["ratios"]["b-batched10/a"]["goal"]
            == case["ratios"]["b/a"]["goal"]
            == ">= " + str({"er-resnet": 1.0, "er-mlp": 0.9}[case["case"]["name"]])
        )
    memory = result["memory"]
    assert memory["records"] == 2000 and memory["rss_end_mib"] > 0
    assert len(memory["trace"]["records"]) == len(memory["trace"]["rss_mib"]) > 2
    markdown = (out / "README.md").read_text()
    assert "| b/a |" in markdown and "GPU:" in markdown
    for png in ("throughput.png", "latency.png", "memory_rss.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("client", ["kafka-python", "librdkafka"])
def test_service_path_learns_every_record_from_kafka_into_redis(
    kafka_bootstrap, redis_server, tmp_path, client: str
) -> None:
    case = Case("tiny", "er", "mlp", "features", n_records=60, n_classes=3, dim=4, buffer_size=20)
    stream = make_stream(case, None)
    topic = f"bench-tiny-{client}"
    assert produce(kafka_bootstrap, topic, messages(stream, topic)) == 60
    store = redis.Redis.from_url(redis_server.url)
    earlier = set(store.keys("*bench-*"))  # the server is shared by the session
    times, checkpoints = run_service(
        case,
        bootstrap=kafka_bootstrap,
        topic=topic,
        redis_url=redis_server.url,
        n_records=60,
        device=torch.device("cpu"),
        workdir=tmp_path,
        session_timeout_ms=2000,
        heartbeat_interval_ms=500,
        kafka_client=client,
    )
    assert sum(times.sizes) == 60
    assert checkpoints >= 1  # the final checkpoint is always written
    assert set(store.keys("*bench-*")) - earlier  # the replay buffer lived in Redis


def test_service_path_learns_every_sample_of_batched_messages(kafka_bootstrap, redis_server, tmp_path) -> None:
    case = Case("tiny", "er", "mlp", "features", n_records=60, n_classes=3, dim=4, buffer_size=20)
    stream = make_stream(case, None)
    assert produce(kafka_bootstrap, "bench-tiny-x7", batched_messages(stream, "bench-tiny-x7", 7)) == 9
    times, _ = run_service(
        case,
        bootstrap=kafka_bootstrap,
        topic="bench-tiny-x7",
        redis_url="memory",
        n_records=60,
        device=torch.device("cpu"),
        workdir=tmp_path,
        session_timeout_ms=2000,
        heartbeat_interval_ms=500,
        drift=False,
    )
    assert sum(times.sizes) == 60
    assert max(times.sizes) <= case.batch_size  # learner batches are cut mid-message, as configured
