"""Scoring a learned batch: prequential accuracy (HLE parent rule) and the drift detectors' signals."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from consumers.record import Record
from monitoring.drift import SIGNALS, DriftMonitor
from monitoring.hierarchy import level_correct
from monitoring.prequential import PrequentialAccuracy
from stream_cl.learner import Observation, Prediction

JOINED_SIGNALS = ("error", "loss")
"""The signals of a batch learned when its delayed labels joined: its uncertainty was fed when it arrived."""


def score(obs: Observation, accuracy: PrequentialAccuracy, parent_maps: list[np.ndarray]) -> np.ndarray:
    """Update prequential accuracy per level (see ``monitoring.hierarchy``) with the batch's labelled samples.

    Returns whether each labelled sample was predicted right (in batch order).
    """
    y, levels, predicted = host(obs.y), host(obs.level), host(obs.prediction.classes)
    labelled = y >= 0
    if not labelled.all():
        y, levels, predicted = y[labelled], levels[labelled], predicted[labelled]
    if not len(y):
        return np.zeros(0, dtype=bool)
    correct = level_correct(predicted, levels, y, parent_maps)
    accuracy.update(levels, correct)
    return correct


def host(t: torch.Tensor) -> np.ndarray:
    """``t`` as a numpy array; a CPU tensor without the ``.cpu()`` dispatch (a few µs a call, several per batch)."""
    return t.numpy() if t.device.type == "cpu" else t.cpu().numpy()


def arrival_scored(obs: Observation, at_arrival: list[np.ndarray]) -> Observation:
    """``obs`` with its predictions replaced by those made when each sample arrived, so :func:`score` measures
    delayed prequential accuracy: what the model said before the label could be known. Levels the tree grew
    since a sample arrived had no prediction then (-1); levels the tree lacks now are not scored (a Redis pending
    store keeps its samples across a restart, and the restarted learner's tree may be shallower)."""
    current = obs.prediction.classes
    width = current.shape[1]
    classes = np.full(tuple(current.shape), -1, dtype=np.int64)
    for i, row in enumerate(at_arrival):
        kept = row[:width]
        classes[i, : len(kept)] = kept
    prediction = Prediction(torch.from_numpy(classes), obs.prediction.confidence)
    return replace(obs, prediction=prediction)


def watch_drift(
    drift: DriftMonitor,
    obs: Observation,
    correct: np.ndarray,
    records: list[Record],
    signals: tuple[str, ...] = SIGNALS,
) -> list[dict]:
    """Feed the batch's error (as scored by :func:`score`), loss and uncertainty signals at the records' offsets,
    those of ``signals`` only (see :data:`JOINED_SIGNALS`).

    Returns the drift events found, as dicts in stream order.
    """
    positions = np.fromiter((r.position.offset for r in records), dtype=np.int64, count=len(records))
    labelled = host(obs.y) >= 0
    events = []
    if "error" in drift.signals and "error" in signals and labelled.any():
        events += drift.update("error", ~correct, positions[labelled])
    if "loss" in drift.signals and "loss" in signals and obs.stats.loss is not None:
        events += drift.update("loss", np.array([obs.stats.loss]), positions[labelled][-1:])
    if "uncertainty" in drift.signals and "uncertainty" in signals:
        known = host(obs.prediction.classes) >= 0
        rows = known.any(axis=1)
        if rows.any():
            confidence = (host(obs.prediction.confidence) * known).sum(axis=1)
            mean_conf = confidence / np.maximum(known.sum(axis=1), 1)
            events += drift.update("uncertainty", 1 - mean_conf[rows], positions[rows])
    return sorted((e.as_dict() for e in events), key=lambda e: e["position"])
