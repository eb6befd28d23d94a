"""Live monitoring: the Prometheus metrics contract, prequential accuracy, probe-set forgetting."""

from __future__ import annotations

from monitoring.metrics import Metrics
from monitoring.prequential import PrequentialAccuracy
from monitoring.probe import ProbeSet

__all__ = ["Metrics", "PrequentialAccuracy", "ProbeSet"]
