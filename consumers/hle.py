"""HLE streams (Lee et al., ICCV 2023): labels expand from coarse to fine classes as the stream goes on.

Built from :class:`~consumers.datasets.LabelledArrays` with a coarse level (CIFAR-100: 20
superclasses over 100 classes). Every sample is labelled at exactly one level by a label *path*:
``["vehicles_1"]`` (parent-labelled) or ``["vehicles_1", "pickup_truck"]`` (child-labelled).

* **single-label** (``setup2`` in the HLE code): each image appears once. Task 0 holds a
  ``parent_share`` slice of every fine class with its parent label (83 of 500 in the paper); tasks
  1..5 each hold the remaining images of all fine classes of 4 superclasses, with child labels.
* **dual-label** (``setup1``): task 0 holds every image with its parent label; tasks 1..5 show the
  same images again with child labels (the second copy gets a different id).
* **multi-depth**: one level per task, disjoint images (each fine class's images split evenly over
  the levels). CIFAR-100 has two levels of its own; :data:`CIFAR100_TAXONOMY` is a hand-made
  grouping of the 20 superclasses into 4 groups under 2 roots (2 → 4 → 20 → 100 classes). It is
  **not** the paper's ``cifar100_scene_topdown`` hierarchy (2 → 4 → 8 → 20 → 100), whose files were
  not available.

Orders are seeded: the superclass order of the child tasks and the sample order within a task.
Run ``python -m consumers.hle --help`` to write a stream as a recorded-stream file.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from consumers.datasets import LabelledArrays, load_cifar100
from consumers.record import LabelPath, Message, Position
from consumers.recorded import write_messages
from consumers.wire import encode_binary

SETUPS = ("single", "dual", "multi")

_ANIMALS = ("aquatic_mammals", "fish", "insects", "large_carnivores", "large_omnivores_and_herbivores",
            "medium_mammals", "non-insect_invertebrates", "people", "reptiles", "small_mammals")  # fmt: skip
_ARTIFACTS = ("food_containers", "household_electrical_devices", "household_furniture",
              "large_man-made_outdoor_things", "vehicles_1", "vehicles_2")  # fmt: skip
CIFAR100_TAXONOMY: dict[str, tuple[str, ...]] = {
    **{name: ("living", "animal") for name in _ANIMALS},
    **{name: ("living", "plant") for name in ("flowers", "fruit_and_vegetables", "trees")},
    **{name: ("non_living", "artifact") for name in _ARTIFACTS},
    "large_natural_outdoor_scenes": ("non_living", "scene"),
}
"""Ancestors of each CIFAR-100 superclass for the multi-depth stream (hand-made, see module doc)."""


@dataclass(frozen=True)
class HLEStream:
    """A stream as rows into the arrays, each with its label path, task and unique id."""

    rows: np.ndarray
    paths: tuple[LabelPath, ...]
    task: np.ndarray
    ids: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def level(self) -> np.ndarray:
        """Label level of each sample (path length minus one)."""
        return np.array([len(p) - 1 for p in self.paths], dtype=np.int64)

    def head(self, n: int) -> HLEStream:
        """The first ``n`` samples."""
        return HLEStream(self.rows[:n], self.paths[:n], self.task[:n], self.ids[:n])

    def messages(self, data: LabelledArrays, *, topic: str = "hle") -> Iterator[Message]:
        """Binary-format messages in stream order (offset = position, timestamp = offset)."""
        for i, (row, path, sample_id) in enumerate(zip(self.rows, self.paths, self.ids, strict=True)):
            value, headers = encode_binary(sample_id, data.x[int(row)], list(path))
            yield Message(Position(topic, 0, i), float(i), sample_id.encode(), value, tuple(headers))


def single_label(
    data: LabelledArrays,
    *,
    seed: int = 0,
    per_class: int | None = None,
    parent_share: float = 83 / 500,
    child_tasks: int = 5,
    split: str = "train",
) -> HLEStream:
    """Disjoint images: a parent-labelled task, then ``child_tasks`` tasks of child labels."""
    if not 0.0 < parent_share < 1.0:
        raise ValueError(f"parent_share must be in (0, 1), got {parent_share}")
    rng = np.random.default_rng(seed)
    rows = _class_rows(data, per_class, rng)
    n_parent = [max(1, round(parent_share * len(r))) for r in rows]
    parent = np.concatenate([r[:k] for r, k in zip(rows, n_parent, strict=True)])
    child = [r[k:] for r, k in zip(rows, n_parent, strict=True)]
    parts = [(parent, 0)] + [(c, 1) for c in _child_groups(data, child, child_tasks, rng)]
    return _assemble(data, parts, rng, split)


def dual_label(
    data: LabelledArrays,
    *,
    seed: int = 0,
    per_class: int | None = None,
    child_tasks: int = 5,
    split: str = "train",
) -> HLEStream:
    """Every image twice: with its parent label in task 0, later with its child label."""
    rng = np.random.default_rng(seed)
    rows = _class_rows(data, per_class, rng)
    parts = [(np.concatenate(rows), 0)] + [(c, 1) for c in _child_groups(data, rows, child_tasks, rng)]
    return _assemble(data, parts, rng, split)


def multi_depth(
    data: LabelledArrays,
    *,
    taxonomy: Mapping[str, tuple[str, ...]] = CIFAR100_TAXONOMY,
    seed: int = 0,
    per_class: int | None = None,
    split: str = "train",
) -> HLEStream:
    """One task per level, coarse to fine, on disjoint images; ``taxonomy`` adds levels above the coarse one."""
    if data.y_coarse is None:
        raise ValueError("multi-depth streams need coarse labels")
    depths = {len(a) for a in taxonomy.values()}
    missing = set(data.coarse_names) - set(taxonomy)
    if missing or len(depths) != 1:
        raise ValueError(f"taxonomy must give every coarse class ancestors of one depth (missing: {sorted(missing)})")
    rng = np.random.default_rng(seed)
    n_levels = depths.pop() + 2
    rows = _class_rows(data, per_class, rng)
    chunks = [np.array_split(r, n_levels) for r in rows]
    parts = [(np.concatenate([c[lvl] for c in chunks]), lvl) for lvl in range(n_levels)]
    return _assemble(data, parts, rng, split, taxonomy)


def build(setup: str, data: LabelledArrays, **kwargs) -> HLEStream:
    """The stream of ``setup`` (one of :data:`SETUPS`)."""
    builders = {"single": single_label, "dual": dual_label, "multi": multi_depth}
    if setup not in builders:
        raise ValueError(f"unknown setup {setup!r}; choose one of {', '.join(SETUPS)}")
    return builders[setup](data, **kwargs)


def full_path(data: LabelledArrays, row: int, taxonomy: Mapping[str, tuple[str, ...]] | None = None) -> LabelPath:
    """The finest label path of one row, with ``taxonomy`` ancestors in front when given."""
    path = data.path(row)
    return (*taxonomy[path[0]], *path) if taxonomy else path


def _class_rows(data: LabelledArrays, per_class: int | None, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled rows of each fine class, at most ``per_class`` of them."""
    if data.y_coarse is None:
        raise ValueError("HLE streams need coarse labels")
    if per_class is not None and per_class < 2:
        raise ValueError(f"per_class must be >= 2, got {per_class}")
    out = []
    for c in range(len(data.fine_names)):
        rows = rng.permutation(np.flatnonzero(data.y == c))
        out.append(rows[:per_class] if per_class is not None else rows)
    return out


