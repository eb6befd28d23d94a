"""The probe and the label tree: a held path is scored only as the class with the same full path, counts as
the stream's class until the tree learns it, and is dropped once the tree gives one of its classes another
parent; a checkpointed probe (whose state holds only paths and samples) gets all this back on load."""

from __future__ import annotations

import io

import numpy as np
import torch

from monitoring.probe import ProbeSet
from stream_cl.labels import LabelTree


def _tree(*paths: tuple[str, ...]) -> LabelTree:
    tree = LabelTree()
    tree.encode(list(paths))
    return tree


def test_a_path_is_scored_only_as_the_class_with_its_ancestors() -> None:
    tree = _tree(("animal", "cat"), ("animal", "bat"), ("sport", "golf"))
    probe = ProbeSet(fraction=1.0, min_samples=1)
    probe.add(np.zeros(2, np.float32), ("animal", "bat"))
    probe.add(np.ones(2, np.float32), ("sport", "bat"))  # "bat" is the tree's, but under "animal"

    def predict(x: np.ndarray) -> np.ndarray:
        return np.tile([0, 1], (len(x), 1))  # every sample: animal, animal/bat

    result = probe.evaluate(predict, tree.lookup, parent_maps=tree.parent_maps())
    assert result.class_accuracy == {("animal", "bat"): 1.0}


def test_held_classes_count_until_learned_and_contradicted_paths_are_dropped() -> None:
    tree = _tree(("animal", "cat"))
    probe = ProbeSet(fraction=1.0)
    probe.follow(tree)
    probe.add(np.zeros(2, np.float32), ("sport", "bat"))
    probe.add(np.zeros(2, np.float32), ("animal", "dog"))
    assert probe.unlearned == {(0, "sport"), (1, "bat"), (1, "dog")}
    tree.encode([("animal", "dog"), ("animal", "bat")])  # learned records win over the held sport/bat
    probe.follow(tree)
    assert probe.unlearned == set() and set(probe.classes) == {(0, "animal"), (1, "dog")} and len(probe) == 1


def test_a_restored_probe_counts_its_classes_and_catches_up_with_the_tree() -> None:
    probe = ProbeSet(fraction=1.0)
    for path in [("sport", "bat"), ("animal", "dog"), ("fish",)]:
        probe.add(np.zeros(2, np.float32), path)
    buffer = io.BytesIO()
    torch.save(probe.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert set(state) == {"paths", "samples", "seen", "best", "rng"}  # the format checkpoints always had
    restored = ProbeSet(fraction=1.0)
    restored.load_state_dict(state)
    assert len(restored.unlearned) == 5  # nothing followed yet: every class of the probe is its own
    restored.follow(_tree(("animal", "bat"), ("fish",)))
    assert restored.unlearned == {(1, "dog")} and len(restored) == 2
