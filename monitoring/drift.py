"""Drift detection: river's detectors watching signals the run loop computes per micro-batch.

Signals (all "higher is worse"):

* ``error``: 1 - correct of each labelled sample's prequential prediction (0/1 bits). Fed one
  value per sample, which is what ADWIN is built for; an update is O(1) amortised, so the Python
  loop over a micro-batch (10 values by default) costs microseconds.
* ``loss``: the training loss of each learner step. One value per batch (that is all a step has).
* ``uncertainty``: 1 - the softmax confidence of each sample's prediction, averaged over the
  levels that have classes: a representation statistic available for every sample, labelled or
  not, at no extra forward pass (the prediction already made for prequential scoring).

The default watches ``uncertainty`` with ADWIN (a bounded signal in [0, 1], each value O(1)
amortised). KSWIN is available too, but it runs a two-sample KS test (scipy) on every update:
about 170 us on a 2-core EPYC, as much as a whole learner step of a small MLP, so it is fed the
batch mean by default.

Specs: ``detector:signal[:name=value...]``, comma-separated, e.g.
``adwin:error:delta=0.002,page-hinkley:loss:threshold=5,kswin:uncertainty:alpha=0.0001``. Every
``name=value`` goes to the river detector's constructor, except three read here: ``feed`` (``each``
value or the batch ``mean``; ``mean`` for KSWIN, ``each`` otherwise), ``direction`` (``up``, the default, counts a
detection only when the signal's last ``recent`` values average above its mean since the previous
detection: a learner that gets better is not an alarm; ``both`` counts every detection) and
``recent`` (default 30).

Values that are NaN or infinite (the confidence of a prediction on huge but finite input, a loss that
overflowed) are left out and counted in ``streamcl_drift_non_finite_values_total{signal}``: one NaN would
stay in a detector's running sums for the life of the process, and it would never detect again.

A detection increments ``streamcl_drift_detected_total{detector,signal}``, is logged as a
structured event (``extra={"drift": {...}}``) and, when a ``hook`` is given, is passed to it (for
example ``hook=lambda event: learner.on_drift(event)`` to reset a schedule); the default is none.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import import_module

import numpy as np

from monitoring.metrics import Metrics

log = logging.getLogger("monitoring.drift")

DETECTORS = {"adwin": "ADWIN", "page-hinkley": "PageHinkley", "kswin": "KSWIN"}
"""Detector name → class in ``river.drift`` (imported when a detector is built, so parsing settings stays fast)."""
SIGNALS = ("error", "loss", "uncertainty")
"""Signals the run loop computes (``loss`` has one value per batch)."""
DEFAULT_DRIFT = "adwin:error,page-hinkley:loss,adwin:uncertainty"
DEFAULT_PARAMS: dict[str, dict[str, object]] = {
    "adwin": {},
    # mode "up": a falling loss (the learner improving) is no alarm; loss is O(1), 50 would take ages
    "page-hinkley": {"mode": "up", "threshold": 5.0, "min_instances": 30},
    # one KS test per batch over a long stream: a small alpha keeps false alarms rare
    "kswin": {"feed": "mean", "alpha": 1e-4, "window_size": 100, "stat_size": 30},
}


@dataclass(frozen=True)
class DriftSpec:
    """Which river detector watches which signal, with its constructor parameters."""

    detector: str
    signal: str
    params: dict[str, object] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> DriftSpec:
        """``"adwin:error:delta=0.01"`` -> ``DriftSpec("adwin", "error", {"delta": 0.01})``."""
        detector, _, rest = text.strip().partition(":")
        signal, *pairs = rest.split(":") if rest else ("",)
        if detector not in DETECTORS:
            raise ValueError(f"unknown drift detector {detector!r} in {text!r}; choose from {sorted(DETECTORS)}")
        if signal not in SIGNALS:
            raise ValueError(f"unknown drift signal {signal!r} in {text!r}; choose from {sorted(SIGNALS)}")
        params: dict[str, object] = {}
        for pair in pairs:
            name, eq, value = pair.partition("=")
            if not eq or not name:
                raise ValueError(f"drift parameter must be name=value, got {pair!r} in {text!r}")
            params[name] = _value(value)
        return cls(detector, signal, params)


def parse_drift(text: str) -> list[DriftSpec]:
    """Parse a comma-separated list of specs (empty text -> no detectors)."""
    return [DriftSpec.parse(part) for part in text.split(",") if part.strip()]


def _value(text: str) -> object:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


@dataclass(frozen=True, slots=True)
class DriftEvent:
    """One detection: ``position`` is the 0-based stream index of the record that triggered it,
    ``value`` the signal's mean over the last ``recent`` values fed (the level it changed to)."""

    detector: str
    signal: str
    position: int
    value: float

    def as_dict(self) -> dict[str, object]:
        """The summary JSON form: ``{"detector", "signal", "position"}``."""
        return {"detector": self.detector, "signal": self.signal, "position": self.position}


