"""The probe set: held-out labelled stream samples that measure accuracy and forgetting live.

A record is held out when a hash of its id falls under ``fraction``, so the choice is the same
after a restart and needs no state. Held-out samples are never trained on; each class keeps at
most ``per_class`` of them (a per-class reservoir). Every evaluation scores each class on the
current model; forgetting of a class is its best accuracy so far minus its current accuracy.

The best accuracy only counts evaluations where the class had at least ``min_samples`` probe samples:
a running maximum of noisy accuracies is biased upward, worst for a class scored on one sample (0 or 1).
Scored on 1, then 6, 11, ... up to 50 samples, a model of constant accuracy 0.5 read about 0.27 of
forgetting with every evaluation counted; counting only those with 20 or more, about 0.05. A class
without such an evaluation yet has no forgetting (it is not averaged in).

A held-out record's classes count as the stream's classes (``--max-classes``) until the learner learns them:
:meth:`ProbeSet.follow` keeps :attr:`ProbeSet.unlearned` up to date with the learner's label tree, and drops
held paths a learned record contradicted (``("sport", "bat")`` once the tree learned ``bat`` under
``animal``): a learned record's claim on a class's parent wins over a held-out one, and the dropped samples
could never be scored.

Trade-off: the held-out fraction is data the learner never sees. On small streams a large
fraction starves learning; too small a fraction gives noisy per-class accuracies. The default
(5 %, at most 50 per class) costs little learning; at 50 samples a class's accuracy has a standard
error of at most 7 % (0.5/√n).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, KeysView, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from consumers.record import LabelPath
from monitoring.hierarchy import level_correct


class ClassTree(Protocol):
    """The label tree as the probe reads it (:class:`stream_cl.labels.LabelTree`): class names and parent
    indices per level, grown by appending."""

    names: list[list[str]]
    parents: list[list[int]]


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """One evaluation: accuracy and forgetting per class path and averaged per level."""

    class_accuracy: dict[LabelPath, float] = field(default_factory=dict)
    class_forgetting: dict[LabelPath, float] = field(default_factory=dict)
    level_accuracy: dict[int, float] = field(default_factory=dict)
    level_forgetting: dict[int, float] = field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        """Mean accuracy over every evaluated class (all levels), 0 if none."""
        values = list(self.class_accuracy.values())
        return float(np.mean(values)) if values else 0.0

    @property
    def forgetting(self) -> float:
        """Mean forgetting over classes that were ever recognised, 0 if none."""
        values = list(self.class_forgetting.values())
        return float(np.mean(values)) if values else 0.0


class ProbeSet:
    """Bounded held-out samples per class, and each class's best accuracy so far.

    Parameters
    ----------
    fraction
        Share of labelled records held out (0 disables the probe).
    per_class
        Most samples kept per class.
    min_samples
        Fewest probe samples of a class for an evaluation to update its best accuracy (capped at
        ``per_class``). At 20 an accuracy has a standard error of at most 11 %.
    seed
        Seed of the per-class reservoirs.

    Examples
    --------
    >>> probe = ProbeSet(fraction=1.0, per_class=2)
    >>> probe.add(np.zeros(3), ("a",)); probe.add(np.ones(3), ("b",))
    >>> r = probe.evaluate(lambda x: np.where(x[:, :1] > 0, 1, 0), lambda p: (0, "ab".index(p[0])))
    >>> r.level_accuracy
    {0: 1.0}
    """

    def __init__(self, *, fraction: float = 0.05, per_class: int = 50, min_samples: int = 20, seed: int = 0) -> None:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {fraction}")
        if per_class <= 0:
            raise ValueError(f"per_class must be > 0, got {per_class}")
        if min_samples <= 0:
            raise ValueError(f"min_samples must be > 0, got {min_samples}")
        self.fraction = fraction
        self.per_class = per_class
        self.min_samples = min(min_samples, per_class)
        self._threshold = int(fraction * 2**32)
        self._rng = np.random.default_rng(seed)
        self._samples: dict[LabelPath, list[np.ndarray]] = {}
        self._seen: dict[LabelPath, int] = {}
        self.best: dict[LabelPath, float] = {}
        """Best accuracy of each class over the evaluations with at least ``min_samples`` of its samples."""
        self._through: dict[tuple[int, str], set[LabelPath]] = {}  # (level, name) -> the held paths naming it
        self._tree: ClassTree | None = None  # the tree :meth:`follow` last caught up with, and its sizes then
        self._tree_sizes: list[int] = []
        self._learned: set[tuple[int, str]] = set()
        self.unlearned: set[tuple[int, str]] = set()
        """The ``(level, name)`` classes of held paths (their prefixes too) that the followed tree lacks."""

    def holds_out(self, sample_id: str) -> bool:
        """Whether the record with this id belongs to the probe (stable across runs)."""
        return zlib.crc32(sample_id.encode()) < self._threshold

    @property
    def classes(self) -> KeysView[tuple[int, str]]:
        """The ``(level, name)`` classes the held paths name, their prefixes included."""
        return self._through.keys()

    def add(self, x: np.ndarray, path: LabelPath) -> None:
        if path not in self._samples:
            self._index(path)
        samples = self._samples.setdefault(path, [])
        seen = self._seen[path] = self._seen.get(path, 0) + 1
        if len(samples) < self.per_class:
            samples.append(x)
        else:
            j = int(self._rng.integers(0, seen))
            if j < self.per_class:
                samples[j] = x

    def __len__(self) -> int:
        return sum(len(s) for s in self._samples.values())

    def follow(self, tree: ClassTree) -> None:
        """Catch up with the classes ``tree`` added since the last call: they leave :attr:`unlearned`, and held
        paths that give one of them another parent are dropped. Cheap when the tree did not grow."""
        sizes = [len(level) for level in tree.names]
        if tree is self._tree and sizes == self._tree_sizes:
            return
        old = self._tree_sizes
        if tree is not self._tree or len(sizes) < len(old) or any(n < o for n, o in zip(sizes, old, strict=False)):
            old = []  # another tree (a restore): compare every class
            self._learned, self.unlearned = set(), set(self._through)
        for level, size in enumerate(sizes):
            for index in range(old[level] if level < len(old) else 0, size):
                name = tree.names[level][index]
                self._learned.add((level, name))
                self.unlearned.discard((level, name))
                if level and (level, name) in self._through:
                    parent = tree.names[level - 1][tree.parents[level][index]]
                    self._drop([p for p in self._through[(level, name)] if p[level - 1] != parent])
        self._tree, self._tree_sizes = tree, sizes

    def _index(self, path: LabelPath) -> None:
        for level, name in enumerate(path):
            self._through.setdefault((level, name), set()).add(path)
            if (level, name) not in self._learned:
                self.unlearned.add((level, name))

    def _drop(self, paths: list[LabelPath]) -> None:
        for path in paths:
            del self._samples[path], self._seen[path]
            self.best.pop(path, None)
            for level, name in enumerate(path):
                through = self._through[(level, name)]
                through.discard(path)
                if not through:
                    del self._through[(level, name)]
                    self.unlearned.discard((level, name))

    def state_dict(self) -> dict[str, Any]:
        """Samples, counts, best accuracies and RNG as tensors and plain containers, so a checkpoint
        holding them loads with ``torch.load(weights_only=True)`` and forgetting survives a restart."""
        import torch  # here: the probe itself is numpy; only its checkpoint state is tensors

        paths = list(self._samples)
        return {
            "paths": [list(p) for p in paths],
            "samples": [torch.from_numpy(np.stack(self._samples[p])) for p in paths],
            "seen": [self._seen[p] for p in paths],
            "best": [[list(p), acc] for p, acc in self.best.items()],
            "rng": self._rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        paths = [tuple(p) for p in state["paths"]]
        self._samples = {p: list(x.numpy()) for p, x in zip(paths, state["samples"], strict=True)}
        self._seen = dict(zip(paths, state["seen"], strict=True))
        self.best = {tuple(p): acc for p, acc in state["best"]}
        self._rng.bit_generator.state = state["rng"]
        self._through, self._tree, self._tree_sizes, self._learned, self.unlearned = {}, None, [], set(), set()
        for path in paths:
            self._index(path)

    def evaluate(
        self,
        predict: Callable[[np.ndarray], np.ndarray],
        lookup: Callable[[LabelPath], tuple[int, int]],
        batch_size: int = 256,
        parent_maps: Sequence[np.ndarray] | None = None,
    ) -> ProbeResult:
        """Score every known class on the current model.

        ``predict`` maps stacked inputs to per-level class indices ``[n, levels]``; ``lookup``
        maps a path to ``(level, class index)`` of its last name or ``(-1, -1)`` for classes the
        model has not learned yet (skipped). With ``parent_maps`` (parent index of every class, per
        level), a path is scored only where the model's class has the path's ancestors (a held
        ``("sport", "bat")`` is not scored as the learned ``("animal", "bat")``), and a sample also
        counts as right when the class predicted one level down has its class as parent (the HLE
        parent rule, :func:`monitoring.hierarchy.level_correct`).
        """
        paths, xs = [], []
        for path, samples in self._samples.items():
            level, idx = lookup(path)
            if level >= 0 and (parent_maps is None or _same_ancestors(path, idx, lookup, parent_maps)):
                paths.append((path, level, idx, len(samples)))
                xs.extend(samples)
        if not paths:
            return ProbeResult()
        stacked = np.stack(xs)
        chunks = [predict(stacked[i : i + batch_size]) for i in range(0, len(stacked), batch_size)]
        preds = np.concatenate(chunks)
        result = ProbeResult()
        accs: dict[int, list[float]] = {}
        fgts: dict[int, list[float]] = {}
        start = 0
        for path, level, idx, n in paths:
            got = preds[start : start + n]
            start += n
            acc = float(level_correct(got, np.full(n, level), np.full(n, idx), parent_maps).mean())
            if n >= self.min_samples:
                self.best[path] = max(self.best.get(path, 0.0), acc)
            best = self.best.get(path, 0.0)
            result.class_accuracy[path] = acc
            accs.setdefault(level, []).append(acc)
            if best > 0:
                result.class_forgetting[path] = best - acc
                fgts.setdefault(level, []).append(best - acc)
        for level, values in sorted(accs.items()):
            result.level_accuracy[level] = float(np.mean(values))
            result.level_forgetting[level] = float(np.mean(fgts[level])) if level in fgts else 0.0
        return result


def _same_ancestors(
    path: LabelPath, index: int, lookup: Callable[[LabelPath], tuple[int, int]], parent_maps: Sequence[np.ndarray]
) -> bool:
    """Whether the model's class ``index`` for ``path`` descends from the classes of ``path``'s prefixes."""
    for level in range(len(path) - 1, 0, -1):
        index = int(parent_maps[level][index])
        if lookup(path[:level]) != (level - 1, index):
            return False
    return True
