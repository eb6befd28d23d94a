"""PL-FMS: FMS probabilities, importance eviction and update, re-scoring, both adaptive-LR schedules,
pseudo-labels, AutoAugment switch, state."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from buffers.memory import MemoryStore
from buffers.store import class_keys
from stream_cl.build import build_learner
from stream_cl.inputs import to_model_input
from stream_cl.labels import LabelTree
from stream_cl.learner import Batch
from stream_cl.methods.hle_augment import augment, cutmix
from stream_cl.methods.pl_fms import PLFMS
from stream_cl.methods.pl_fms_losses import ancestor_targets, parent_pseudo_loss, per_sample_ce
from stream_cl.methods.pl_fms_parts import (
    AdaptiveLR,
    ImportanceScores,
    OfficialAdaptiveLR,
    fms_keep_probability,
)


def test_fms_keep_probability_on_hand_made_cases() -> None:
    # N = 1000, 4 classes seen, now at n = 300: a class seen since 0 is kept with min(1, 1.2) = 1,
    # one first seen at 250 with 50·4/1000 = 0.2, one that just appeared with 0.
    p = fms_keep_probability(300, np.array([0, 250, 300]), 4, 1000)
    assert p.tolist() == pytest.approx([1.0, 0.2, 0.0])
    assert fms_keep_probability(300, np.array([250]), 4, 1000, factor=2.0).tolist() == pytest.approx([0.1])


def _learner(capacity: int = 4, **kw) -> PLFMS:
    torch.manual_seed(0)
    return build_learner(
        "pl-fms", "mlp", (8, 8, 3), np.dtype("uint8"), device=torch.device("cpu"), buffer_size=capacity,
        width=16, hparams={"batch_size": 4, "online_iter": 1.0, "total_stream_length": 64, **kw},
    )  # fmt: skip


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8))


def test_eviction_replaces_the_least_important_sample_of_the_largest_class() -> None:
    learner = _learner(capacity=4)
    store, scores = learner.buffer, learner.scores
    y, level = torch.tensor([0, 0, 0, 1]), torch.zeros(4, dtype=torch.long)
    scores.written(store.add(_images(4), y, level), class_keys(y.numpy(), level.numpy()))
    scores.score[:] = [0.5, -1.0, 0.2, 0.0]
    # Incoming class 1: counts with it are {0: 3, 1: 2}; class 0 loses its lowest-importance slot 1.
    slots = store.add(_images(1, 1), torch.tensor([1]), torch.tensor([0]))
    assert slots.tolist() == [1]
    scores.written(slots, class_keys(np.array([1]), np.array([0])))
    assert scores.score[1] == pytest.approx(0.0)  # initial score: mean of its class's other samples (slot 3)
    # Now {0: 2, 1: 2}; an incoming class-1 sample makes class 1 the largest: its least important goes.
    scores.score[:] = [0.5, 0.3, 0.2, -0.4]
    assert store.add(_images(1, 2), torch.tensor([1]), torch.tensor([0])).tolist() == [3]


def test_first_sample_of_a_class_starts_at_zero_or_the_global_mean() -> None:
    scores = ImportanceScores(3)
    scores.written(np.array([0, 1]), np.array([7, 7]))
    scores.score[:2] = [1.0, 3.0]
    scores.written(np.array([2]), np.array([9]))  # appended, first of class 9
    assert scores.score[2] == 0.0
    scores.written(np.array([0]), np.array([5]))  # replaces slot 0: mean of the others (3.0 and 0.0)
    assert scores.score[0] == pytest.approx(1.5)


def test_importance_update_follows_clib() -> None:
    scores = ImportanceScores(3, beta=0.9)
    scores.written(np.array([0, 1, 2]), np.array([1, 1, 2]))
    assert scores.update_importance(np.array([2.0, 2.0, 2.0])) is None  # no previous loss yet
    scores.score[:] = [0.1, 0.0, 0.0]
    scores.note_used(np.array([0, 0, 2]))
    scores.written(np.array([1]), np.array([1]))  # slot 1 replaced: left out of the mean decrease
    decrease = scores.update_importance(np.array([1.0, 5.0, 1.5]))
    delta = ((1.0 - 2.0) + (1.5 - 2.0)) / 2  # -0.75
    assert decrease == pytest.approx(0.75)
    mean_used = (0.1 + 0.1 + 0.0) / 3
    step = 0.1 * (delta - mean_used / 3)
    assert scores.score[0] == pytest.approx(0.1 - step) and scores.score[2] == pytest.approx(-step)
    assert scores.used == []


def test_adaptive_lr_lowers_both_rates_when_the_low_rate_does_better() -> None:
    control = AdaptiveLR(1.0, step=0.5, period=1, length=3, warmup=0)
    rates = [control.lr]
    for i in range(6):  # decreases under high: 0.1-ish, under low: 1.0-ish (low wins)
        rates.append(control.tick((1.0 if not control.is_high else 0.1) + 0.01 * i))
    assert rates[:3] == [1.0, 0.5, 1.0]
    assert (control.high, control.low) == (0.5, 0.25)
    with pytest.raises(ValueError, match="step"):
        AdaptiveLR(1.0, step=1.5)


def test_augment_and_cutmix_keep_shapes_and_mix_within_levels() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.arange(6, dtype=torch.float32)[:, None, None, None].expand(6, 3, 8, 8).contiguous()
    assert augment(x, gen).shape == x.shape
    level = torch.tensor([0, 0, 0, 1, 1, 1])
    mixed, partner, lam = cutmix(x, level, gen)
    assert mixed.shape == x.shape and 0.0 <= lam <= 1.0
    assert torch.equal(level[partner], level)
    assert set(mixed[:3].unique().tolist()) <= {0.0, 1.0, 2.0} and set(mixed[3:].unique().tolist()) <= {3.0, 4.0, 5.0}


def test_pseudo_labels_only_for_confident_parent_predictions_of_child_samples() -> None:
    parent = torch.tensor([[4.0, 0.0], [0.1, 0.0], [4.0, 0.0]])
    child = torch.zeros(3, 3)
    loss = parent_pseudo_loss([parent, child], torch.tensor([1, 1, 0]), tau=0.75, lambda_u=2.0)
    expected = 2.0 * torch.nn.functional.cross_entropy(parent[:1], torch.tensor([0]))
    assert loss[0].item() == pytest.approx(expected.item())
    assert loss[1].item() == 0.0 and loss[2].item() == 0.0  # not confident / parent-labelled


def test_ancestors_walk_up_the_tree() -> None:
    tree = LabelTree()
    tree.encode([("a", "x", "p"), ("b", "y", "q"), ("a", "z")])
    got = ancestor_targets(tree.parent_maps(), torch.tensor([1, 0, 0]), torch.tensor([2, 1, 0]))
    assert [(lv.tolist(), c.tolist()) for lv, c in got] == [([1, -1, -1], [1, 0, 0]), ([0, 0, -1], [1, 0, 0])]


def test_learns_a_hierarchical_stream_predicting_first_and_resumes_exactly() -> None:
    learner = _learner(capacity=6, imp_update_period=2)
    paths = [("p0",), ("p1",), ("p0",), ("p1",), ("p0", "c0"), ("p1", "c1"), ("p0", "c2"), None]
    obs = learner.observe(Batch(_images(8), paths))
    assert (obs.prediction.classes == -1).all()  # predicted before any head existed
    assert learner.labels.sizes == [2, 3] and len(learner.buffer) == 6 and learner.n == 7
    assert obs.stats.n_learned == 7 and obs.stats.loss is not None and learner.iterations >= 2
    buf = io.BytesIO()
    torch.save(learner.state_dict(), buf)
    batch = Batch(_images(4, 3), [("p1", "c1"), ("p0", "c3"), ("p1",), ("p0", "c0")])
    x = _images(5, 4)
    # Continue first: new head rows draw from torch's global RNG, which the checkpoint restores.
    a = learner.observe(batch)
    after = learner.predict(x)
    twin = _learner(capacity=6, imp_update_period=2)
    twin.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    b = twin.observe(batch)
    assert torch.equal(a.prediction.classes, b.prediction.classes)
    assert torch.equal(after.confidence, twin.predict(x).confidence)
    assert learner.first_seen == twin.first_seen and np.array_equal(learner.scores.score, twin.scores.score)


def test_hyper_parameters_and_buffer_are_validated() -> None:
    for bad in ({"batch_size": 3}, {"online_iter": 0}, {"tau": 1.0}, {"imp_update_period": 0}):
        with pytest.raises(ValueError):
            _learner(**bad)
    store = MemoryStore(4)  # already holds samples chosen by another policy
    store.add(_images(1), torch.tensor([0]), torch.tensor([0]))
    with pytest.raises(ValueError, match="MemoryStore"):
        PLFMS(_learner().model, store)


def test_switches_train_ancestors_and_pseudo_labels_in_importance_run() -> None:
    paths = [("p0",), ("p1",), ("p0", "c0"), ("p1", "c1"), ("p0", "c2"), ("p1", "c3"), ("p0", "c0"), ("p1", "c1")]
    for kw in ({"train_ancestors": True}, {"pseudo_in_importance": True, "tau": 0.0}):
        learner = _learner(capacity=6, imp_update_period=1, **kw)
        obs = learner.observe(Batch(_images(8), paths))
        assert np.isfinite(obs.stats.loss) and learner.pseudo_label == ("train_ancestors" not in kw)
        assert learner.scores.score[: len(learner.buffer)].any()  # importance was updated


def test_batched_rescoring_equals_scoring_each_stored_sample_alone() -> None:
    learner = _learner(capacity=7, imp_update_period=100)
    paths = [("p0",), ("p1",), ("p0", "c0"), ("p1", "c1"), ("p0", "c2"), ("p1", "c3"), ("p0", "c0"), ("p1",)]
    learner.observe(Batch(_images(8), paths))
    seen = []
    learner.scores.update_importance = seen.append  # capture the losses by slot
    learner._rescore(chunk=3)  # chunks of 3 over 7 stored samples: a partial last chunk
    model, store = learner.model, learner.buffer
    model.eval()
    with torch.no_grad():
        y, level = store.labels()
        alone = [
            torch.nn.functional.cross_entropy(
                model.logits(model(to_model_input(store._x[k : k + 1])))[int(level[k])], y[k : k + 1]
            ).item()
            for k in range(len(store))
        ]
    assert seen[0].tolist() == pytest.approx(alone, rel=1e-5, abs=1e-6)


def test_per_sample_ce_scores_each_row_under_its_own_head_only() -> None:
    coarse, fine = torch.randn(4, 2), torch.randn(4, 5)
    y, level = torch.tensor([1, 4, 0, 3]), torch.tensor([0, 1, 0, -1])
    got = per_sample_ce([coarse, fine], y, level)
    ce = torch.nn.functional.cross_entropy
    expected = [ce(coarse[0:1], y[0:1]), ce(fine[1:2], y[1:2]), ce(coarse[2:3], y[2:3]), torch.tensor(0.0)]
    assert got.tolist() == pytest.approx([e.item() for e in expected])


def test_official_lr_schedule_credits_whole_windows_of_unreplaced_samples() -> None:
    control = OfficialAdaptiveLR(1.0, step=0.5, period=2, length=2, warmup=0)
    writes = np.zeros(3, dtype=np.int64)
    assert control.count(np.array([5.0, 5.0, 5.0]), writes) == 1.0  # count 1: inside the first window
    assert control.count(np.array([4.0, 4.0, 4.0]), writes) == 0.5  # count 2: switch to low, nothing to credit yet
    control.count(np.array([3.0, 3.0, 3.0]), writes)
    replaced = np.array([0, 1, 0])  # slot 1 got a new sample during the window: left out
    assert control.count(np.array([2.0, 9.0, 3.0]), replaced) == 1.0  # low credited (4 - 2 + 4 - 3) / 2
    assert control.low_gains == [1.5] and control.high_gains == []
    # Two more windows under each rate, the low rate always doing better: both rates go down,
    # the lists restart and the rate in use flips once more.
    loss = np.array([2.0, 9.0, 3.0])
    for gain in (0.1, 1.6, 0.2):  # high, low, high: low gains [1.5, 1.6], high [0.1, 0.2]
        control.count(loss, replaced)
        loss = loss - gain
        control.count(loss, replaced)
    assert (control.high, control.low) == (0.5, 0.25)
    assert control.high_gains == [] and control.low_gains == []
    assert control.lr == 0.5  # the last switch went to low; the extra flip returns to high, now 0.5
    with pytest.raises(ValueError, match="step"):
        OfficialAdaptiveLR(1.0, step=0.0)


def test_official_schedule_counts_once_per_batch_that_ends_on_a_rescoring() -> None:
    paths = [("p0",), ("p1",), ("p0",), ("p1",), ("p0", "c0"), ("p1", "c1"), ("p0", "c2"), ("p1", "c3")]
    # B = 4: the stream arrives 2 at a time, 3 updates per sample: 6 updates per temporary batch,
    # 24 for 8 samples; re-scoring every 4 updates: 6 re-scorings, 2 batch ends on one (12, 24).
    every = _learner(capacity=6, online_iter=3.0, imp_update_period=4, lr_warmup=0)
    official = _learner(capacity=6, online_iter=3.0, imp_update_period=4, adaptive_lr_schedule="official")
    for learner in (every, official):
        learner.observe(Batch(_images(8), paths))
    assert every.lr_control.ticks == 6 and official.lr_control.counts == 2
    with pytest.raises(ValueError, match="adaptive_lr_schedule"):
        _learner(adaptive_lr_schedule="sometimes")
    with pytest.raises(ValueError, match="adaptive_lr_schedule"):
        official.load_state_dict(every.state_dict())


def test_official_schedule_and_autoaugment_resume_exactly() -> None:
    kw = {"capacity": 6, "imp_update_period": 1, "adaptive_lr_schedule": "official", "lr_period": 1, "lr_warmup": 0}
    learner = _learner(**kw, autoaugment=True)
    paths = [("p0",), ("p1",), ("p0",), ("p1",), ("p0", "c0"), ("p1", "c1"), ("p0", "c2"), ("p1", "c3")]
    learner.observe(Batch(_images(8), paths))
    buf = io.BytesIO()
    torch.save(learner.state_dict(), buf)
    batch, x = Batch(_images(4, 3), [("p1", "c1"), ("p0", "c3"), ("p1",), ("p0", "c0")]), _images(5, 4)
    learner.observe(batch)
    twin = _learner(**kw, autoaugment=True)
    twin.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    twin.observe(batch)
    assert torch.equal(learner.predict(x).confidence, twin.predict(x).confidence)
    assert learner.lr_control.state_dict().keys() == twin.lr_control.state_dict().keys()
    assert learner.lr_control.counts == twin.lr_control.counts > 0
    with pytest.raises(ValueError, match="uint8 RGB"):
        learner.observe(Batch(torch.zeros(2, 8, 8, 3), [("p0",), ("p1",)]))


def test_losses_of_half_precision_logits_are_finite_float32_and_match_full_precision() -> None:
    gen = torch.Generator().manual_seed(0)
    coarse, fine = 30 * torch.randn(6, 3, generator=gen), 30 * torch.randn(6, 7, generator=gen)
    y, level = torch.tensor([0, 2, 6, 1, 0, 5]), torch.tensor([0, 0, 1, 1, 1, 1])
    full = per_sample_ce([coarse, fine], y, level), parent_pseudo_loss([coarse, fine], level, 0.5, 1.0)
    half = (
        per_sample_ce([coarse.half(), fine.half()], y, level),
        parent_pseudo_loss([coarse.half(), fine.half()], level, 0.5, 1.0),
    )
    for want, got in zip(full, half, strict=True):
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        assert torch.allclose(got, want, rtol=1e-2, atol=0.1)
