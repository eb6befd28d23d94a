"""The label tree: classes per level, grown online from coarse-to-fine label paths."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from consumers.record import LabelPath


class LabelTree:
    """Classes per level and each class's parent, learned from the label paths seen so far.

    A path ``("vehicle", "pickup_truck")`` labels a sample at level 1 (its depth minus one) and
    teaches the tree that ``pickup_truck``'s parent is ``vehicle``. Class indices within a level
    follow first appearance, so heads only ever grow. Flat streams are the depth-1 case.

    Parameters
    ----------
    max_depth
        Longest accepted path (1..16).

    Examples
    --------
    >>> tree = LabelTree()
    >>> tree.encode([("animal",), ("animal", "dog"), None])
    (array([ 0,  1, -1]), array([ 0,  0, -1]), [(0, 'animal'), (1, 'dog')])
    >>> tree.path(1, 0), tree.parent_of(1, 0)
    (('animal', 'dog'), 0)
    """

    def __init__(self, *, max_depth: int = 8) -> None:
        if not 1 <= max_depth <= 16:
            raise ValueError(f"max_depth must be in 1..16, got {max_depth}")
        self.max_depth = max_depth
        self.names: list[list[str]] = []
        self.parents: list[list[int]] = []
        self._index: list[dict[str, int]] = []
        self._known: dict[LabelPath, tuple[int, int]] = {}  # path -> (level, index): one lookup per record
        self.version = 0
        """Changes whenever a class is added or the tree is loaded: what grew heads to it need not look again."""

    @property
    def sizes(self) -> list[int]:
        """Number of classes per level."""
        return [len(level) for level in self.names]

    @property
    def depth(self) -> int:
        return len(self.names)

    def problem(self, path: LabelPath) -> str | None:
        """Why ``path`` cannot be learned (too deep, or contradicts a known parent), else None."""
        if path in self._known:  # parents never change, so a learned path stays consistent
            return None
        if len(path) > self.max_depth:
            return f"label path deeper than max_depth={self.max_depth}"
        for level in range(1, min(len(path), self.depth)):
            idx = self._index[level].get(path[level])
            parent = self._index[level - 1].get(path[level - 1])
            if idx is not None and self.parents[level][idx] != parent:
                known = self.names[level - 1][self.parents[level][idx]]
                return f"{path[level]!r} has parent {known!r}, not {path[level - 1]!r}"
        return None

    def problems(self, paths: Sequence[LabelPath | None]) -> list[str | None]:
        """:meth:`problem` of each path of a batch, the earlier paths counting as learned.

        Two new paths of one batch that give one class two parents are caught here: the first wins.
        """
        known = self._known
        if all(path is None or path in known for path in paths):  # the common case: every path learned before
            return [None] * len(paths)
        claims: dict[tuple[int, str], str] = {}  # (level, class) -> parent claimed earlier in the batch
        out: list[str | None] = []
        for path in paths:
            problem = None if path is None else self.problem(path)
            if problem is None and path is not None and len(path) > 1 and path not in self._known:
                for level in range(1, len(path)):
                    parent = claims.get((level, path[level]), path[level - 1])
                    if parent != path[level - 1]:
                        problem = f"{path[level]!r} has parent {parent!r}, not {path[level - 1]!r}"
                        break
                else:
                    claims.update(((level, path[level]), path[level - 1]) for level in range(1, len(path)))
            out.append(problem)
        return out

    def lookup(self, path: LabelPath) -> tuple[int, int]:
        """(level, class index) of a known path's last element; (-1, -1) if unknown."""
        level = len(path) - 1
        if level >= self.depth:
            return -1, -1
        idx = self._index[level].get(path[-1], -1)
        return (level, idx) if idx >= 0 else (-1, -1)

    def encode(self, paths: Sequence[LabelPath | None]) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]:
        """Levels and class indices of ``paths`` (-1 for None), growing the tree.

        Returns ``(level, y, new)`` where ``new`` lists the ``(level, name)`` classes added.
        Paths must have passed :meth:`problem`.
        """
        get = self._known.get
        encoded = [(-1, -1) if path is None else get(path) for path in paths]
        new: list[tuple[int, str]] = []
        if None in encoded:  # some path is new (or was never consistent): grow the tree
            encoded = self._encode_growing(paths, new)
        if not encoded:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64), new
        level, y = zip(*encoded, strict=True)  # two flat lists: cheaper for numpy than one list of pairs
        return np.array(level, dtype=np.int64), np.array(y, dtype=np.int64), new

    def _encode_growing(self, paths: Sequence[LabelPath | None], new: list[tuple[int, str]]) -> list[tuple[int, int]]:
        encoded = []
        for path in paths:
            if path is None:
                encoded.append((-1, -1))
                continue
            known = self._known.get(path)
            if known is None:
                parent, consistent = -1, True
                for depth, name in enumerate(path):
                    index = self._add(depth, name, parent, new)
                    consistent = consistent and self.parents[depth][index] == parent
                    parent = index
                known = (len(path) - 1, parent)
                if consistent:  # only a path that matches the tree may skip problem() later
                    self._known[path] = known
            encoded.append(known)
        return encoded

    def path(self, level: int, index: int) -> LabelPath:
        """The full path of class ``index`` at ``level``."""
        out = []
        while level >= 0 and index >= 0:
            out.append(self.names[level][index])
            index = self.parents[level][index]
            level -= 1
        return tuple(reversed(out))

    def parent_of(self, level: int, index: int) -> int:
        return self.parents[level][index]

    def parent_map(self, level: int) -> np.ndarray:
        """Parent index (at level - 1) of every class at ``level`` (-1 at level 0)."""
        return np.asarray(self.parents[level], dtype=np.int64)

    def parent_maps(self) -> list[np.ndarray]:
        """:meth:`parent_map` of every level, as :func:`monitoring.hierarchy.level_correct` takes them."""
        return [self.parent_map(level) for level in range(self.depth)]

    def state_dict(self) -> dict[str, Any]:
        return {
            "max_depth": self.max_depth,
            "names": [list(n) for n in self.names],
            "parents": [list(p) for p in self.parents],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.max_depth = int(state["max_depth"])
        self.names = [list(n) for n in state["names"]]
        self.parents = [list(p) for p in state["parents"]]
        self._index = [{name: i for i, name in enumerate(level)} for level in self.names]
        self._known = {}
        self.version += 1

    def _add(self, depth: int, name: str, parent: int, new: list[tuple[int, str]]) -> int:
        if depth == self.depth:
            self.names.append([])
            self.parents.append([])
            self._index.append({})
        idx = self._index[depth].get(name)
        if idx is None:
            idx = len(self.names[depth])
            self._index[depth][name] = idx
            self.names[depth].append(name)
            self.parents[depth].append(parent)
            new.append((depth, name))
            self.version += 1
        return idx
