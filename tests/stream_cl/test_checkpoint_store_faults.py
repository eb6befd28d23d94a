"""The checkpoint store against what it finds in its directory: an entry it cannot delete, files that do not
load, a second writer, a checkpoint that verifies but lacks what a restore reads, ids past ten digits."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from stream_cl.checkpoint import FORMAT_VERSION, CheckpointDirInUseError, CheckpointError, CheckpointStore
from stream_cl.cli import main

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
    files = sorted(p.name for p in ckpt.glob("ckpt-*") if p.is_file())
    assert [int(name[5:15]) for name in files] == [11, 12, 13]  # 12 writes of 50 records, the newest 3 kept


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
