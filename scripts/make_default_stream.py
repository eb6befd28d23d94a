"""Build the embedded default stream from Debian's Fashion-MNIST (run once; output is committed).

    apt-get install dataset-fashion-mnist
    python scripts/make_default_stream.py [--per-class 600]

Class-incremental: 5 tasks of 2 classes in label order, shuffled within each task, labels given
as coarse → fine paths (e.g. ``["footwear", "sneaker"]``), binary wire format.
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np

from consumers.record import Message, Position
from consumers.recorded import write_messages
from consumers.wire import encode_binary

SOURCE = Path("/usr/share/datasets/fashion-mnist")
OUT = Path(__file__).resolve().parents[1] / "consumers" / "data" / "fashion_mnist_ci.rec.gz"
PATHS = [
    ("clothing", "tshirt_top"),
    ("clothing", "trouser"),
    ("clothing", "pullover"),
    ("clothing", "dress"),
    ("clothing", "coat"),
    ("footwear", "sandal"),
    ("clothing", "shirt"),
    ("footwear", "sneaker"),
    ("accessory", "bag"),
    ("footwear", "ankle_boot"),
]


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--per-class", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    images = read_idx(SOURCE / "train-images-idx3-ubyte.gz")
    labels = read_idx(SOURCE / "train-labels-idx1-ubyte.gz")
    rng = np.random.default_rng(args.seed)
    order = []
    for task in range(5):
        idx = np.concatenate([np.flatnonzero(labels == c)[: args.per_class] for c in (2 * task, 2 * task + 1)])
        order.extend(rng.permutation(idx).tolist())

    def messages():
        for offset, i in enumerate(order):
            value, headers = encode_binary(f"fmnist-train-{i}", images[i][..., None], list(PATHS[labels[i]]))
            yield Message(Position("fashion-mnist", 0, offset), float(offset), None, value, tuple(headers))

    count = write_messages(OUT, messages())
    print(f"wrote {count} records to {OUT} ({OUT.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
