"""File → learner replay is deterministic; ``stream-cl produce`` and ``run --dead-letter-out`` work on files."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from consumers.produce import dataset_messages
from consumers.recorded import RecordedSource, read_messages, write_messages
from consumers.wire import REASONS, decode, decode_samples
from monitoring.metrics import Metrics
from monitoring.probe import ProbeSet
from stream_cl.build import build_learner
from stream_cl.cli import main
from stream_cl.run import RUN_REASONS, RunOptions, RunParts, run_stream
from tests.consumers.streams import bad_messages, tiny_dataset

TIMING = ("elapsed_seconds", "samples_per_second")


def _replay(path: Path, seed: int) -> tuple[dict, np.ndarray]:
    make_learner = partial(build_learner, "er", "mlp", device=torch.device("cpu"), seed=seed, buffer_size=40, width=16)
    metrics = Metrics(CollectorRegistry(), dead_letter_reasons=REASONS + RUN_REASONS)
    options = RunOptions(batch_size=10, probe_every=50, progress=False)
    with RecordedSource(path) as source:
        summary, state = run_stream(source, make_learner, metrics, options, RunParts(ProbeSet(fraction=0.1, seed=seed)))
    probe = torch.from_numpy(tiny_dataset(32, seed=99).x)
    predictions = state.learner.predict(probe).classes.numpy()
    return {k: v for k, v in vars(summary).items() if k not in TIMING}, predictions


def test_same_file_same_seed_same_predictions_and_metrics(tmp_path: Path) -> None:
    path = tmp_path / "s.rec.gz"
    write_messages(path, dataset_messages(tiny_dataset(200), "tiny", fmt="json", order="shuffled"))
    first, second = _replay(path, seed=3), _replay(path, seed=3)
    assert first[0]["learned"] > 150 and first[0]["held_out"] > 0
    assert first[0] == second[0]
    np.testing.assert_array_equal(first[1], second[1])
    other = _replay(path, seed=4)  # the check can fail: another seed gives another model
    assert not np.array_equal(first[1], other[1]) or first[0] != other[0]


def test_dataset_messages_orders_and_formats() -> None:
    data = tiny_dataset(60)
    ci = list(dataset_messages(data, "d", fmt="binary", order="class-incremental", limit=40, seed=1))
    labels = [data.y[int(m.key.decode().split("-")[1])] for m in ci]
    assert len(ci) == 40 and labels == sorted(labels)
    assert [m.position.offset for m in ci] == list(range(40)) and ci[1].timestamp == 0.001
    js = list(dataset_messages(data, "d", fmt="json", order="shuffled", seed=1))
    assert sorted(m.key for m in js) == sorted(f"d-{i}".encode() for i in range(60))
    assert dict(js[0].headers)["content-type"] == b"application/json"


def _write_fashion_mnist(directory: Path, n: int = 60) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    head = (0x0803).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in images.shape)
    (directory / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(head + images.tobytes()))
    head = (0x0801).to_bytes(4, "big") + n.to_bytes(4, "big")
    (directory / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(head + labels.tobytes()))


def test_cli_produce_then_run_twice_with_dead_letters(tmp_path: Path) -> None:
    _write_fashion_mnist(tmp_path)
    stream = tmp_path / "fm.rec.gz"
    argv = ["produce", "fashion-mnist", "--data-dir", str(tmp_path), "--to", str(stream), "--format", "json"]
    assert main([*argv, "--limit", "50", "--order", "shuffled"]) == 0
    messages = list(read_messages(stream))
    assert len(messages) == 50
    assert json.loads(messages[0].value)["y"][0] in ("clothing", "footwear", "accessory")
    mixed = tmp_path / "mixed.rec.gz"
    write_messages(mixed, [*messages, *bad_messages("fashion-mnist-train").values()])

    bad = bad_messages("fashion-mnist-train").values()
    expected = Counter(decode(m).reason for m in bad)  # default size limit: the 'oversized' one is just headerless

    def run(tag: str) -> dict:
        out, dead = tmp_path / f"{tag}.json", tmp_path / f"{tag}.dlq.rec.gz"
        args = ["run", "--source", str(mixed), "--metrics-port", "0", "--no-progress", "--width", "16"]
        assert main([*args, "--summary-json", str(out), "--dead-letter-out", str(dead)]) == 0
        letters = list(read_messages(dead))
        assert Counter(dict(m.headers)["reason"].decode() for m in letters) == expected
        assert sorted(m.value for m in letters) == sorted(m.value for m in bad)
        return {k: v for k, v in json.loads(out.read_text()).items() if k not in TIMING}

    first = run("a")
    assert first["dead_letter"] == dict(expected)
    assert first["learned"] + first["held_out"] == 50
    assert first == run("b")  # replaying the same file with the same seed gives the same run


def test_batched_messages_carry_the_same_samples_in_the_same_order() -> None:
    data = tiny_dataset(45)
    for fmt in ("binary", "json"):
        single = [decode(m) for m in dataset_messages(data, "d", fmt=fmt, order="shuffled", seed=2)]
        batched = list(dataset_messages(data, "d", fmt=fmt, order="shuffled", seed=2, samples_per_message=8))
        assert [m.position.offset for m in batched] == list(range(6))  # 5 of 8 samples, then one of 5
        assert [m.timestamp for m in batched[:2]] == [0.0, 0.008]  # of the first sample: rate is per sample
        samples = [r for m in batched for r in decode_samples(m)]
        assert [(r.id, r.label) for r in samples] == [(r.id, r.label) for r in single]
        for one, many in zip(single, samples, strict=True):
            np.testing.assert_array_equal(one.x, many.x)


def test_cli_produce_batched_then_run_learns_as_from_single_sample_messages(tmp_path: Path) -> None:
    _write_fashion_mnist(tmp_path)
    summaries = []
    variants = (("1", "binary"), ("7", "binary"), ("7", "json"), ("7", "binary", "--prefetch", "2"))
    for per_message, fmt, *more in variants:
        stream = tmp_path / f"fm-{per_message}-{fmt}.rec.gz"
        argv = ["produce", "fashion-mnist", "--data-dir", str(tmp_path), "--to", str(stream), "--format", fmt]
        assert main([*argv, "--limit", "50", "--samples-per-message", per_message]) == 0
        assert len(list(read_messages(stream))) == (50 if per_message == "1" else 8)
        out = tmp_path / f"{per_message}-{fmt}-{len(more)}.json"
        args = ["run", "--source", str(stream), "--metrics-port", "0", "--no-progress", "--width", "16"]
        assert main([*args, *more, "--summary-json", str(out)]) == 0
        summaries.append({k: v for k, v in json.loads(out.read_text()).items() if k not in TIMING})
    assert summaries[0]["learned"] + summaries[0]["held_out"] == 50
    assert all(s == summaries[0] for s in summaries[1:])  # same samples, same batches, same seed: same run
    with pytest.raises(SystemExit, match="2"):
        main(["produce", "fashion-mnist", "--data-dir", str(tmp_path), "--to", "x", "--samples-per-message", "0"])
