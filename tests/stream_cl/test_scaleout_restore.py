"""Workers of a group start from one checkpoint, and one checkpoint directory has one group: workers that restored
different checkpoints, and a second instance on a directory in use, fail before any of them opens its source.
Against the real broker (tansu) and a real ``torch.distributed`` group."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from kafka import KafkaAdminClient

from stream_cl.checkpoint import CheckpointError, CheckpointInfo, CheckpointStore
from stream_cl.config import load
from stream_cl.errors import StreamClError
from stream_cl.scaleout import run_worker
from tests.fixtures.procs import free_port
from tests.stream_cl.test_scaleout import GROUP, start, worker_settings
from tests.stream_cl.test_serve_kafka import BAD, produce, serve_here


def committed(bootstrap: str, group: str) -> dict[tuple[str, int], int]:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        offsets = admin.list_group_offsets(group).get(group, {})
        return {(tp.topic, tp.partition): om.offset for tp, om in offsets.items()}
    finally:
        admin.close()


def _worker_missing(rank: int, port: int, settings: dict, tmp: Path, unreadable: list[int]) -> None:
    """Worker ``rank`` of two, as the launcher starts it; worker 1 cannot read the checkpoints ``unreadable`` (a
    transient read error), so it restores the newest one before them, or none loads."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    if rank == 1:
        read = CheckpointStore.load

        def failing(store: CheckpointStore, info: CheckpointInfo) -> dict:
            if info.id in unreadable:
                raise CheckpointError(f"{info.path.name}: [Errno 5] Input/output error")
            return read(store, info)

        CheckpointStore.load = failing
    try:
        run_worker(load(settings, {}))
    except StreamClError as err:
        (tmp / f"refused-{rank}.txt").write_text(f"{type(err).__name__}: {err}")
        # Out at once: at the interpreter's exit, gloo's teardown racing the peer's sometimes aborts (std::terminate;
        # a launched worker's error reaches its launcher before that, in torch's error file)
        os._exit(0)


@pytest.mark.parametrize("unreadable", ["the newest", "all"])
def test_workers_that_restored_different_checkpoints_or_none_fail_before_any_opens_its_source(
    kafka_bootstrap: str, make_topic: Callable[..., str], tmp_path: Path, unreadable: str
) -> None:
    """Each worker says which rank restored which checkpoint; a worker whose restore failed tells its peers why
    (not a collective's timeout)."""
    topic = make_topic(2)
    where = produce(kafka_bootstrap, topic, 40)
    # one process learns the topic, checkpointing every 10 records, in a consumer group of its own
    serve_here(
        kafka_bootstrap, topic, tmp_path, "one", "--group", f"one-{topic}", "--checkpoint-every-records", 10,
        "--max-records", len(where) + BAD,
    )  # fmt: skip
    ids = [c.id for c in CheckpointStore(tmp_path / "ckpt").list()]
    assert len(ids) >= 2, ids
    newest, older = ids[-1], ids[-2]

    settings = worker_settings(kafka_bootstrap, topic, tmp_path, "group")
    missing = [newest] if unreadable == "the newest" else ids
    mp.spawn(_worker_missing, args=(free_port(), settings, tmp_path, missing), nprocs=2, join=True)
    refused = [(tmp_path / f"refused-{rank}.txt") for rank in (0, 1)]
    assert all(f.exists() for f in refused), "the group ran on, rank 1 from an older checkpoint's offsets"
    messages = [f.read_text() for f in refused]
    if unreadable == "the newest":
        for message in messages:
            assert message.startswith("ConfigError: the workers restored different checkpoints")
            assert f"rank 0: checkpoint {newest} (" in message and f"rank 1: checkpoint {older} (" in message
    else:
        assert messages[1].startswith("CheckpointError: no checkpoint in ")
        assert messages[0] == f"PeerRestoreError: rank 1 could not restore its checkpoint: {messages[1]}"
    assert committed(kafka_bootstrap, f"g-{topic}") == {}  # no worker joined the consumer group and committed


@pytest.mark.parametrize("fault", ["in use", "none loads"])
def test_a_launcher_on_a_checkpoint_directory_it_cannot_use_exits_2_before_starting_workers(
    kafka_bootstrap: str, make_topic: Callable[..., str], tmp_path: Path, fault: str
) -> None:
    """Another instance holds the directory, or no checkpoint in it loads: exit 2 at once, as one `serve` does,
    not a group failing and restarted until ``--max-restarts`` runs out (exit 1, which a supervisor retries)."""
    topic = make_topic(2)
    produce(kafka_bootstrap, topic, 20)
    in_use = CheckpointStore(tmp_path / "ckpt", sweep=True, layout=None)  # as the running instance's rank 0 holds it
    if fault == "none loads":
        info = in_use.write({"identity": {}})
        info.path.write_bytes(info.path.read_bytes()[:-1] + b"?")  # damaged: its digest no longer matches
        in_use.close()
    with in_use, start(kafka_bootstrap, topic, tmp_path, "second", *GROUP, "--max-restarts", 1) as proc:
        try:
            code = proc.wait(120)
        finally:
            proc.kill()  # a no-op once it exited; a group must not outlive the test
    log = (tmp_path / "second.log").read_text()
    assert code == 2, log[-3000:]  # as one `serve` exits, at once: no restart can take the lock
    if fault == "in use":
        assert f"checkpoint directory {tmp_path / 'ckpt'} is locked by process {os.getpid()}" in log
    else:
        assert f"no checkpoint in {tmp_path / 'ckpt'} can be restored" in log, log[-3000:]
    assert "starting 2 workers" not in log, log[-3000:]
    assert committed(kafka_bootstrap, f"g-{topic}") == {}
