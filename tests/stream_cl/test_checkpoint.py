"""Checkpoint files (atomic, verified, pruned) and resuming a run from one without skips or repeats."""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from consumers.recorded import RecordedSource
from monitoring.metrics import Metrics
from monitoring.prequential import PrequentialAccuracy
from monitoring.probe import ProbeSet
from stream_cl.build import build_learner
from stream_cl.checkpoint import CheckpointError, CheckpointStore
from stream_cl.checkpointer import Checkpointer, restore
from stream_cl.errors import ConfigError
from stream_cl.learner import Batch
from stream_cl.run import RunOptions, RunParts, run_stream
from tests.stream_cl.test_serve_kafka import BAD, lines, produce, serve, wait_until
from tests.streams import write_stream

IDENTITY = {"method": "er", "model": "mlp", "width": 32}


def test_ids_grow_and_old_ones_are_pruned(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=2, layout=None)  # any payload: the store alone
    for i in range(4):
        store.write({"i": torch.tensor(i)})
    assert [c.id for c in store.list()] == [3, 4]
    info, payload = store.latest()
    assert (info.id, int(payload["i"]), payload["format"]) == (4, 3, 1)
    # plain torch.load with weights_only works on the file itself: no pickled objects inside
    assert int(torch.load(info.path, weights_only=True)["i"]) == 3


def test_a_reader_beside_a_writer_skips_a_checkpoint_pruned_after_the_listing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = CheckpointStore(tmp_path, keep=3, layout=None)
    for i in range(2):
        store.write({"i": torch.tensor(i)})
    first, second = store.list()
    listed = [first.path, second.path]
    monkeypatch.setattr(type(tmp_path), "iterdir", lambda self: iter(listed))
    first.path.unlink()  # the writer prunes it between the reader's listing and its stat
    assert [c.id for c in store.list()] == [second.id]
    info, payload = store.latest()
    assert (info.id, int(payload["i"])) == (second.id, 1)


def test_truncated_or_corrupted_newest_falls_back_to_previous(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=3, layout=None)
    for i in range(3):
        store.write({"i": torch.tensor(i)})
    newest, middle, _ = reversed(store.list())
    newest.path.write_bytes(newest.path.read_bytes()[: newest.size // 2])
    data = bytearray(middle.path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    middle.path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        store.load(newest)
    info, payload = store.latest()
    assert (info.id, int(payload["i"])) == (1, 0)


def test_stale_temp_files_are_removed_and_never_listed(tmp_path: Path) -> None:
    (tmp_path / ".ckpt-abc.tmp").write_bytes(b"half a checkpoint")
    assert CheckpointStore(tmp_path).list() == [] and list(tmp_path.glob("*.tmp"))  # a reader leaves them alone
    store = CheckpointStore(tmp_path, sweep=True)  # the writer sweeps them at its start
    assert store.list() == [] and not list(tmp_path.glob("*.tmp"))
    assert store.latest() is None


def _learn(path: Path, store: CheckpointStore, max_records: int | None) -> tuple[object, object, PrequentialAccuracy]:
    make = partial(build_learner, "er", "mlp", device=torch.device("cpu"), seed=3, buffer_size=50, width=32)
    probe = ProbeSet(fraction=0.1, seed=3)
    accuracy = PrequentialAccuracy()  # its window, 1,000, holds the whole stream's verdicts
    state, restored = restore(store, make, IDENTITY, probe, accuracy)
    checkpointer = Checkpointer(
        store, identity=IDENTITY, every_records=70, restored=restored, probe=probe, accuracy=accuracy
    )
    offsets = restored.offsets if restored else {}
    with RecordedSource(path, start_offsets=offsets) as source:
        summary, state = run_stream(
            source,
            make,
            Metrics(CollectorRegistry()),
            RunOptions(batch_size=10, max_records=max_records, progress=False),
            RunParts(probe, accuracy=accuracy, checkpointer=checkpointer),
            state=state,
        )
    return summary, state, accuracy


def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tmp_path: Path) -> None:
    """Stop twice mid-stream, resume from the checkpoints: same model, learned total, probe results and online
    accuracy windows, bit for bit."""
    path = write_stream(tmp_path / "s.rec.gz", n_classes=4, per_class=60)
    whole, whole_state, whole_accuracy = _learn(path, CheckpointStore(tmp_path / "a"), None)
    store = CheckpointStore(tmp_path / "b")
    first, _, _ = _learn(path, store, 90)
    second, _, _ = _learn(path, store, 50)
    rest, state, accuracy = _learn(path, store, None)
    assert rest.learned_total == whole.learned_total == whole.learned
    assert first.learned + second.learned + rest.learned == whole.learned
    assert first.held_out + second.held_out + rest.held_out == whole.held_out > 0
    assert (rest.final_accuracy, rest.forgetting) == (whole.final_accuracy, whole.forgetting)
    for name, tensor in whole_state.learner.model.state_dict().items():
        assert torch.equal(tensor, state.learner.model.state_dict()[name]), name
    assert accuracy.levels == whole_accuracy.levels == [0]
    assert accuracy.windowed(0) == whole_accuracy.windowed(0)  # the gauge goes on as if never stopped
    assert torch.equal(accuracy.state_dict()["levels"][0][1], whole_accuracy.state_dict()["levels"][0][1])
    _, payload = store.latest()
    assert payload["offsets"] == [["test", 0, 240]] and payload["learned_total"] == whole.learned


def test_restore_refuses_another_method_or_model(tmp_path: Path) -> None:
    path = write_stream(tmp_path / "s.rec.gz", n_classes=2, per_class=10)
    store = CheckpointStore(tmp_path / "c")
    _learn(path, store, None)
    make = partial(build_learner, "er", "mlp", device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="configured as"):
        restore(store, make, {**IDENTITY, "width": 64})


def test_a_restart_takes_the_configured_learning_rate_and_all_else_from_the_checkpoint(tmp_path: Path) -> None:
    path = write_stream(tmp_path / "s.rec.gz", n_classes=3, per_class=20)
    store = CheckpointStore(tmp_path / "c")

    def make(lr: float) -> Callable:
        return partial(
            build_learner, "er", "mlp", device=torch.device("cpu"), seed=3, buffer_size=50, width=32, hparams={"lr": lr}
        )

    checkpointer = Checkpointer(store, identity=IDENTITY, every_records=10)
    with RecordedSource(path) as source:
        _, trained = run_stream(
            source,
            make(0.05),
            Metrics(CollectorRegistry()),
            RunOptions(batch_size=10, progress=False),
            RunParts(ProbeSet(fraction=0.0), checkpointer=checkpointer),
        )
    unchanged, _ = restore(store, make(0.05), IDENTITY)
    assert [g["lr"] for g in unchanged.learner.optimizer.param_groups] == [0.05, 0.05]  # the backbone's, the heads'
    state, _ = restore(store, make(0.001), IDENTITY)  # --hparam lr=0.001
    assert [g["lr"] for g in state.learner.optimizer.param_groups] == [0.001, 0.001]
    assert state.learner.lr == 0.001
    for name, tensor in trained.learner.model.state_dict().items():
        assert torch.equal(tensor, state.learner.model.state_dict()[name]), name


def test_a_learning_rate_the_method_schedules_goes_on_from_the_checkpoint(tmp_path: Path) -> None:
    hparams = {"batch_size": 4, "online_iter": 1.5, "lr": 0.01, "lr_decay": 0.5}
    make = partial(build_learner, "er-hle", "mlp", device=torch.device("cpu"), buffer_size=6, width=16, hparams=hparams)
    learner = make((8, 8, 3), np.dtype("uint8"))
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (8, 8, 8, 3), dtype=np.uint8))
    learner.observe(Batch(x, [("a",), ("b",)] * 4))
    decayed = learner.optimizer.param_groups[0]["lr"]
    assert decayed < 0.01  # halved at every update since the last new class
    identity = {"method": "er-hle", "model": "mlp", "width": 16}
    checkpoint = {"input_shape": [8, 8, 3], "input_dtype": "uint8", "offsets": [], "learned_total": 8}
    CheckpointStore(tmp_path).write({**checkpoint, "identity": identity, "learner": learner.state_dict()})
    state, _ = restore(CheckpointStore(tmp_path), make, identity)
    assert [g["lr"] for g in state.learner.optimizer.param_groups] == [decayed, decayed]


