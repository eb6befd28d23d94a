"""Scoring a learned batch: prequential accuracy (HLE parent rule) and the drift detectors' signals."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from monitoring.drift import DriftMonitor
from monitoring.hierarchy import level_correct
from monitoring.prequential import PrequentialAccuracy
from stream_cl.learner import Observation, Prediction


def score(obs: Observation, accuracy: PrequentialAccuracy, parent_maps: list[np.ndarray]) -> np.ndarray:
    """Update prequential accuracy per level (see ``monitoring.hierarchy``) with the batch's labelled samples.

    Returns whether each labelled sample was predicted right (in batch order).
    """
    return score_arrays(host(obs.y), host(obs.level), host(obs.prediction.classes), accuracy, parent_maps)


def score_arrays(
    y: np.ndarray,
    levels: np.ndarray,
    predicted: np.ndarray,
    accuracy: PrequentialAccuracy,
    parent_maps: list[np.ndarray],
) -> np.ndarray:
    """:func:`score` of targets (-1: unlabelled), their levels and the predicted classes per level."""
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
    since a sample arrived had no prediction then (-1)."""
    current = obs.prediction.classes
    classes = np.full(tuple(current.shape), -1, dtype=np.int64)
    for i, row in enumerate(at_arrival):
        classes[i, : len(row)] = row
    prediction = Prediction(torch.from_numpy(classes), obs.prediction.confidence)
    return replace(obs, prediction=prediction)


class PollScores:
    """The learned batches of one poll, scored together once the poll is learned.

    Prequential accuracy and the drift detectors take the whole poll's values in one call each, in stream
    order and with each value at its record's position, so a poll of many batches pays their per-call cost
    once: the detections, the accuracy and the drift events are those of scoring batch by batch.
    """

    def __init__(self) -> None:
        self._batches: list[tuple[Observation, np.ndarray]] = []

    def add(self, observation: Observation, positions: np.ndarray) -> None:
        """A learned batch's observation, and its records' offsets (for drift events)."""
        self._batches.append((observation, positions))

    def flush(
        self, accuracy: PrequentialAccuracy, parent_maps: list[np.ndarray], drift: DriftMonitor | None
    ) -> list[dict]:
        """Score the batches added since the last flush; returns the drift events found, in stream order."""
        batches, self._batches = self._batches, []
        if not batches:
            return []
        observations = [obs for obs, _ in batches]
        classes = _by_level([host(obs.prediction.classes) for obs in observations], -1)  # the tree may have grown
        y = np.concatenate([host(obs.y) for obs in observations])
        level = np.concatenate([host(obs.level) for obs in observations])
        correct = score_arrays(y, level, classes, accuracy, parent_maps)
        if drift is None:
            return []
        confidence = _by_level([host(obs.prediction.confidence) for obs in observations], 0.0)
        positions = np.concatenate([p for _, p in batches])
        starts = np.cumsum([0] + [len(p) for _, p in batches[:-1]])
        losses = [(obs.stats.loss, p[host(obs.y) >= 0][-1:]) for obs, p in batches if obs.stats.loss is not None]
        return _watch_drift(drift, y >= 0, classes, confidence, correct, positions, starts, losses)


def _by_level(arrays: list[np.ndarray], fill: float) -> np.ndarray:
    """Per-level arrays of batches stacked; levels a batch did not have yet are ``fill``."""
    depth = max(a.shape[1] for a in arrays)
    if all(a.shape[1] == depth for a in arrays):
        return np.concatenate(arrays)
    out = np.full((sum(len(a) for a in arrays), depth), fill, dtype=arrays[0].dtype)
    row = 0
    for a in arrays:
        out[row : row + len(a), : a.shape[1]] = a
        row += len(a)
    return out


def _watch_drift(
    drift: DriftMonitor,
    labelled: np.ndarray,
    classes: np.ndarray,
    confidence: np.ndarray,
    correct: np.ndarray,
    positions: np.ndarray,
    starts: np.ndarray,
    losses: list[tuple[float, np.ndarray]],
) -> list[dict]:
    """Feed the batches' error (as scored by :func:`score`), loss and uncertainty signals at the records' offsets."""
    events = []
    if "error" in drift.signals and labelled.any():
        events += drift.update("error", ~correct, positions[labelled], _starts_of(labelled, starts))
    if "loss" in drift.signals and losses:
        values = np.array([loss for loss, _ in losses])
        events += drift.update("loss", values, np.concatenate([p for _, p in losses]), np.arange(len(values)))
    if "uncertainty" in drift.signals:
        known = classes >= 0
        rows = known.any(axis=1)
        if rows.any():
            mean_conf = (confidence * known).sum(axis=1) / np.maximum(known.sum(axis=1), 1)
            events += drift.update("uncertainty", 1 - mean_conf[rows], positions[rows], _starts_of(rows, starts))
    return sorted((e.as_dict() for e in events), key=lambda e: e["position"])


def _starts_of(kept: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Where each batch begins among the ``kept`` samples."""
    return np.concatenate(([0], np.cumsum(kept)))[starts]
