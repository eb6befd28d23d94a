"""Live monitoring: the Prometheus metrics contract and its exporter, prequential accuracy,
probe-set forgetting, and drift detection with river's detectors."""

from __future__ import annotations

from monitoring.drift import DriftEvent, DriftMonitor, DriftSpec, parse_drift
from monitoring.exporter import Exporter
from monitoring.metrics import Metrics
from monitoring.prequential import PrequentialAccuracy
from monitoring.probe import ProbeSet

__all__ = [
    "DriftEvent",
    "DriftMonitor",
    "DriftSpec",
    "Exporter",
    "Metrics",
    "PrequentialAccuracy",
    "ProbeSet",
    "parse_drift",
]
