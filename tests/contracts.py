"""Checks every registered learner must pass (after river's ``checks``), parametrized in test_learners."""

from __future__ import annotations

import io

import numpy as np
import torch

from stream_cl.learner import Batch, Learner

SHAPE = (8, 8, 3)


def stream(n: int = 60, n_classes: int = 3, seed: int = 0) -> list[Batch]:
    """Micro-batches of 10 uint8 images whose classes arrive one after the other."""
    rng = np.random.default_rng(seed)
    batches = []
    for start in range(0, n, 10):
        y = np.minimum((np.arange(start, start + 10) * n_classes) // n, n_classes - 1)
        x = rng.integers(0, 255, size=(10, *SHAPE), dtype=np.uint8)
        x[:, :, :, 0] = (y[:, None, None] * 80).astype(np.uint8)  # a class signal in the red channel
        batches.append(Batch(torch.from_numpy(x), [(f"class{k}",) for k in y]))
    return batches


def check_predict_before_observe(learner: Learner) -> None:
    pred = learner.predict(stream()[0].x)
    assert pred.classes.shape[0] == 10
    assert (pred.classes == -1).all(), "no class can be predicted before any label was seen"


def check_predict_is_pure(learner: Learner) -> None:
    for batch in stream()[:3]:
        learner.observe(batch)
    x = stream(seed=1)[0].x
    first, second = learner.predict(x), learner.predict(x)
    assert torch.equal(first.classes, second.classes)
    assert torch.allclose(first.confidence, second.confidence)


def check_observe_predicts_before_learning(learner: Learner) -> None:
    batches = stream()
    learner.observe(batches[0])
    expected = learner.predict(batches[1].x)
    obs = learner.observe(batches[1])
    assert torch.equal(obs.prediction.classes, expected.classes), "observe must predict with the pre-step model"
    assert obs.stats.n_learned == 10


def check_state_round_trip(learner: Learner, fresh: Learner) -> None:
    for batch in stream():
        learner.observe(batch)
    buf = io.BytesIO()
    torch.save(learner.state_dict(), buf)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    x = stream(seed=2)[0].x
    assert torch.equal(learner.predict(x).classes, fresh.predict(x).classes)
    assert fresh.labels.sizes == learner.labels.sizes


def check_a_first_batch_of_one_record_is_learned(learner: Learner) -> None:
    """A slow topic hands records over one at a time: the very first learning step may hold one sample (no
    replay yet), whose 8×8 image is 1×1 deep in a ResNet."""
    first = stream()[0]
    obs = learner.observe(Batch(first.x[:1], first.labels[:1]))
    assert obs.stats.n_learned == 1
    assert learner.observe(Batch(first.x[1:2], first.labels[1:2])).stats.n_learned == 1


def check_new_labels_mid_stream(learner: Learner) -> None:
    batches = stream()
    for batch in batches[:3]:
        learner.observe(batch)
    sizes = list(learner.labels.sizes)
    obs = learner.observe(Batch(batches[3].x, [("brand_new",)] * 10))
    assert (0, "brand_new") in obs.new_labels
    assert learner.labels.sizes[0] == sizes[0] + 1
    assert learner.predict(batches[3].x).classes.max() <= sizes[0]


def check_unlabelled_records_are_not_learned(learner: Learner) -> None:
    batch = stream()[0]
    obs = learner.observe(Batch(batch.x, [None] * 10))
    assert obs.stats.n_learned == 0 and len(learner.buffer) == 0
    assert (obs.y == -1).all()


def check_mixed_batch_learns_only_the_labelled(learner: Learner) -> None:
    batch = stream()[0]
    labels = [path if i % 2 else None for i, path in enumerate(batch.labels)]
    obs = learner.observe(Batch(batch.x, labels))
    assert obs.stats.n_learned == 5 and len(obs.prediction.classes) == 10
    assert (obs.y[0::2] == -1).all() and (obs.y[1::2] >= 0).all()
    assert len(learner.buffer) <= 5


def run_all_seeded(make) -> list[torch.Tensor]:
    learner = make()
    return [learner.observe(b).prediction.classes for b in stream()]


def float_stream(n: int = 200, n_classes: int = 2, seed: int = 0) -> list[Batch]:
    """Micro-batches of 10 float32 CHW images (3, 8, 8); the class sets the mean of channel 0."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(n // 10):
        y = rng.integers(0, n_classes, size=10)
        x = rng.normal(0.0, 0.5, size=(10, 3, 8, 8)).astype(np.float32)
        x[:, 0] += 4.0 * y[:, None, None] - 2.0
        batches.append(Batch(torch.from_numpy(x), [(f"class{k}",) for k in y]))
    return batches


def same_state(a: object, b: object) -> bool:
    """Whether two state dicts hold identical values (tensors element for element; NaN, a "none yet" marker in
    some method states, equals NaN)."""
    if isinstance(a, torch.Tensor):
        if not (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape):
            return False
        return torch.equal(a, b) or (a.is_floating_point() and bool(((a == b) | (a.isnan() & b.isnan())).all()))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b, strict=True))
    return a == b


POISONS = {4: (3e38, "non_finite_loss"), 6: (1e12, "extreme_input")}
"""Batch index → (value written into one labelled record, the reason it must be refused for)."""


def check_poisoned_batch_is_refused(make, min_accuracy: float | None) -> None:
    """A labelled record holding 3e38 (finite float32, but its square is not), and later one holding 1e12
    (finite squared, but far beyond the usual inputs), are refused; the learner is as if they never came.

    ``make()`` builds a learner for float32 (3, 8, 8) records and seeds torch's global RNG. The same
    stream is learned twice, once with a poisoned batch mid-stream (one after the other: heads grow
    from the global RNG). The refusal leaves the state (model, optimizer, buffer, RNGs) unchanged,
    and both runs end with the same held-out predictions: varied ones, and at least ``min_accuracy``
    right where the method learns this short stream (OnPro needs a longer one).
    """
    batches, held_out = float_stream(), float_stream(n=40, seed=1)
    x_test = torch.cat([b.x for b in held_out])

    def run(poison: bool) -> Learner:
        learner = make()
        for i, batch in enumerate(batches):
            if poison and i in POISONS:
                value, reason = POISONS[i]
                x = batch.x.clone()
                x[3, 0, 2, 2] = value
                before = learner.state_dict()
                obs = learner.observe(Batch(x, batch.labels))
                assert obs.stats.rejected == reason and obs.stats.n_learned == 0
                assert (obs.y >= 0).all(), "the refused records keep their (known) labels for the caller"
                assert same_state(before, learner.state_dict()), "model, optimizer, buffer and RNGs are untouched"
            assert learner.observe(batch).stats.rejected is None
        return learner

    clean = run(poison=False).predict(x_test).classes[:, 0]
    poisoned = run(poison=True)
    predicted = poisoned.predict(x_test).classes[:, 0]
    assert torch.equal(predicted, clean), "held-out predictions are those of the run without the poison"
    assert len(predicted.unique()) > 1, "a model damaged into one constant answer would not be told apart"
    if min_accuracy is not None:
        names = poisoned.labels.names[0]
        y_test = torch.tensor([int(path[0][-1]) for b in held_out for path in b.labels])
        accuracy = (torch.tensor([int(names[c][-1]) for c in predicted.tolist()]) == y_test).float().mean()
        assert accuracy >= min_accuracy, f"held-out accuracy {accuracy:.2f}"
