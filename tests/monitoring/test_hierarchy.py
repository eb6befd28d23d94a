"""The HLE parent rule, anytime accuracy and class-wise final forgetting on hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest

from monitoring.hierarchy import anytime_accuracy, class_accuracy, final_forgetting, level_correct
from monitoring.probe import ProbeSet

# Level 0: animal (0), vehicle (1). Level 1: dog (0) -> animal, car (1) -> vehicle, cat (2) -> animal.
MAPS = [np.array([-1, -1]), np.array([0, 1, 0])]


def test_parent_rule_accepts_the_parent_head_or_a_child_of_the_true_parent() -> None:
    predicted = np.array(
        [
            [0, 1],  # parent head right, child says car: right (parent head)
            [1, 2],  # parent head wrong, child cat -> animal: right (via child)
            [1, 1],  # both point to vehicle: wrong
            [0, -1],  # no child class yet: parent head only, right
            [1, -1],  # no child class yet, parent head wrong: wrong
        ]
    )
    level, y = np.zeros(5, dtype=int), np.zeros(5, dtype=int)
    assert level_correct(predicted, level, y, MAPS).tolist() == [True, True, False, True, False]
    assert level_correct(predicted, level, y, MAPS, parent_rule=False).tolist() == [True, False, False, True, False]
    assert level_correct(predicted, level, y).tolist() == [True, False, False, True, False]


def test_child_level_is_scored_by_its_own_head_only() -> None:
    predicted = np.array([[1, 0], [0, 2], [0, 0]])
    got = level_correct(predicted, np.array([1, 1, 0]), np.array([0, 0, 1]), MAPS)
    # sample 1: parent right but child wrong -> wrong; sample 2: level 0 label vehicle, both say animal.
    assert got.tolist() == [True, False, False]


def test_levels_beyond_the_prediction_width_are_wrong() -> None:
    predicted = np.array([[0], [0]])
    assert level_correct(predicted, np.array([1, 0]), np.array([0, 0]), MAPS).tolist() == [False, True]


def test_parent_rule_spans_a_deeper_tree_one_level_at_a_time() -> None:
    maps = [np.array([-1, -1]), np.array([0, 1]), np.array([1, 0, 0])]
    predicted = np.array([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    got = level_correct(predicted, np.array([1, 1, 0]), np.array([0, 1, 1]), maps)
    # rows 0-1: level-1 head wrong, the predicted level-2 class has the true level-1 parent: right.
    # row 2: level-0 head wrong, predicted level-1 class 0 has parent 0: wrong, although level 2's
    # prediction descends from class 1 (only the immediate child level counts).
    assert got.tolist() == [True, True, False]


def test_anytime_and_last_accuracy() -> None:
    assert anytime_accuracy([0.5, 0.25, 0.75]) == (0.5, 0.75)
    assert anytime_accuracy([]) == (0.0, 0.0)


def test_final_forgetting_skips_classes_never_recognised_before_the_end() -> None:
    history = {0: [0.2, 0.8, 0.4], 1: [0.0, 0.0, 0.5], 2: [0.6, 0.7], 3: [0.9]}
    assert final_forgetting(history) == pytest.approx(((0.8 - 0.4) + (0.6 - 0.7)) / 2)
    assert final_forgetting({}) == 0.0


def test_class_accuracy_groups_by_key() -> None:
    got = class_accuracy(np.array([True, False, True, True]), np.array([3, 3, 5, 5]))
    assert got == {3: 0.5, 5: 1.0}


def test_probe_set_uses_the_parent_rule_when_given_parent_maps() -> None:
    probe = ProbeSet(fraction=1.0, per_class=4)
    for v in (0.0, 1.0):
        probe.add(np.array([v]), ("animal",))

    def predict(x: np.ndarray) -> np.ndarray:  # parent head says vehicle, child head says cat
        return np.tile([1, 2], (len(x), 1))

    def lookup(path: tuple[str, ...]) -> tuple[int, int]:
        return (0, 0) if path == ("animal",) else (-1, -1)

    assert probe.evaluate(predict, lookup).level_accuracy == {0: 0.0}
    assert probe.evaluate(predict, lookup, parent_maps=MAPS).level_accuracy == {0: 1.0}
