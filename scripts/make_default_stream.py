"""Build the embedded default stream from Debian's Fashion-MNIST (run once; output is committed).

    apt-get install dataset-fashion-mnist
    python scripts/make_default_stream.py [--per-class 600]

Class-incremental: 5 tasks of 2 classes in label order, shuffled within each task, labels given
as coarse → fine paths (e.g. ``["footwear", "sneaker"]``), binary wire format.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from consumers.datasets import load_fashion_mnist
from consumers.record import Message, Position
from consumers.recorded import write_messages
from consumers.wire import encode_binary

SOURCE = Path("/usr/share/datasets/fashion-mnist")
OUT = Path(__file__).resolve().parents[1] / "consumers" / "data" / "fashion_mnist_ci.rec.gz"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--per-class", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data = load_fashion_mnist(SOURCE)
    labels = data.y
    rng = np.random.default_rng(args.seed)
    order = []
    for task in range(5):
        idx = np.concatenate([np.flatnonzero(labels == c)[: args.per_class] for c in (2 * task, 2 * task + 1)])
        order.extend(rng.permutation(idx).tolist())

    def messages():
        for offset, i in enumerate(order):
            value, headers = encode_binary(f"fmnist-train-{i}", data.x[i], list(data.path(i)))
            yield Message(Position("fashion-mnist", 0, offset), float(offset), None, value, tuple(headers))

    count = write_messages(OUT, messages())
    print(f"wrote {count} records to {OUT} ({OUT.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