class _Watch:
    """One river detector on one signal, with its feed mode and direction filter."""

    def __init__(self, spec: DriftSpec, seed: int, metrics: Metrics | None) -> None:
        params = {**DEFAULT_PARAMS[spec.detector], **spec.params}
        self.feed = params.pop("feed", "each")
        self.direction = params.pop("direction", "up")
        recent = params.pop("recent", 30)
        if self.feed not in ("each", "mean"):
            raise ValueError(f"{spec.detector}:{spec.signal}: feed must be 'each' or 'mean', got {self.feed!r}")
        if self.direction not in ("up", "both"):
            raise ValueError(f"{spec.detector}:{spec.signal}: direction must be 'up' or 'both', got {self.direction!r}")
        if not isinstance(recent, int) or recent <= 0:
            raise ValueError(f"{spec.detector}:{spec.signal}: recent must be an int > 0, got {recent!r}")
        if spec.detector == "kswin":
            params.setdefault("seed", seed)
        try:
            self.detector = getattr(import_module("river.drift"), DETECTORS[spec.detector])(**params)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{spec.detector}:{spec.signal}: bad parameters {params}: {err}") from err
        self.spec = spec
        labels = {"detector": spec.detector, "signal": spec.signal}
        # series exist at 0 from the start, so rate()/increase() see the first detection
        self.detected = None if metrics is None else metrics.drift_detected.labels(**labels)
        self._labels, self._metrics, self.statistic = labels, metrics, None  # no series before the first value
        self.recent: deque[float] = deque(maxlen=recent)
        self.since_sum = 0.0
        self.since_n = 0

    def publish(self, batch_mean: float) -> None:
        """Set ``streamcl_drift_statistic`` (created at the first value, so no series reads 0 before data)."""
        if self.statistic is None and self._metrics is not None:
            self.statistic = self._metrics.drift_statistic.labels(**self._labels)
        if self.statistic is not None:
            self.statistic.set(batch_mean)

    def update(self, values: np.ndarray, positions: np.ndarray) -> list[DriftEvent]:
        if self.feed == "mean":
            values, positions = values.mean(keepdims=True), positions[-1:]
        # The detector takes one value per update (its semantics); the bookkeeping for the direction filter
        # is only read at a detection, so it is done per run of values between detections, not per value.
        values_list, detector, hits = values.tolist(), self.detector, []
        for i, value in enumerate(values_list):
            detector.update(value)
            if detector.drift_detected:
                hits.append(i)
        events, start = [], 0
        for i in hits:
            self._note(values_list[start : i + 1])
            recent = sum(self.recent) / len(self.recent)
            if recent > self.since_sum / self.since_n or self.direction == "both":
                events.append(DriftEvent(self.spec.detector, self.spec.signal, int(positions[i]), recent))
            self.since_sum, self.since_n, start = 0.0, 0, i + 1
        self._note(values_list[start:])
        return events

    def _note(self, values: list[float]) -> None:
        self.recent.extend(values)
        total = self.since_sum
        for value in values:  # in order, as one value at a time would add them
            total += value
        self.since_sum, self.since_n = total, self.since_n + len(values)


class DriftMonitor:
    """Run every configured detector on its signal and report detections.

    Parameters
    ----------
    specs
        What to watch (see the module docstring); ``parse_drift(DEFAULT_DRIFT)`` by default.
    metrics
        Where detections are counted and statistics published (None: nowhere).
    seed
        Seed of KSWIN's window sampling (runs are reproducible).
    hook
        Called with each :class:`DriftEvent` (default: none).

    Examples
    --------
    >>> monitor = DriftMonitor(parse_drift("adwin:error"))
    >>> errors = np.r_[np.zeros(1000), np.ones(200)]
    >>> events = monitor.update("error", errors, np.arange(len(errors)))
    >>> [(e.detector, e.signal) for e in events][:1], 1000 <= events[0].position < 1100
    ([('adwin', 'error')], True)
    """

    def __init__(
        self,
        specs: Sequence[DriftSpec] | None = None,
        metrics: Metrics | None = None,
        *,
        seed: int = 0,
        hook: Callable[[DriftEvent], None] | None = None,
    ) -> None:
        specs = parse_drift(DEFAULT_DRIFT) if specs is None else list(specs)
        keys = [(s.detector, s.signal) for s in specs]
        if len(set(keys)) != len(keys):
            raise ValueError(f"each detector:signal pair may appear once, got {keys}")
        self.watches = [_Watch(spec, seed, metrics) for spec in specs]
        self.signals = {spec.signal for spec in specs}
        # series exist at 0 from the start, like the detection counters
        counter = None if metrics is None else metrics.drift_non_finite
        self.non_finite = {} if counter is None else {s: counter.labels(signal=s) for s in self.signals}
        self.hook = hook
        self.events: list[DriftEvent] = []

    def update(self, signal: str, values: np.ndarray, positions: np.ndarray) -> list[DriftEvent]:
        """Feed one batch of ``signal`` (values aligned with stream positions); return new detections.

        NaN and infinite values are left out (and counted): see the module docstring."""
        if signal not in SIGNALS:
            raise ValueError(f"unknown drift signal {signal!r}")
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        if len(values) != len(positions):
            raise ValueError(f"{len(values)} values but {len(positions)} positions")
        finite = np.isfinite(values)
        if not finite.all():
            values, positions = values[finite], positions[finite]
            if signal in self.non_finite:
                self.non_finite[signal].inc(int(len(finite) - len(values)))
        events: list[DriftEvent] = []
        if not len(values):
            return events
        for watch in self.watches:
            if watch.spec.signal != signal:
                continue
            found = watch.update(values, positions)
            events.extend(found)
            watch.publish(float(values.mean()))
            if found and watch.detected is not None:
                watch.detected.inc(len(found))
        for event in events:
            log.warning(
                "drift detected detector=%s signal=%s position=%d value=%.4g",
                event.detector,
                event.signal,
                event.position,
                event.value,
                extra={"drift": event.as_dict()},
            )
            if self.hook is not None:
                self.hook(event)
        self.events.extend(events)
        return events
