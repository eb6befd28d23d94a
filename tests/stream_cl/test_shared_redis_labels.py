"""Learners sharing one Redis buffer exchange labels by class name, whatever order each saw the classes in."""

from __future__ import annotations

import itertools

import numpy as np
import torch

from buffers.open import open_store
from stream_cl.build import build_learner
from stream_cl.learner import Batch
from tests import contracts

_names = itertools.count()
MARK = {"cat": 100.0, "dog": 200.0, "bird": 300.0}  # x[:, 0] says which class a flat sample is


def shared_url(server) -> str:
    url = f"{server.url}?name=shared-labels-{next(_names)}"
    open_store(url, 40).clear()
    return url


def mlp(url: str, seed: int):
    return build_learner(
        "er",
        "mlp",
        (8,),
        np.dtype(np.float32),
        device=torch.device("cpu"),
        seed=seed,
        buffer_spec=url,
        buffer_size=40,
    )


def flat(name: str, n: int = 10) -> Batch:
    x = torch.randn(n, 8)
    x[:, 0] = MARK[name]
    return Batch(x, [(name,)] * n)


def test_samples_of_one_learner_replay_with_the_other_learners_indices(redis_server):
    url = shared_url(redis_server)
    first, second = mlp(url, seed=1), mlp(url, seed=2)
    for name in ("cat", "dog"):
        first.observe(flat(name))
    for name in ("dog", "cat"):
        second.observe(flat(name))
    assert first.labels.names == [["cat", "dog"]] and second.labels.names == [["dog", "cat"]]

    for learner in (first, second):
        replay = learner.buffer.sample(40)
        assert len(replay) == 40, "both learners' samples are in the one buffer"
        index = {name: learner.labels.lookup((name,))[1] for name in ("cat", "dog")}
        expected = torch.where(replay.x[:, 0] == MARK["cat"], index["cat"], index["dog"])
        assert torch.equal(replay.y, expected) and torch.equal(replay.level, torch.zeros(40, dtype=torch.long))
        assert learner.buffer.stats(classes=True).class_counts == {(0, index["cat"]): 20, (0, index["dog"]): 20}


def test_a_class_only_another_learner_saw_joins_tree_and_heads(redis_server):
    url = shared_url(redis_server)
    writer, reader = mlp(url, seed=1), mlp(url, seed=2)
    x = torch.randn(10, 8)
    writer.observe(Batch(x, [("animal", "bird")] * 10))
    assert reader.buffer.stats(classes=True).class_counts == {}, "counts leave out classes this learner has not seen"

    for _ in range(3):
        stats = reader.observe(flat("cat")).stats
        assert stats.loss is not None and np.isfinite(stats.loss)
    assert reader.labels.names == [["cat", "animal"], ["bird"]]
    assert [head.out_features for head in reader.model.heads.heads] == reader.labels.sizes == [2, 1]
    params = {id(p) for group in reader.optimizer.param_groups for p in group["params"]}
    assert all(id(p) in params for p in reader.model.heads.parameters()), "the grown heads are trained"
    assert reader.buffer.stats(classes=True).class_counts[1, 0] == 10
    assert reader.predict(x).classes.shape == (10, 2)


def test_onpro_replays_a_class_only_another_learner_saw(redis_server):
    url = shared_url(redis_server)

    def onpro(seed: int):
        hparams = {"rotations": 4, "replay_cap": 16}
        return build_learner(
            "onpro", "resnet18-reduced", contracts.SHAPE, np.dtype(np.uint8), device=torch.device("cpu"),
            seed=seed, buffer_spec=url, buffer_size=40, width=4, hparams=hparams,
        )  # fmt: skip

    writer, reader = onpro(1), onpro(2)
    images = torch.randint(0, 256, (10, *contracts.SHAPE), dtype=torch.uint8)
    writer.observe(Batch(images, [("bird",)] * 10))
    stats = reader.observe(Batch(images, [("cat",)] * 10)).stats
    assert stats.n_replayed > 0 and np.isfinite(stats.loss)
    assert reader.labels.names == [["cat", "bird"]] and reader.model.heads.heads[0].out_features == 2


def test_a_restored_tree_is_not_served_stale_label_encodings(redis_server):
    url = shared_url(redis_server)
    cat_first, dog_first = mlp(url, seed=1), mlp(url, seed=2)
    cat_first.observe(flat("cat"))
    dog_first.observe(flat("dog"))
    dog_first.observe(flat("cat"))
    reader = open_store(url, 40)
    reader.classes = cat_first.labels  # cat = 0, dog = 1

    restored = mlp(url, seed=3)
    restored.observe(flat("cat"))  # caches index 0 -> cat
    restored.load_state_dict(dog_first.state_dict())  # now index 0 is dog
    x = torch.full((1, 8), 7.0)
    restored.buffer.add(x, torch.tensor([0]), torch.tensor([0]))
    replay = reader.sample(40)
    assert replay.y[replay.x[:, 0] == 7.0].tolist() == [1], "stored as dog, read as dog by the cat-first learner"
