"""LabelTree: growth from label paths of any depth, parents learned from data, conflicts, state."""

from __future__ import annotations

import numpy as np
import pytest

from stream_cl.labels import LabelTree


def test_tree_grows_coarse_then_fine_and_learns_parents_from_paths() -> None:
    tree = LabelTree()
    level, y, new = tree.encode([("vehicle",), ("animal",)])
    assert level.tolist() == [0, 0] and y.tolist() == [0, 1] and tree.sizes == [2]
    assert new == [(0, "vehicle"), (0, "animal")]
    level, y, new = tree.encode([("animal", "dog"), ("vehicle", "car"), ("animal", "dog"), None])
    assert level.tolist() == [1, 1, 1, -1] and y.tolist() == [0, 1, 0, -1]
    assert new == [(1, "dog"), (1, "car")]
    assert tree.sizes == [2, 2]
    assert tree.parent_map(1).tolist() == [1, 0]
    assert [m.tolist() for m in tree.parent_maps()] == [[-1, -1], [1, 0]]
    assert tree.path(1, 1) == ("vehicle", "car")


def test_a_deep_path_creates_every_level_at_once() -> None:
    tree = LabelTree()
    level, y, new = tree.encode([("living", "animal", "mammal", "dog")])
    assert level.tolist() == [3] and y.tolist() == [0]
    assert tree.sizes == [1, 1, 1, 1] and len(new) == 4
    tree.encode([("living", "plant", "tree", "oak"), ("living", "animal", "mammal", "cat")])
    assert tree.sizes == [1, 2, 2, 3]
    assert tree.parent_map(3).tolist() == [0, 1, 0]
    assert tree.lookup(("living", "plant", "tree")) == (2, 1)
    assert tree.lookup(("living", "plant", "fern")) == (-1, -1)
    assert tree.lookup(("a", "b", "c", "d", "e")) == (-1, -1)


def test_same_name_at_two_levels_is_two_classes() -> None:
    tree = LabelTree()
    tree.encode([("bird",), ("bird", "bird")])
    assert tree.sizes == [1, 1] and tree.parent_map(1).tolist() == [0]


def test_conflicting_parent_and_excess_depth_are_reported_not_learned() -> None:
    tree = LabelTree(max_depth=2)
    tree.encode([("animal", "dog")])
    assert tree.problem(("animal", "dog")) is None
    assert tree.problem(("vehicle", "car")) is None  # a new parent with a new child is fine
    assert "has parent 'animal'" in tree.problem(("vehicle", "dog"))
    assert "deeper than max_depth" in tree.problem(("a", "b", "c"))
    with pytest.raises(ValueError, match="max_depth"):
        LabelTree(max_depth=0)


def test_state_round_trip_keeps_indices() -> None:
    tree = LabelTree()
    tree.encode([("animal", "dog"), ("vehicle", "car"), ("animal",)])
    copy = LabelTree()
    copy.load_state_dict(tree.state_dict())
    assert copy.sizes == tree.sizes and copy.lookup(("vehicle", "car")) == (1, 1)
    _, y, new = copy.encode([("vehicle", "car"), ("animal", "cat")])
    assert y.tolist() == [1, 2] and new == [(1, "cat")]
    assert np.array_equal(copy.parent_map(1), [0, 1, 0])


def test_loading_state_replaces_what_the_tree_remembered() -> None:
    used = LabelTree()
    used.encode([("vehicle", "car"), ("animal", "dog")])
    other = LabelTree()
    other.encode([("animal", "dog"), ("vehicle", "car")])
    used.load_state_dict(other.state_dict())
    level, y, new = used.encode([("vehicle", "car"), ("animal", "dog")])
    assert level.tolist() == [1, 1] and y.tolist() == [1, 0] and new == []
    assert "has parent 'animal'" in used.problem(("vehicle", "dog"))


def test_a_batch_is_checked_as_if_learned_in_order() -> None:
    tree = LabelTree()
    tree.encode([("animal", "dog")])
    problems = tree.problems([("vehicle", "car"), None, ("animal", "car"), ("animal", "dog"), ("x", "y", "car")])
    assert problems[0] is None and problems[1] is None and problems[3] is None
    assert problems[2] == "'car' has parent 'vehicle', not 'animal'"  # claimed by the batch's first path
    assert problems[4] is None  # car at level 2 is another class than car at level 1


def test_an_inconsistent_path_encoded_anyway_is_not_remembered_as_good() -> None:
    tree = LabelTree()
    tree.encode([("animal", "dog"), ("vehicle", "dog")])  # the caller skipped problems()
    assert "has parent 'animal'" in tree.problem(("vehicle", "dog"))
