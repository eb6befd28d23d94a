"""The checkpoint store against what it finds in its directory: an entry it cannot delete, files that do not
load, a second writer, a checkpoint that verifies but lacks what a restore reads, ids past ten digits,
checkpoints another version wrote or that cannot be read, and one that does not fit the configuration."""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from stream_cl import checkpoint
from stream_cl.build import build_learner
from stream_cl.checkpoint import (
    FORMAT_VERSION,
    CheckpointDirInUseError,
    CheckpointError,
    CheckpointFormatError,
    CheckpointStore,
)
from stream_cl.checkpointer import restore
from stream_cl.cli import main
from stream_cl.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
STRAY = "ckpt-0000000001-0000000000000000.pt"
SYNTHETIC = "synthetic://?records=600&classes=3&dim=8"


def payload(n: int) -> dict:
    """The top-level layout of a run's checkpoint (``stream_cl.checkpointer``), with little inside."""
    return {
        "identity": {"method": "er", "model": "mlp", "width": 8},
        "input_shape": [8],
        "input_dtype": "float32",
        "offsets": [["t", 0, n]],
        "learned_total": n,
        "learner": {},
    }


def save_raw(directory: Path, checkpoint_id: int, content: dict) -> Path:
    """A file named and checksummed as the store would, holding exactly ``content``: it verifies."""
    buffer = io.BytesIO()
    torch.save(content, buffer)
    digest = hashlib.sha256(buffer.getvalue()).hexdigest()[:16]
    path = directory / f"ckpt-{checkpoint_id:010d}-{digest}.pt"
    path.write_bytes(buffer.getvalue())
    return path


def corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def serve(ckpt: Path, *args: str) -> int:
    common = ["serve", "--source", SYNTHETIC, "--model", "mlp", "--width", "8", "--metrics-port", "0", "--no-progress"]
    return main([*common, "--no-drift", "--checkpoint-dir", str(ckpt), "--checkpoint-every-records", "50", *args])


# pruning: best effort, and never at the cost of the checkpoints that load


def test_an_entry_that_cannot_be_deleted_neither_fails_writes_nor_stops_pruning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / STRAY).mkdir()  # named like checkpoint 1: unlink() refuses it
    store = CheckpointStore(tmp_path, keep=3)
    written = [store.write(payload(n)).id for n in range(6)]
    assert written == [2, 3, 4, 5, 6, 7]
    assert [c.id for c in store.list()] == [1, 5, 6, 7] and (tmp_path / STRAY).is_dir()
    assert "cannot delete old checkpoint " + STRAY in caplog.text
    assert store.latest()[0].id == 7


