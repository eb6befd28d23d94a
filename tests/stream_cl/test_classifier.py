"""Classifier predictions: eval mode where it matters, no mode switching where it changes nothing."""

from __future__ import annotations

import torch
from torch import nn

from stream_cl.classifier import Classifier
from stream_cl.labels import LabelTree
from stream_cl.models import MLP, build_backbone, mode_matters


def _classifier(model: str, shape: tuple[int, ...]) -> Classifier:
    torch.manual_seed(0)
    tree = LabelTree()
    tree.encode([("a",), ("b",), ("a", "x")])
    classifier = Classifier(build_backbone(model, shape, width=8), tree, "cpu")
    classifier.sync()
    return classifier


def test_batch_norm_models_predict_in_eval_mode_and_return_to_training() -> None:
    classifier = _classifier("resnet18-reduced", (3, 8, 8))
    assert classifier.switch_mode
    stats = classifier.backbone.bn1.running_mean.clone()
    prediction = classifier.predict_prepared(torch.randn(4, 3, 8, 8) * 5 + 3)
    assert torch.equal(classifier.backbone.bn1.running_mean, stats), "prediction updated batch-norm statistics"
    assert classifier.training and classifier.backbone.bn1.training
    assert prediction.classes.shape == (4, 2) and prediction.confidence.shape == (4, 2)


def test_mlp_predictions_skip_the_mode_switch_and_match_eval_mode() -> None:
    classifier = _classifier("mlp", (6,))
    assert not classifier.switch_mode
    x = torch.randn(5, 6)
    fast = classifier.predict_prepared(x)
    classifier.eval()
    reference = classifier.predict_prepared(x)
    assert torch.equal(fast.classes, reference.classes) and torch.allclose(fast.confidence, reference.confidence)


def test_levels_without_a_head_yet_are_padded() -> None:
    classifier = _classifier("mlp", (6,))
    classifier.tree.encode([("a", "x", "deep")])  # a third level the heads have not grown to
    prediction = classifier.predict_prepared(torch.randn(3, 6))
    assert prediction.classes[:, 2].tolist() == [-1, -1, -1] and prediction.confidence[:, 2].tolist() == [0, 0, 0]
    assert (prediction.classes[:, :2] >= 0).all()


def test_unknown_layers_count_as_mode_dependent() -> None:
    assert not mode_matters(MLP(6, hidden=4))
    assert mode_matters(nn.Sequential(nn.Linear(4, 4), nn.RReLU()))  # random slopes in training only
    assert mode_matters(nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)))
