"""Labelled arrays from dataset files on disk (nothing is downloaded).

* CIFAR-100 as two ``numpy.savez_compressed`` parts plus a label map (``cifar100.part1.npz``,
  ``cifar100.part2.npz``, ``cifar100_label_map.json``): uint8 HWC images, fine and coarse labels.
* CIFAR-100 as distributed (the "python version"): the ``cifar-100-python`` directory or the
  ``cifar-100-python.tar.gz`` archive, whose ``train``, ``test`` and ``meta`` files are pickles.
  They are read with an unpickler that builds only numpy arrays, dtypes and byte strings, so a
  tampered file raises :class:`UnsafePickleError` instead of running code.
* Fashion-MNIST in its original IDX files (``train-images-idx3-ubyte.gz`` …), as packaged by Debian
  (``dataset-fashion-mnist``: ``/usr/share/datasets/fashion-mnist``).
"""

from __future__ import annotations

import gzip
import io
import json
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FASHION_MNIST_NAMES = (
    "tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot",
)  # fmt: skip
FASHION_MNIST_COARSE = ("clothing", "clothing", "clothing", "clothing", "clothing",
                        "footwear", "clothing", "footwear", "accessory", "footwear")  # fmt: skip


@dataclass(frozen=True)
class LabelledArrays:
    """Images with fine labels, optional coarse labels, and the class names of each."""

    x: np.ndarray
    y: np.ndarray
    fine_names: tuple[str, ...]
    y_coarse: np.ndarray | None = None
    coarse_names: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.y)

    def path(self, i: int) -> tuple[str, ...]:
        """Label path (coarse, fine) of sample ``i``, or (fine,) without a coarse level."""
        fine = self.fine_names[int(self.y[i])]
        if self.y_coarse is None:
            return (fine,)
        return (self.coarse_names[int(self.y_coarse[i])], fine)


CIFAR_PYTHON = "cifar-100-python"
"""Name of the official archive's top folder (and of the archive, plus ``.tar.gz``)."""

_NPZ_FILES = ("cifar100.part1.npz", "cifar100.part2.npz", "cifar100_label_map.json")


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """A dataset pickle asks for something other than numpy arrays and byte strings."""


def load_cifar100(data_dir: str | Path, split: str = "train") -> LabelledArrays:
    """CIFAR-100 ``train`` (50,000) or ``test`` (10,000) with fine and coarse labels.

    ``data_dir`` is a folder with the npz parts, the official ``cifar-100-python`` folder, a folder
    holding it (or its archive), or the ``cifar-100-python.tar.gz`` archive itself.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    data_dir = Path(data_dir)
    if data_dir.is_dir() and all((data_dir / name).is_file() for name in _NPZ_FILES):
        return _load_cifar100_npz(data_dir, split)
    for folder in (data_dir, data_dir / CIFAR_PYTHON):
        if (folder / "meta").is_file() and (folder / split).is_file():
            return _cifar100_python((folder / split).read_bytes(), (folder / "meta").read_bytes(), str(folder / split))
    for archive in (data_dir, data_dir / f"{CIFAR_PYTHON}.tar.gz"):
        if archive.is_file():
            return _load_cifar100_archive(archive, split)
    raise FileNotFoundError(
        f"CIFAR-100 not found in {data_dir}: expected {', '.join(_NPZ_FILES)}, or the official "
        f"{CIFAR_PYTHON} folder (train, test, meta), or {CIFAR_PYTHON}.tar.gz"
    )


def _load_cifar100_npz(data_dir: Path, split: str) -> LabelledArrays:
    files = [data_dir / name for name in _NPZ_FILES]
    names = json.loads(files[2].read_text())
    if split == "train":
        parts = [np.load(files[0]), np.load(files[1])]
        x = np.concatenate([p["x_train"] for p in parts])
        y = np.concatenate([p["y_train"] for p in parts]).astype(np.int64)
        yc = np.concatenate([p["y_train_coarse"] for p in parts]).astype(np.int64)
    else:
        part = np.load(files[1])
        x, y, yc = part["x_test"], part["y_test"].astype(np.int64), part["y_test_coarse"].astype(np.int64)
    return LabelledArrays(x, y, tuple(names["fine_label_names"]), yc, tuple(names["coarse_label_names"]))


def _load_cifar100_archive(archive: Path, split: str) -> LabelledArrays:
    """The split from the official archive, read in memory (nothing is extracted to disk)."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            data, meta = (_tar_member(tar, archive, name) for name in (split, "meta"))
    except tarfile.TarError as err:
        raise ValueError(f"{archive}: not a readable tar archive: {err}") from err
    return _cifar100_python(data, meta, f"{archive}:{CIFAR_PYTHON}/{split}")