def _child_groups(
    data: LabelledArrays, rows: list[np.ndarray], tasks: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Child-task rows: the superclasses in a seeded order, split into ``tasks`` equal groups."""
    n_coarse = len(data.coarse_names)
    if not 1 <= tasks <= n_coarse:
        raise ValueError(f"child_tasks must be in 1..{n_coarse}, got {tasks}")
    fine_coarse = np.array([int(data.y_coarse[r[0]]) if len(r) else -1 for r in rows])
    groups = np.array_split(rng.permutation(n_coarse), tasks)
    return [np.concatenate([rows[f] for f in np.flatnonzero(np.isin(fine_coarse, g))]) for g in groups]


def _assemble(
    data: LabelledArrays,
    parts: list[tuple[np.ndarray, int]],
    rng: np.random.Generator,
    split: str,
    taxonomy: Mapping[str, tuple[str, ...]] | None = None,
) -> HLEStream:
    rows, paths, tasks, ids = [], [], [], []
    for task, (part, level) in enumerate(parts):
        part = rng.permutation(part)
        rows.append(part)
        tasks.append(np.full(len(part), task, dtype=np.int64))
        for row in part.tolist():
            paths.append(full_path(data, row, taxonomy)[: level + 1])
            ids.append(f"{split}-{row}-h{level}")
    return HLEStream(np.concatenate(rows).astype(np.int64), tuple(paths), np.concatenate(tasks), tuple(ids))


def main(argv: list[str] | None = None) -> int:
    """Write an HLE stream of CIFAR-100 as a recorded-stream file."""
    p = argparse.ArgumentParser(prog="python -m consumers.hle", description=main.__doc__)
    p.add_argument("--setup", choices=SETUPS, required=True)
    p.add_argument("--data-dir", required=True, help="folder with the CIFAR-100 npz parts and label map")
    p.add_argument("--out", required=True, help="recorded-stream file to write (.rec.gz)")
    p.add_argument("--seed", type=int, default=0, help="class and sample order seed (default 0)")
    p.add_argument("--per-class", type=int, default=None, help="train images per fine class (default: all 500)")
    p.add_argument("--limit", type=int, default=None, help="write only the first N messages")
    p.add_argument("--topic", default="hle", help="stream name stored in message positions")
    args = p.parse_args(argv)
    data = load_cifar100(args.data_dir)
    stream = build(args.setup, data, seed=args.seed, per_class=args.per_class)
    if args.limit is not None:
        stream = stream.head(args.limit)
    count = write_messages(args.out, stream.messages(data, topic=args.topic))
    print(f"wrote {count} messages to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
