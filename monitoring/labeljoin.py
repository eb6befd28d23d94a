"""Metrics of the delayed-label join: what waits, how late labels come, what joins and what never does."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LABEL_OUTCOMES = ("joined", "unmatched")
"""What becomes of a label message: it joined its sample, or it went to the label dead-letter topic."""

DELAY_BUCKETS = (0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 86400, 7 * 86400)
"""Label delays span seconds (a click) to days (a human annotation)."""


class JoinMetrics:
    """``streamcl_pending_samples``, ``streamcl_labels_waiting``, ``streamcl_label_delay_seconds``,
    ``streamcl_labels_total{outcome}`` and ``streamcl_pending_expired_total``, on ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = r = registry
        self.pending = Gauge("streamcl_pending_samples", "Predicted samples waiting for their label.", registry=r)
        self.waiting = Gauge("streamcl_labels_waiting", "Labels that arrived before their features.", registry=r)
        self.delay = Histogram(
            "streamcl_label_delay_seconds",
            "Event time from a sample to its label (label timestamp minus feature timestamp).",
            buckets=DELAY_BUCKETS,
            registry=r,
        )
        self.labels = Counter("streamcl_labels", "Label messages, by outcome.", ["outcome"], registry=r)
        self.expired = Counter(
            "streamcl_pending_expired",
            "Pending samples whose label did not come within the TTL or that the full store evicted.",
            registry=r,
        )
        for outcome in LABEL_OUTCOMES:
            self.labels.labels(outcome=outcome)