def _tar_member(tar: tarfile.TarFile, archive: Path, name: str) -> bytes:
    try:
        member = tar.getmember(f"{CIFAR_PYTHON}/{name}")
    except KeyError:
        raise FileNotFoundError(f"{archive}: no {CIFAR_PYTHON}/{name} inside") from None
    f = tar.extractfile(member) if member.isfile() else None
    if f is None:
        raise ValueError(f"{archive}: {CIFAR_PYTHON}/{name} is not a regular file")
    return f.read()


def _cifar100_python(data: bytes, meta: bytes, where: str) -> LabelledArrays:
    """Arrays from the bytes of an official split file and ``meta``; rows become uint8 HWC images."""
    split, names = read_pickle(data, where), read_pickle(meta, where.rsplit("/", 1)[0] + "/meta")
    try:
        pixels = split[b"data"]
        fine, coarse = split[b"fine_labels"], split[b"coarse_labels"]
        fine_names = tuple(n.decode() for n in names[b"fine_label_names"])
        coarse_names = tuple(n.decode() for n in names[b"coarse_label_names"])
    except (KeyError, TypeError, AttributeError, UnicodeDecodeError) as err:
        raise ValueError(f"{where}: not a CIFAR-100 python file ({type(err).__name__}: {err})") from err
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 2 or pixels.shape[1] != 3072:
        raise ValueError(f"{where}: b'data' must be a uint8 array of N x 3072 pixels")
    y, yc = np.asarray(fine, dtype=np.int64), np.asarray(coarse, dtype=np.int64)
    if y.shape != yc.shape or len(y) != len(pixels):
        raise ValueError(f"{where}: {len(pixels)} images but {len(y)} fine and {len(yc)} coarse labels")
    if len(y) and (y.min() < 0 or y.max() >= len(fine_names) or yc.min() < 0 or yc.max() >= len(coarse_names)):
        raise ValueError(f"{where}: a label is outside the class names in meta")
    # each row holds the R, G and B planes of a 32x32 image, each row-major
    x = np.ascontiguousarray(pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return LabelledArrays(x, y, fine_names, yc, coarse_names)


def read_pickle(data: bytes, where: str = "pickle") -> object:
    """Unpickle a dataset file that may only build numpy arrays, dtypes, byte strings and containers.

    Raises
    ------
    UnsafePickleError
        If the file references any other global (e.g. ``os.system``); nothing of it is called.
    """
    try:
        return _DatasetUnpickler(io.BytesIO(data), encoding="bytes").load()
    except UnsafePickleError as err:
        raise UnsafePickleError(f"{where}: {err}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
        raise ValueError(f"{where}: not a readable pickle: {err}") from err


def _latin1_bytes(text: str, encoding: str) -> bytes:
    """``_codecs.encode`` as Python 3 pickles bytes at protocol 2, for that one codec only."""
    if encoding != "latin1":
        raise UnsafePickleError(f"refusing _codecs.encode with codec {encoding!r}")
    return text.encode("latin1")


# The numpy function arrays pickle through, wherever this numpy version keeps it (numpy.core is deprecated).
_RECONSTRUCT = np.zeros(0).__reduce__()[0]


# Official files are Python 2 pickles (numpy.core...); ones written by numpy 2 name numpy._core.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_bytes,
}


class _DatasetUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to load global {module}.{name}: dataset pickles may only hold numpy arrays and bytes"
            ) from None


def load_fashion_mnist(data_dir: str | Path, split: str = "train") -> LabelledArrays:
    """Fashion-MNIST ``train`` (60,000) or ``test`` (10,000) as uint8 (N, 28, 28, 1) images."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    data_dir = Path(data_dir)
    x = read_idx(data_dir / f"{prefix}-images-idx3-ubyte.gz")[..., None]
    y = read_idx(data_dir / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    coarse_names = tuple(dict.fromkeys(FASHION_MNIST_COARSE))
    yc = np.array([coarse_names.index(c) for c in FASHION_MNIST_COARSE])[y]
    return LabelledArrays(x, y, FASHION_MNIST_NAMES, yc, coarse_names)


def read_idx(path: str | Path) -> np.ndarray:
    """An array from an IDX file (optionally gzip-compressed)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)
