"""OnPro over a label hierarchy: keys per level, per-level OPE and CE, and plain OnPro on flat streams."""

from __future__ import annotations

import numpy as np
import torch

from stream_cl.build import build_learner
from stream_cl.methods import hyper_parameters
from stream_cl.methods.onpro_losses import class_keys, keys_by_level, mixup_ce, proto_loss
from tests.stream_cl.test_onpro import batches


def make(method: str, seed: int = 0, **switches):
    return build_learner(
        method, "resnet18-reduced", (8, 8, 3), np.dtype(np.uint8), device=torch.device("cpu"), seed=seed,
        buffer_size=30, width=4, hparams={"rotations": 4, "replay_cap": 8, "task_grace": 1, **switches},
    )  # fmt: skip


TREE = [("animal",), ("vehicle",), ("animal", "dog"), ("animal", "cat"), ("vehicle", "bus")]


def keys(learner, paths: list[tuple[str, ...]]) -> torch.Tensor:
    level, y, _ = learner.labels.encode(paths)
    return class_keys(torch.from_numpy(level), torch.from_numpy(y))


def test_keys_by_level_gives_each_row_its_ancestor_or_its_own_class() -> None:
    learner = make("onpro-hle")
    learner.labels.encode(TREE)
    rows = keys(learner, [("animal", "cat"), ("vehicle",), ("vehicle", "bus"), ("animal",)])
    parent, child = keys_by_level(rows, learner.labels.parent_maps())
    assert parent.tolist() == keys(learner, [("animal",), ("vehicle",), ("vehicle",), ("animal",)]).tolist()
    assert child.tolist() == [rows[0].item(), -1, rows[2].item(), -1]
    assert [k.tolist() for k in keys_by_level(rows[[1, 3]], [np.array([-1, -1])])] == [rows[[1, 3]].tolist()]


def test_a_child_label_trains_the_parent_head_only_with_the_hierarchy() -> None:
    grads = {}
    for method in ("onpro", "onpro-hle"):
        learner = make(method)
        learner.labels.encode(TREE)
        rows = keys(learner, [("animal", "dog"), ("animal", "cat"), ("vehicle", "bus")])
        logits = [torch.randn(3, 2, requires_grad=True), torch.randn(3, 3, requires_grad=True)]
        learner._ce(logits, rows, rows, torch.zeros(3)).backward()
        grads[method] = [0.0 if lg.grad is None else lg.grad.abs().sum().item() for lg in logits]
    assert grads["onpro"][0] == 0 and grads["onpro"][1] > 0
    assert grads["onpro-hle"][0] > 0 and grads["onpro-hle"][1] == grads["onpro"][1]


def test_ope_sums_the_prototype_loss_of_every_level() -> None:
    learner = make("onpro-hle")
    learner.labels.encode(TREE)
    paths = [("animal", "dog"), ("animal", "cat"), ("vehicle", "bus"), ("vehicle",)] * 2
    rows = keys(learner, paths)
    z1, z2 = torch.nn.functional.normalize(torch.randn(2, 8, 4), dim=2)
    loss, present, mu = learner._ope(z1, z2, rows)
    tau = learner.proto_temperature
    parent = keys(learner, [p[:1] for p in paths])
    child = rows[[i for i, p in enumerate(paths) if len(p) == 2]]
    in_child = [i for i, p in enumerate(paths) if len(p) == 2]
    expected = proto_loss(z1, z2, parent, temperature=tau)[0]
    expected = expected + proto_loss(z1[in_child], z2[in_child], child, temperature=tau)[0]
    assert torch.allclose(loss, expected)
    own_loss, own_present, own_mu = proto_loss(z1, z2, rows, temperature=tau)
    assert torch.equal(present, own_present) and torch.equal(mu, own_mu)  # APF keeps each row's own class
    assert not torch.allclose(loss, own_loss)


def losses_and_weights(learner, stream: list[list[tuple[str, ...]]]) -> tuple[list[float], list[torch.Tensor]]:
    return [learner.observe(b).stats.loss for b in batches(stream)], list(learner.model.parameters())


FLAT = [[("a",), ("b",)]] * 2 + [[("c",), ("d",)]] * 3
HIERARCHICAL = [[("animal",), ("vehicle",)]] * 2 + [[("animal", "dog"), ("animal", "cat")]] * 3


def test_on_a_flat_stream_or_with_both_switches_off_it_is_onpro_step_for_step() -> None:
    # one learner after the other: new head rows are drawn from torch's global generator
    for stream, switches in ((FLAT, {}), (HIERARCHICAL, {"level_prototypes": False, "level_targets": False})):
        losses, weights = losses_and_weights(make("onpro"), stream)
        hle_losses, hle_weights = losses_and_weights(make("onpro-hle", **switches), stream)
        assert losses == hle_losses and len(set(losses)) == len(losses)
        assert all(torch.equal(a, b) for a, b in zip(weights, hle_weights, strict=True))
    losses, _ = losses_and_weights(make("onpro"), HIERARCHICAL)
    for switch in ("level_prototypes", "level_targets"):  # each switch alone changes the steps with child labels
        changed, _ = losses_and_weights(make("onpro-hle", **{switch: False}), HIERARCHICAL)
        assert changed[:2] == losses[:2] and changed[2:] != losses[2:]


def test_its_hyper_parameters_are_its_switches_and_onpros() -> None:
    names = hyper_parameters("onpro-hle")
    assert names[:2] == ["level_prototypes", "level_targets"] and set(names[2:]) == set(hyper_parameters("onpro"))


def test_it_learns_a_hierarchical_stream_and_mixes_replay_at_both_levels() -> None:
    learner = make("onpro-hle")
    stream = HIERARCHICAL + [[("vehicle", "bus"), ("vehicle", "car")]] * 3
    stats = [learner.observe(b).stats for b in batches(stream)]
    assert all(s.rejected is None and np.isfinite(s.loss) for s in stats)
    assert learner.task == 2 and learner.labels.sizes == [2, 4]
    assert stats[-1].n_replayed > 0
    logits = [torch.zeros(2, 2, requires_grad=True), torch.zeros(2, 3, requires_grad=True)]
    a, b = keys(learner, [("animal", "dog"), ("vehicle", "bus")]), keys(learner, [("vehicle",), ("animal", "cat")])
    lam = torch.tensor([0.25, 0.5])
    total = learner._ce(logits, a, b, lam)
    parent_a, parent_b = keys(learner, [("animal",), ("vehicle",)]), keys(learner, [("vehicle",), ("animal",)])
    child_b = torch.tensor([-1, b[1].item()])
    expected = mixup_ce(logits, parent_a, parent_b, lam) + mixup_ce(logits, a, child_b, lam)  # both members' ancestors
    assert torch.allclose(total, expected)
