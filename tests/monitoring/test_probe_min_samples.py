"""Forgetting from a probe that is still filling: a best accuracy only counts evaluations with enough samples.

A class's forgetting is its best probe accuracy so far minus its current one. Taken over every evaluation,
the best is a running maximum of noisy accuracies, the first of them from a single sample (0 or 1): a model
that forgets nothing read about 0.3 of forgetting, above the alert threshold.
"""

from __future__ import annotations

import numpy as np
import pytest

from monitoring.probe import ProbeSet

CLASSES = 400
SIZES = [*range(1, 51, 5), 50]
"""Probe samples of each class at each evaluation: 1, then 5 more per evaluation, up to 50."""


def predictor(accuracy: list[float]):
    """A model right on a sample when the sample's fixed draw ``x[:, 1]`` is under ``accuracy[0]`` (mutable)."""

    def predict(x: np.ndarray) -> np.ndarray:
        cls = x[:, 0].astype(int)
        return np.where(x[:, 1] < accuracy[0], cls, (cls + 1) % CLASSES)[:, None]

    return predict


def lookup(path: tuple[str, ...]) -> tuple[int, int]:
    return 0, int(path[0])


def constant_accuracy_forgetting(accuracy: float, **probe_args: int) -> np.ndarray:
    """Per-class forgetting after the probe filled up (:data:`SIZES`) under a model of constant accuracy."""
    rng = np.random.default_rng(0)
    probe = ProbeSet(fraction=1.0, per_class=50, **probe_args)
    predict = predictor([accuracy])
    held = 0
    for size in SIZES:
        for cls in range(CLASSES):
            for _ in range(size - held):
                probe.add(np.array([cls, rng.random()]), (str(cls),))
        held = size
        result = probe.evaluate(predict, lookup)
    return np.array([result.class_forgetting.get((str(c),), 0.0) for c in range(CLASSES)])


@pytest.mark.parametrize("accuracy", [0.5, 0.7])
def test_a_model_that_forgets_nothing_reads_little_forgetting(accuracy: float) -> None:
    every_evaluation = constant_accuracy_forgetting(accuracy, min_samples=1)  # the old rule: the bias
    assert every_evaluation.mean() > 0.2 and (every_evaluation > 0.3).mean() > 0.3
    forgetting = constant_accuracy_forgetting(accuracy)
    assert forgetting.mean() < 0.1
    assert (forgetting > 0.3).mean() < 0.01  # the alert threshold


def test_a_real_drop_reads_as_forgetting() -> None:
    probe = ProbeSet(fraction=1.0, per_class=50)
    for cls, n in ((0, 50), (1, 10)):  # class 1 has fewer than min_samples (20): no forgetting of its own
        for u in np.linspace(0, 1, n, endpoint=False):
            probe.add(np.array([cls, u]), (str(cls),))
    accuracy = [0.9]
    first = probe.evaluate(predictor(accuracy), lookup)
    assert first.class_accuracy[("0",)] == pytest.approx(0.9) and first.class_forgetting == {("0",): 0.0}
    accuracy[0] = 0.3
    second = probe.evaluate(predictor(accuracy), lookup)
    assert second.class_forgetting == {("0",): pytest.approx(0.6)}
    assert second.level_forgetting == {0: pytest.approx(0.6)}  # class 1 (1.0 -> 0.3 on 10 samples) not averaged in
    assert probe.best == {("0",): pytest.approx(0.9)}


def test_a_class_counts_from_its_first_evaluation_with_enough_samples() -> None:
    probe = ProbeSet(fraction=1.0, per_class=50, min_samples=20)
    accuracy = [1.0]
    predict = predictor(accuracy)
    for u in np.linspace(0, 1, 10, endpoint=False):
        probe.add(np.array([0, u]), ("0",))
    assert probe.evaluate(predict, lookup).class_forgetting == {}  # 10 samples, all right: not a best yet
    for u in np.linspace(0.05, 1, 10, endpoint=False):
        probe.add(np.array([0, u]), ("0",))
    accuracy[0] = 0.5
    assert probe.evaluate(predict, lookup).class_forgetting == {("0",): 0.0}  # the best is 0.5, not 1.0
    accuracy[0] = 0.2
    assert probe.evaluate(predict, lookup).class_forgetting == {("0",): pytest.approx(0.3)}


def test_min_samples_is_capped_at_the_per_class_size() -> None:
    assert ProbeSet(per_class=5).min_samples == 5 and ProbeSet().min_samples == 20
    with pytest.raises(ValueError, match="min_samples"):
        ProbeSet(min_samples=0)
