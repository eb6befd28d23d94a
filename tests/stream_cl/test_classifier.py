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


def test_heads_follow_the_tree_through_new_classes_and_loads_and_skip_unchanged_ones() -> None:
    classifier = _classifier("mlp", (6,))
    optimizer = torch.optim.SGD(classifier.parameters(), lr=0.1)
    assert classifier.heads.sizes == [2, 1]
    classifier.tree.encode([("a",), ("a", "x")])  # known classes grow nothing
    assert not classifier.sync(optimizer)
    classifier.tree.encode([("c",)])
    assert classifier.sync(optimizer) and classifier.heads.sizes == [3, 1]
    assert not classifier.sync(optimizer), "nothing new since the last sync"
    bigger = LabelTree()
    bigger.encode([("a",), ("b",), ("c",), ("d", "z"), ("a", "x"), ("d", "w")])
    classifier.tree.load_state_dict(bigger.state_dict())
    assert classifier.sync(optimizer) and classifier.heads.sizes == [4, 3], "a loaded tree grows the heads too"
    weight = classifier.heads.heads[0].weight
    assert any(p is weight for g in optimizer.param_groups for p in g["params"]), "the optimizer trains the grown head"


def test_hooks_on_the_classifier_and_its_heads_run_on_the_fast_path() -> None:
    classifier = _classifier("mlp", (6,))
    x = torch.randn(3, 6)
    plain = classifier.level_logits(x)
    seen: list[str] = []
    handles = [
        classifier.register_forward_pre_hook(lambda module, args: seen.append("classifier pre")),
        classifier.register_forward_hook(lambda module, args, out: out * 2),  # features doubled
        classifier.heads.register_forward_hook(lambda module, args, out: seen.append("heads") or None),
    ]
    hooked = classifier.level_logits(x)
    assert seen == ["classifier pre", "heads"]
    bias = [head.bias for head in classifier.heads.heads]
    for level, (out, base) in enumerate(zip(hooked, plain, strict=True)):  # linear heads: 2 W f + b = 2 (W f + b) - b
        assert torch.allclose(out, 2 * base - bias[level], atol=1e-6)
    for handle in handles:
        handle.remove()
    seen.clear()
    assert all(torch.equal(a, b) for a, b in zip(classifier.level_logits(x), plain, strict=True)) and not seen


def test_global_module_hooks_reach_the_classifier_on_the_fast_path() -> None:
    classifier = _classifier("mlp", (6,))
    called: list[type] = []
    handle = nn.modules.module.register_module_forward_hook(lambda module, args, out: called.append(type(module)))
    try:
        classifier.level_logits(torch.randn(2, 6))
    finally:
        handle.remove()
    assert Classifier in called