def test_serve_with_such_an_entry_keeps_its_checkpoints_and_exits_0(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    ckpt = tmp_path / "ckpt"
    (ckpt / STRAY).mkdir(parents=True)
    assert serve(ckpt, "--checkpoint-keep", "3") == 0
    assert "records learned" in capsys.readouterr().out  # the summary: the final write did not "fail"
    ids = sorted(int(p.name[5:15]) for p in ckpt.glob("ckpt-*") if p.is_file())
    # up to 12 writes of 50 records and the final one (a write due while one is in flight waits; a slow disk
    # folds them into fewer), from id 2 on (the stray entry holds 1): the newest 3 kept
    assert ids == list(range(max(2, ids[-1] - 2), ids[-1] + 1)) and len(ids) >= 2


def test_files_that_do_not_load_do_not_count_towards_keep(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=3)
    for n in range(3):
        store.write(payload(n))
    for info in store.list()[1:]:
        corrupt(info.path)
    restarted = CheckpointStore(tmp_path, keep=2, sweep=True)
    restarted.write(payload(3))
    # the newest 2 that load stay (4 and the fallback 1); the broken ones older than 4 go
    assert [c.id for c in restarted.list()] == [1, 4]
    corrupt(restarted.list()[-1].path)
    assert restarted.latest()[0].id == 1


def test_nothing_is_pruned_while_no_checkpoint_loads(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=3)
    for n in range(3):
        store.write(payload(n))
    for info in store.list():
        corrupt(info.path)
    CheckpointStore(tmp_path, keep=1).prune()
    assert [c.id for c in store.list()] == [1, 2, 3]  # left for a person (``stream-cl checkpoint ls``)


# one writer per directory


def test_a_second_writer_is_refused_and_sweeps_nothing_until_the_first_closes(tmp_path: Path) -> None:
    first = CheckpointStore(tmp_path, sweep=True)
    first.write(payload(0))
    in_flight = tmp_path / ".ckpt-in-flight.tmp"  # the first writer's next checkpoint, half written
    in_flight.write_bytes(b"half")
    with pytest.raises(CheckpointDirInUseError, match=re.escape(f"{tmp_path} is locked by process {os.getpid()}")):
        CheckpointStore(tmp_path, sweep=True)
    assert in_flight.exists()
    reader = CheckpointStore(tmp_path)  # ls, show and an export need no lock
    assert reader.latest()[0].id == 1
    first.close()
    with CheckpointStore(tmp_path, sweep=True) as second:
        assert not in_flight.exists() and second.write(payload(1)).id == 2
    CheckpointStore(tmp_path, sweep=True).close()  # the with block released it


def test_a_store_dropped_without_close_releases_the_lock(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, sweep=True)
    store.cycle = store  # only the cycle collector frees it
    del store
    CheckpointStore(tmp_path, sweep=True).close()


@pytest.fixture
def other_writer(tmp_path: Path) -> Iterator[Path]:
    """A checkpoint directory with one checkpoint, whose lock another process holds."""
    ckpt = tmp_path / "ckpt"
    CheckpointStore(ckpt).write(payload(0))
    code = (
        "import sys, time; from stream_cl.checkpoint import CheckpointStore; "
        "store = CheckpointStore(sys.argv[1], sweep=True); print('locked', flush=True); time.sleep(300)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(ckpt)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "locked\n"
        yield ckpt
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def test_serve_and_restore_refuse_a_directory_another_process_writes_to(
    other_writer: Path, capsys: pytest.CaptureFixture
) -> None:
    before = sorted(p.name for p in other_writer.iterdir())
    assert serve(other_writer) == 2
    assert main(["checkpoint", "restore", str(other_writer), "1"]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 2 and all(f"checkpoint directory {other_writer} is locked by process" in e for e in errors)
    assert sorted(p.name for p in other_writer.iterdir()) == before  # nothing written, swept or pruned
    assert main(["checkpoint", "ls", str(other_writer)]) == 0
    assert main(["checkpoint", "show", str(other_writer)]) == 0


def test_the_lock_goes_with_the_process_that_held_it(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    code = "import sys; from stream_cl.checkpoint import CheckpointStore; CheckpointStore(sys.argv[1], sweep=True)"
    subprocess.run([sys.executable, "-c", code, str(ckpt)], cwd=ROOT, check=True)
    CheckpointStore(ckpt).write(payload(0))
    assert main(["checkpoint", "restore", str(ckpt), "1"]) == 0


# a checkpoint that verifies but lacks what a restore reads


def test_a_verified_file_without_the_run_layout_is_skipped_like_a_corrupted_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = CheckpointStore(tmp_path)
    store.write(payload(0))
    stamp = {"format": FORMAT_VERSION, "created": time.time()}
    no_identity = {k: v for k, v in payload(1).items() if k != "identity"}
    save_raw(tmp_path, 2, {**no_identity, **stamp, "id": 2})
    save_raw(tmp_path, 3, {**payload(2), **stamp, "id": 3, "learner": torch.zeros(2)})  # a tensor, not a dict
    save_raw(tmp_path, 4, {**payload(3), "format": FORMAT_VERSION, "id": 4})  # no "created"
    for checkpoint_id, problem in ((2, "missing 'identity'"), (3, "'learner' is a Tensor"), (4, "missing 'created'")):
        with pytest.raises(CheckpointError, match=problem):
            store.load(store.get(checkpoint_id))
    assert store.latest()[0].id == 1
    assert "skipping checkpoint 4" in caplog.text and "skipping checkpoint 2" in caplog.text


def test_checkpoint_ls_and_show_report_such_a_file_as_invalid(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    CheckpointStore(tmp_path).write(payload(0))
    save_raw(tmp_path, 2, {"format": FORMAT_VERSION, "id": 2})  # lacks even "created"
    assert main(["checkpoint", "ls", str(tmp_path)]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert rows[0].endswith("ok") and "INVALID" in rows[1] and "unexpected layout: missing 'created'" in rows[1]
    assert main(["checkpoint", "show", str(tmp_path), "2"]) == 2
    assert "unexpected layout" in capsys.readouterr().err
    assert main(["checkpoint", "show", str(tmp_path)]) == 0
    assert '"id": 1' in capsys.readouterr().out


def test_serve_restores_the_newest_checkpoint_with_the_run_layout(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ckpt = tmp_path / "ckpt"
    assert serve(ckpt, "--max-records", "100") == 0
    newest = CheckpointStore(ckpt).latest()[1]
    save_raw(ckpt, newest["id"] + 1, {k: v for k, v in newest.items() if k != "identity"} | {"id": newest["id"] + 1})
    caplog.set_level(logging.INFO, logger="stream_cl")
    assert serve(ckpt, "--max-records", "100") == 0
    assert f"skipping checkpoint {newest['id'] + 1}" in caplog.text
    assert f"restored checkpoint {newest['id']}" in caplog.text


def test_a_payload_without_the_run_layout_is_not_written(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    with pytest.raises(CheckpointError, match="missing 'learner'"):
        store.write({k: v for k, v in payload(0).items() if k != "learner"})
    assert store.list() == [] and not list(tmp_path.glob(".ckpt-*"))


# ids past ten digits


def test_ids_go_on_past_ten_digits(tmp_path: Path) -> None:
    (tmp_path / "ckpt-9999999999-0000000000000000.pt").touch()  # stray, not valid
    store = CheckpointStore(tmp_path, keep=2)
    assert store.write(payload(0)).id == 10**10
    assert [c.id for c in store.list()] == [10**10]  # listed, and the stray (which does not load) pruned
    restarted = CheckpointStore(tmp_path, keep=2)  # a restart finds it
    assert restarted.latest()[0].id == 10**10
    assert restarted.write(payload(1)).id == 10**10 + 1


def test_ids_sort_as_numbers_and_one_id_has_one_name(tmp_path: Path) -> None:
    stamp = {"format": FORMAT_VERSION, "created": time.time()}
    save_raw(tmp_path, 9999999999, {**payload(0), **stamp, "id": 9999999999})
    save_raw(tmp_path, 10**10, {**payload(1), **stamp, "id": 10**10})
    digest = "0123456789abcdef"
    for name in (
        f"ckpt-00000000002-{digest}.pt",
        f"ckpt-000000000\u0663-{digest}.pt",
        f"ckpt-0000000004-{digest}.pt\n",
    ):
        (tmp_path / name).touch()  # a leading zero past ten digits, an Arabic-Indic digit, a trailing newline
    store = CheckpointStore(tmp_path)
    assert [c.id for c in store.list()] == [9999999999, 10**10]
    assert store.latest()[0].id == 10**10


# checkpoints this version cannot use: kept, and a restart with none it can use refuses to start afresh


def test_a_restart_after_a_rollback_exits_2_naming_the_newest_checkpoint_and_keeps_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    ckpt = tmp_path / "ckpt"
    monkeypatch.setattr(checkpoint, "FORMAT_VERSION", FORMAT_VERSION + 1)  # a newer release writes them
    assert serve(ckpt, "--max-records", "100") == 0
    monkeypatch.setattr(checkpoint, "FORMAT_VERSION", FORMAT_VERSION)  # rolled back
    written = sorted(ckpt.glob("ckpt-*"))
    capsys.readouterr()
    assert serve(ckpt) == 2
    error = capsys.readouterr().err
    assert f"no checkpoint in {ckpt} can be restored ({len(written)} found, none loads)" in error
    assert f"the newest: {written[-1].name}: format {FORMAT_VERSION + 1}, expected {FORMAT_VERSION}" in error
    assert sorted(ckpt.glob("ckpt-*")) == written  # no model learned afresh, nothing written or pruned


def test_a_restart_falls_back_past_checkpoints_of_another_format_and_no_write_deletes_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    CheckpointStore(tmp_path, keep=1).write(payload(0))
    monkeypatch.setattr(checkpoint, "FORMAT_VERSION", FORMAT_VERSION + 1)
    newer = CheckpointStore(tmp_path, keep=1)
    newer.write(payload(1))
    newer.write(payload(2))
    assert [c.id for c in newer.list()] == [1, 3]  # the newer release pruned its own 2, not the older 1
    monkeypatch.setattr(checkpoint, "FORMAT_VERSION", FORMAT_VERSION)
    restarted = CheckpointStore(tmp_path, keep=1, sweep=True)
    info, found = restarted.latest()
    assert (info.id, found["learned_total"]) == (1, 0)
    restarted.write(payload(3))
    assert [c.id for c in restarted.list()] == [3, 4]  # 1 is older than the newest that loads; 3 is kept
    with pytest.raises(CheckpointFormatError, match=f"format {FORMAT_VERSION + 1}, expected {FORMAT_VERSION}"):
        restarted.load(restarted.get(3))


def unreadable(names: set[str]) -> Callable[[Path], bytes]:
    """``Path.read_bytes`` failing with EIO for files named in ``names``."""
    read_bytes = Path.read_bytes

    def read(path: Path) -> bytes:
        if path.name in names:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        return read_bytes(path)

    return read


def test_a_checkpoint_that_cannot_be_read_is_skipped_never_deleted_and_alone_stops_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = CheckpointStore(tmp_path, keep=2)
    store.write(payload(0))
    newest = store.write(payload(1)).path.name
    monkeypatch.setattr(Path, "read_bytes", unreadable({newest}))
    restarted = CheckpointStore(tmp_path, keep=1, sweep=True)
    assert restarted.latest()[0].id == 1  # falls back, as past a corrupted one
    restarted.write(payload(2))
    assert [c.id for c in restarted.list()] == [2, 3]  # 1 pruned; 2 may be intact, so it stays
    restarted.close()
    monkeypatch.setattr(Path, "read_bytes", unreadable({c.path.name for c in restarted.list()}))
    with pytest.raises(CheckpointError, match=r"\(2 found, none loads\); the newest: ckpt-0000000003-.*: cannot "):
        CheckpointStore(tmp_path, keep=1, sweep=True).latest()


def test_a_directory_of_corrupted_checkpoints_stops_a_restart_and_one_without_any_starts_afresh(
    tmp_path: Path,
) -> None:
    store = CheckpointStore(tmp_path, keep=3)
    for n in range(2):
        store.write(payload(n))
    for info in store.list():
        corrupt(info.path)
    with pytest.raises(CheckpointError, match=r"the newest: ckpt-0000000002-[0-9a-f]{16}\.pt: checksum mismatch"):
        store.latest()
    for info in store.list():
        info.path.unlink()
    (tmp_path / STRAY).mkdir()  # named like a checkpoint, but no file
    assert store.latest() is None


# a checkpoint that does not fit the configuration: a one-line error, not a traceback at every restart


def test_serve_with_another_buffer_policy_than_its_checkpoint_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    ckpt = tmp_path / "ckpt"
    assert serve(ckpt, "--max-records", "100") == 0
    newest = CheckpointStore(ckpt).latest()[0].id
    capsys.readouterr()
    assert serve(ckpt, "--buffer-policy", "class-balanced") == 2
    error = capsys.readouterr().err
    assert f"checkpoint {newest} in {ckpt} does not fit this configuration (KeyError: " in error


MAKE_ER = partial(build_learner, "er", "mlp", device=torch.device("cpu"), width=8)
IDENTITY = payload(0)["identity"]


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"input_dtype": "garbage"}, "data type 'garbage' not understood"),
        ({"input_shape": [8, -1]}, "input_shape [8, -1] is not a list of ints >= 0"),
        ({"totals": {"learned_total": [1]}}, "totals {'learned_total': [1]} are not counts"),
        ({"learned_total": -1}, "totals {'learned_total': -1} are not counts"),
        ({"offsets": [["t", 0]]}, "offsets entry ['t', 0] is not [topic, partition >= 0, n >= 0]"),
        ({"offsets": [["t", 0, -5]]}, "offsets entry ['t', 0, -5] is not"),
        ({"offsets": [["t", -1, 5]]}, "offsets entry ['t', -1, 5] is not"),
        ({"within": [["t", 0, -2]]}, "within entry ['t', 0, -2] is not"),
    ],
)
def test_a_checkpoint_holding_a_value_no_run_writes_is_refused(tmp_path: Path, change: dict, problem: str) -> None:
    learner = MAKE_ER((8,), np.dtype("float32")).state_dict()  # all else would restore
    CheckpointStore(tmp_path).write(payload(0) | {"learner": learner} | change)
    expected = f"checkpoint 1 in {tmp_path} holds an invalid value: {problem}"
    with pytest.raises(CheckpointError, match=re.escape(expected)):
        restore(CheckpointStore(tmp_path), MAKE_ER, IDENTITY)


def test_a_learner_state_of_another_version_is_a_config_error(tmp_path: Path) -> None:
    CheckpointStore(tmp_path).write(payload(0))  # its learner state is {}
    with pytest.raises(ConfigError, match=r"checkpoint 1 in .* does not fit this configuration \(KeyError: 'labels'\)"):
        restore(CheckpointStore(tmp_path), MAKE_ER, IDENTITY)


def test_a_gpu_out_of_memory_while_restoring_is_no_config_error(tmp_path: Path) -> None:
    """A GPU shared for a moment: a retriable failure, not advice to give the checkpoint up."""

    def short_of_memory(shape: tuple[int, ...], dtype: np.dtype) -> object:
        learner = MAKE_ER(shape, dtype)

        def load_state_dict(state: dict) -> None:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")

        learner.load_state_dict = load_state_dict
        return learner

    CheckpointStore(tmp_path).write(payload(0))
    with pytest.raises(torch.cuda.OutOfMemoryError):
        restore(CheckpointStore(tmp_path), short_of_memory, IDENTITY)
