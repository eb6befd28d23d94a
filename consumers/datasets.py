"""Labelled arrays from dataset files on disk (nothing is downloaded).

* CIFAR-100 as two ``numpy.savez_compressed`` parts plus a label map (``cifar100.part1.npz``,
  ``cifar100.part2.npz``, ``cifar100_label_map.json``): uint8 HWC images, fine and coarse labels.
* Fashion-MNIST in its original IDX files (``train-images-idx3-ubyte.gz`` …), as packaged by Debian
  (``dataset-fashion-mnist``: ``/usr/share/datasets/fashion-mnist``).
"""

from __future__ import annotations

import gzip
import json
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


def load_cifar100(data_dir: str | Path, split: str = "train") -> LabelledArrays:
    """CIFAR-100 ``train`` (50,000) or ``test`` (10,000) with fine and coarse labels."""
    data_dir = Path(data_dir)
    files = [data_dir / "cifar100.part1.npz", data_dir / "cifar100.part2.npz", data_dir / "cifar100_label_map.json"]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"CIFAR-100 files not found: {', '.join(missing)}")
    names = json.loads(files[2].read_text())
    if split == "train":
        parts = [np.load(files[0]), np.load(files[1])]
        x = np.concatenate([p["x_train"] for p in parts])
        y = np.concatenate([p["y_train"] for p in parts]).astype(np.int64)
        yc = np.concatenate([p["y_train_coarse"] for p in parts]).astype(np.int64)
    elif split == "test":
        part = np.load(files[1])
        x, y, yc = part["x_test"], part["y_test"].astype(np.int64), part["y_test_coarse"].astype(np.int64)
    else:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return LabelledArrays(x, y, tuple(names["fine_label_names"]), yc, tuple(names["coarse_label_names"]))


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
