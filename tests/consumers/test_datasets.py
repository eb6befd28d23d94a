"""CIFAR-100 as distributed (``cifar-100-python`` folder or ``.tar.gz``), read with a restricted unpickler."""

from __future__ import annotations

import codecs
import io
import os
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from consumers.datasets import UnsafePickleError, load_cifar100, read_pickle
from consumers.recorded import read_messages
from consumers.wire import decode
from stream_cl.cli import main

FINE = [f"fine_{i:02d}" for i in range(100)]
COARSE = [f"coarse_{i:02d}" for i in range(20)]


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def _split(x: np.ndarray, fine: np.ndarray, name: str) -> bytes:
    """A split file as CIFAR's own: a protocol-2 pickle of a dict with bytes keys, R/G/B planes per row."""
    return pickle.dumps(
        {
            b"batch_label": name.encode(),
            b"data": x.transpose(0, 3, 1, 2).reshape(len(x), 3072),
            b"fine_labels": fine.tolist(),
            b"coarse_labels": (fine // 5).tolist(),
            b"filenames": [f"img_{i}.png".encode() for i in range(len(x))],
        },
        protocol=2,
    )


def _meta() -> bytes:
    names = {b"fine_label_names": [n.encode() for n in FINE], b"coarse_label_names": [n.encode() for n in COARSE]}
    return pickle.dumps(names, protocol=2)


def _archive(tmp_path: Path, train: bytes | None = None) -> tuple[Path, dict[str, np.ndarray]]:
    """``cifar-100-python.tar.gz`` with 2 train images and 1 test image per fine class."""
    fine_train, fine_test = np.repeat(np.arange(100), 2), np.arange(100)
    arrays = {"train": _images(200, 0), "y_train": fine_train, "test": _images(100, 1), "y_test": fine_test}
    files = {
        "train": train if train is not None else _split(arrays["train"], fine_train, "training batch 1 of 1"),
        "test": _split(arrays["test"], fine_test, "testing batch 1 of 1"),
        "meta": _meta(),
    }
    path = tmp_path / "cifar-100-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path, arrays


def test_archive_folder_and_extracted_folder_give_the_same_arrays(tmp_path: Path) -> None:
    archive, arrays = _archive(tmp_path)
    extracted = tmp_path / "extracted"
    with tarfile.open(archive) as tar:
        tar.extractall(extracted, filter="data")
    for where in (archive, tmp_path, extracted, extracted / "cifar-100-python"):
        for split, n in (("train", 200), ("test", 100)):
            data = load_cifar100(where, split)
            assert data.x.shape == (n, 32, 32, 3) and data.x.dtype == np.uint8
            np.testing.assert_array_equal(data.x, arrays[split])
            np.testing.assert_array_equal(data.y, arrays[f"y_{split}"])
            np.testing.assert_array_equal(data.y_coarse, arrays[f"y_{split}"] // 5)
            assert data.fine_names == tuple(FINE) and data.coarse_names == tuple(COARSE)
    assert load_cifar100(archive, "train").path(7) == ("coarse_00", "fine_03")


def test_produce_reads_the_archive(tmp_path: Path) -> None:
    archive, arrays = _archive(tmp_path)
    out = tmp_path / "cifar.rec.gz"
    assert main(["produce", "cifar100", "--data-dir", str(archive), "--split", "test", "--to", str(out)]) == 0
    records = [decode(m) for m in read_messages(out)]
    assert len(records) == 100
    first = records[0]
    assert first.label == ("coarse_00", "fine_00")
    np.testing.assert_array_equal(first.x, arrays["test"][0])


class _RunsACommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_calls_os_system_is_refused_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = pickle.dumps({b"data": _RunsACommand(marker)}, protocol=2)
    with pytest.raises(UnsafePickleError, match=r"refusing to load global (posix|os|nt)\.system"):
        read_pickle(evil)
    archive, _ = _archive(tmp_path, train=evil)
    with pytest.raises(UnsafePickleError, match="cifar-100-python/train"):
        load_cifar100(archive, "train")
    assert main(["produce", "cifar100", "--data-dir", str(archive), "--to", str(tmp_path / "o.rec.gz")]) == 2
    assert not marker.exists()


class _Rot13:
    def __reduce__(self) -> tuple:
        return (codecs.encode, ("text", "rot13"))


def test_only_the_latin1_codec_builds_bytes(tmp_path: Path) -> None:
    assert read_pickle(pickle.dumps([b"\x00\xff"], protocol=2)) == [b"\x00\xff"]
    with pytest.raises(UnsafePickleError, match="codec 'rot13'"):
        read_pickle(pickle.dumps(_Rot13(), protocol=2))


def test_malformed_files_get_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"cifar-100-python\.tar\.gz"):
        load_cifar100(tmp_path, "train")
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    (folder / "meta").write_bytes(_meta())
    (folder / "train").write_bytes(pickle.dumps({b"data": np.zeros((2, 10), np.uint8)}, protocol=2))
    with pytest.raises(ValueError, match="not a CIFAR-100 python file"):
        load_cifar100(tmp_path, "train")
    (folder / "train").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="not a readable pickle"):
        load_cifar100(tmp_path, "train")
    shutil.rmtree(folder)
    (tmp_path / "cifar-100-python.tar.gz").write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="not a readable tar archive"):
        load_cifar100(tmp_path, "train")