class FailingStore(CheckpointStore):
    """A store whose disk is full."""

    def write(self, payload: dict) -> None:
        raise OSError(28, "No space left on device")


def test_checkpoint_age_counts_unsaved_learning_and_keeps_growing_while_writes_fail(tmp_path: Path) -> None:
    path = write_stream(tmp_path / "s.rec.gz", n_classes=2, per_class=20)
    metrics = Metrics(CollectorRegistry())
    good = Checkpointer(CheckpointStore(tmp_path / "a"), identity=IDENTITY, every_records=10, metrics=metrics)
    assert good.unsaved_seconds() == 0.0
    _run_with(path, good, metrics)
    assert good.unsaved_seconds() == 0.0  # everything learned is saved: an idle stream reads 0
    failing = Checkpointer(FailingStore(tmp_path / "b"), identity=IDENTITY, every_records=10)
    with pytest.raises(OSError):
        _run_with(path, failing, Metrics(CollectorRegistry()))
    waited = failing.unsaved_seconds()
    time.sleep(0.05)
    assert waited > 0 and failing.unsaved_seconds() > waited  # not reset by the failed writes


def _run_with(path: Path, checkpointer: Checkpointer, metrics: Metrics) -> None:
    make = partial(build_learner, "er", "mlp", device=torch.device("cpu"), seed=0, width=8)
    with RecordedSource(path) as source:
        run_stream(source, make, metrics, RunOptions(progress=False), RunParts(checkpointer=checkpointer))


def test_learning_just_before_the_stream_goes_quiet_is_checkpointed_on_time_not_with_the_next_record(
    kafka_bootstrap: str, make_topic: Callable[..., str], tmp_path: Path
) -> None:
    topic = make_topic(1)
    store = CheckpointStore(tmp_path / "ckpt")

    def saved_up_to(offset: int) -> Callable[[], bool]:
        def saved() -> bool:
            found = store.latest()
            return found is not None and found[1]["offsets"] == [[topic, 0, offset]]

        return saved

    produce(kafka_bootstrap, topic, 20)
    proc = serve(kafka_bootstrap, topic, tmp_path, "quiet", "--checkpoint-every-seconds", 3)
    log = tmp_path / "quiet.log"
    try:
        wait_until(saved_up_to(20 + BAD), proc, log, timeout_s=60)  # saved while the stream is quiet
        produce(kafka_bootstrap, topic, 20, start=20)  # learned well within 3 s of that checkpoint: none due
        wait_until(lambda: lines(tmp_path / "quiet.jsonl") == 40, proc, log)
        wait_until(saved_up_to(40 + 2 * BAD), proc, log, timeout_s=15)  # with no further record to wait for
    finally:
        proc.kill()  # kill -9 during the quiet time: nothing learned is lost
        proc.wait()
    _, payload = store.latest()
    assert payload["learned_total"] == 40
