"""The metrics contract: every ``streamcl_*`` series, on a registry the caller owns.

Dashboards and alert rules depend on these names, so they are all defined here, with help text,
rather than next to the code that updates them. Per-class series are capped (``max_class_series``)
to keep label cardinality bounded; classes past the cap are summarised in the per-level gauges.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)

from monitoring.exporter import Check, Exporter

OUTCOMES = ("learned", "predicted", "held_out", "dead_letter", "overload_skipped")
PREDICTION_FAILURES = ("send_failed", "backing_off", "delivery_failed")
"""Why a prediction record did not reach the predictions output: the output raised when it was handed over (a
Kafka producer without the topic's metadata or buffer space after ``max_block_ms``, a file write error), it was
dropped untried while the output backs off after such an error, or the broker did not acknowledge it."""
OFFSET_SKIP_REASONS = ("out_of_range",)
"""Why a Kafka consumer never fetched records: deleted (retention) before it got to them."""
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """All stream-cl metrics on one ``CollectorRegistry`` (never the global default).

    Examples
    --------
    >>> m = Metrics(CollectorRegistry())
    >>> m.samples.labels(outcome="learned").inc(3)
    >>> m.registry.get_sample_value("streamcl_samples_total", {"outcome": "learned"})
    3.0
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        dead_letter_reasons: Iterable[str] = (),
        max_class_series: int = 100,
    ) -> None:
        self.registry = registry
        # A service is judged by its memory, CPU time and open files too (process_*, python_gc_*, python_info).
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        self.max_class_series = max_class_series
        self._class_series: set[tuple[str, str]] = set()
        self._lazy: dict[str, Gauge | Counter] = {}
        self._lazy_lock = threading.Lock()
        r = registry
        self.samples = Counter("streamcl_samples", "Records processed, by outcome.", ["outcome"], registry=r)
        self.dead_letters = Counter(
            "streamcl_dead_letter", "Records sent to the dead-letter topic, by reason.", ["reason"], registry=r
        )
        self.online_accuracy = Gauge(
            "streamcl_online_accuracy",
            "Prequential accuracy (predicted before learning) over a sliding window, 0-1.",
            ["level"],
            registry=r,
        )
        self.accuracy = Gauge("streamcl_accuracy", "Probe-set accuracy per level, 0-1.", ["level"], registry=r)
        self.class_accuracy = Gauge(
            "streamcl_class_accuracy",
            "Probe-set accuracy per class, 0-1 (capped series).",
            ["level", "class"],
            registry=r,
        )
        self.forgetting = Gauge(
            "streamcl_forgetting",
            "Mean over classes of best minus current probe accuracy, 0-1.",
            ["level"],
            registry=r,
        )
        self.class_forgetting = Gauge(
            "streamcl_class_forgetting",
            "Best minus current probe accuracy per class, 0-1 (capped series).",
            ["level", "class"],
            registry=r,
        )
        self.drift_detected = Counter(
            "streamcl_drift_detected",
            "Drift detections, by detector and monitored signal.",
            ["detector", "signal"],
            registry=r,
        )
        self.drift_statistic = Gauge(
            "streamcl_drift_statistic",
            "Batch mean of the signal each drift detector watches (error 0-1, loss, uncertainty 0-1).",
            ["detector", "signal"],
            registry=r,
        )
        self.drift_non_finite = Counter(
            "streamcl_drift_non_finite_values",
            "Signal values left out of the drift detectors because they were NaN or infinite.",
            ["signal"],
            registry=r,
        )
        self.learn_step = Histogram(
            "streamcl_learn_step_seconds",
            "Wall time of one learner step (observe).",
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.samples_per_second = Gauge(
            "streamcl_samples_per_second", "Records processed per second over the last interval.", registry=r
        )
        self.buffer_size = Gauge("streamcl_buffer_size", "Samples in the replay buffer.", registry=r)
        self.buffer_bytes = Gauge("streamcl_buffer_bytes", "Bytes held by the replay buffer.", registry=r)
        self.buffer_class_count = Gauge(
            "streamcl_buffer_class_samples",
            "Replay-buffer samples per class (capped series; 0 once a class is evicted).",
            ["level", "class"],  # a name may be a class at two levels of a label hierarchy
            registry=r,
        )
        self.buffer_errors = Counter(
            "streamcl_buffer_errors", "Replay-buffer operations that failed (e.g. Redis down).", registry=r
        )
        self.buffer_corrupt = Counter(
            "streamcl_buffer_corrupt_samples",
            "Drawn replay samples left out because their stored entry could not be read or was refused.",
            registry=r,
        )
        self.buffer_repairs = Counter(
            "streamcl_buffer_repairs",
            "Counter keys of the shared replay buffer found damaged or foreign and rebuilt from the samples stored.",
            registry=r,
        )
        self.consumer_lag = Gauge(
            "streamcl_consumer_lag",
            "Records behind the partition's high watermark.",
            ["topic", "partition"],
            registry=r,
        )
        self.offsets_skipped = Counter(
            "streamcl_offsets_skipped",
            "Records a Kafka consumer never fetched because they were gone when it got to them, by reason.",
            ["reason"],
            registry=r,
        )
        self.decode_seconds = Histogram(
            "streamcl_decode_seconds",
            "Wall time to decode one fetched batch of messages (consumer background thread).",
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.classes_seen = Gauge("streamcl_classes_seen", "Classes seen so far per level.", ["level"], registry=r)
        self.overload_records = Counter(
            "streamcl_overload_records",
            "Labelled records that arrived while the consumer lag was above --max-lag, by overload policy.",
            ["policy"],
            registry=r,
        )
        self.overloaded = Gauge("streamcl_overloaded", "1 while the consumer lag is above --max-lag.", registry=r)
        self.predictions = Counter(
            "streamcl_predictions",
            "Prediction records the predictions output took: acknowledged by the Kafka broker, or written to the file.",
            registry=r,
        )
        self.predictions_failed = Counter(
            "streamcl_predictions_failed",
            "Prediction records that did not reach the predictions output, by reason.",
            ["reason"],
            registry=r,
        )
        self.model_info = Info("streamcl_model", "Method, model and device of this learner.", registry=r)
        self.build_info = Gauge(
            "streamcl_build_info",
            "Always 1; the labels say which stream-cl version runs which method and model.",
            ["version", "method", "model"],
            registry=r,
        )
        for outcome in OUTCOMES:
            self.samples.labels(outcome=outcome)
        for reason in dead_letter_reasons:
            self.dead_letters.labels(reason=reason)
        for reason in PREDICTION_FAILURES:
            self.predictions_failed.labels(reason=reason)
        for reason in OFFSET_SKIP_REASONS:
            self.offsets_skipped.labels(reason=reason)

    def describe(self, *, method: str, model: str, device: str) -> None:
        """Publish what this learner runs: ``streamcl_model_info`` and ``streamcl_build_info``."""
        self.model_info.info({"method": method, "model": model, "device": device})
        self.build_info.labels(version=package_version(), method=method, model=model).set(1)

    @property
    def checkpoint_age(self) -> Gauge:
        """``streamcl_checkpoint_age_seconds``, registered on first use: a run without checkpoints has no such series.

        The checkpointer calls ``set_function`` on it, so the age is computed at scrape time.
        """
        return self._on_first_use(
            "streamcl_checkpoint_age_seconds",
            "Seconds the oldest learning not yet in a written checkpoint has waited (0 when everything is saved).",
        )

    @property
    def dead_letter_spool(self) -> Gauge:
        """``streamcl_dead_letter_spool_records``, registered on first use (by the dead-letter sink, if any)."""
        return self._on_first_use(
            "streamcl_dead_letter_spool_records",
            "Dead letters waiting in the on-disk spool until the dead-letter sink accepts them.",
        )

    @property
    def dead_letter_sink_up(self) -> Gauge:
        """``streamcl_dead_letter_sink_up``, registered on first use: without a sink, no series (and no alert)."""
        return self._on_first_use(
            "streamcl_dead_letter_sink_up", "1 while the dead-letter sink accepts records, 0 while it fails."
        )

    @property
    def dead_letter_rejected(self) -> Counter:
        """``streamcl_dead_letter_rejected_total``, registered on first use (by the dead-letter sink, if any)."""
        return self._on_first_use(
            "streamcl_dead_letter_rejected",
            "Dead letters the broker refused for themselves (too large, invalid topic): not on the dead-letter "
            "topic, kept as *.rejected files in the spool directory.",
            Counter,
        )

    @property
    def assigned_partitions(self) -> Gauge:
        """``streamcl_assigned_partitions``, registered on first use (by a consumer-group source): a file source
        owns no partitions and must not look like a consumer left without any."""
        return self._on_first_use(
            "streamcl_assigned_partitions", "Partitions this learner's consumer owns in its group now."
        )

    def _on_first_use(self, name: str, documentation: str, kind: type[Gauge | Counter] = Gauge) -> Any:
        with self._lazy_lock:  # a sink thread and the run loop may both ask first
            if name not in self._lazy:
                self._lazy[name] = kind(name, documentation, registry=self.registry)
            return self._lazy[name]

    def class_series_allowed(self, level: int, name: str) -> bool:
        """Whether a per-class series may be created for this class (bounded cardinality)."""
        key = (str(level), name)
        if key in self._class_series:
            return True
        if len(self._class_series) >= self.max_class_series:
            return False
        self._class_series.add(key)
        return True

    def serve(
        self, port: int, addr: str = "127.0.0.1", *, healthy: Check | None = None, ready: Check | None = None
    ) -> Exporter:
        """Serve ``/metrics`` (and ``/healthz``, ``/readyz``) in a background thread; ``stop()`` the result."""
        checks = {k: v for k, v in (("healthy", healthy), ("ready", ready)) if v is not None}
        return Exporter(self.registry, port, addr, **checks)


def package_version() -> str:
    """The installed stream-cl version, or ``unknown`` when run from a source tree that was never installed."""
    try:
        return version("stream-cl")
    except PackageNotFoundError:
        return "unknown"
