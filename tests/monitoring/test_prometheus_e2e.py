"""End to end: a real Prometheus scrapes a learning run; every dashboard and alert expression returns data.

Alert expressions are conditions (``... > 0.3``); they are queried with ``bool`` comparisons
(``as_bool``), which return the underlying series whatever their value, so "returns data" proves the
names, labels and functions without making every alert fire. The alerts this run does trigger (drift,
dead letters, forgetting) are then checked in Prometheus' own ``ALERTS`` series: the rules file is
loaded by the server itself.
"""

from __future__ import annotations

import subprocess
import time
import urllib.request
from functools import partial
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry

from consumers.recorded import RecordedSource
from consumers.wire import REASONS
from monitoring.drift import DriftMonitor
from monitoring.labeljoin import JoinMetrics
from monitoring.metrics import Metrics
from monitoring.probe import ProbeSet
from stream_cl.build import build_learner
from stream_cl.run import RUN_REASONS, RunOptions, RunParts, run_stream
from tests.fixtures.procs import require_binary
from tests.fixtures.prometheus import PrometheusServer
from tests.monitoring.promql import alert_exprs, as_bool, dashboard_exprs, load_dashboard, unless_parts
from tests.monitoring.streams import permuted_labels_stream


def test_every_expression_returns_data(prometheus: PrometheusServer, tmp_path: Path) -> None:
    stream = permuted_labels_stream(tmp_path / "s.rec.gz", n_before=1000, n_after=600, garbage=(50, 1200))
    metrics = Metrics(CollectorRegistry(), dead_letter_reasons=REASONS + RUN_REASONS)
    metrics.describe(method="er", model="mlp", device="cpu")
    # Published by `stream-cl serve`'s Kafka source, checkpointer, overload policy, dead-letter sink and
    # model guard, which a recorded run has not: set here so their panels and alerts are proven against
    # the server too.
    metrics.consumer_lag.labels(topic="samples", partition="0").set(1500)
    metrics.assigned_partitions.set(1)
    metrics.checkpoint_age.set(42)
    metrics.dead_letter_spool.set(0)
    metrics.dead_letter_sink_up.set(1)
    metrics.dead_letter_rejected.inc(0)
    metrics.dead_letters.labels(reason="non_finite_loss")
    metrics.overload_records.labels(policy="skip-learning")
    join = JoinMetrics(metrics.registry)  # published when labels arrive on their own topic (--labels)
    join.pending.set(3)
    join.waiting.set(1)
    drift = DriftMonitor(None, metrics)  # before the first scrape: its counters are scraped at 0 first
    make = partial(
        build_learner, "er", "mlp", device=torch.device("cpu"), seed=0, hparams={"replay_batch_size": 0}
    )  # fmt: skip
    with metrics.serve(prometheus.target_port), RecordedSource(stream) as source:
        assert prometheus.wait_for('streamcl_samples_total{job="stream-cl"}'), prometheus.log.read_text()[-2000:]
        summary, _ = run_stream(
            source,
            make,
            metrics,
            RunOptions(progress=False, probe_every=100),
            RunParts(ProbeSet(fraction=0.1), drift=drift),
        )
        assert summary.drift_events and summary.dead_letter == {"bad_json": 2} and summary.forgetting > 0.3
        url = f"http://127.0.0.1:{prometheus.target_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as answer:  # curl /metrics | promtool check metrics
            lint = subprocess.run(
                [require_binary("promtool"), "check", "metrics"], input=answer.read(), capture_output=True
            )
        assert lint.returncode == 0 and not (lint.stdout + lint.stderr).strip(), lint
        exprs = dashboard_exprs(load_dashboard())
        exprs = [(w, as_bool(e) if w.startswith("annotation") else e) for w, e in exprs]
        exprs += [
            (f"alert {name}" + (f" (part {i + 1})" if i else ""), as_bool(part))
            for name, e in alert_exprs()
            for i, part in enumerate(unless_parts(e))
        ]
        missing = dict(exprs)
        deadline = time.monotonic() + 30
        while missing and time.monotonic() < deadline:
            for where, expr in list(missing.items()):
                if prometheus.series(expr):  # asserts status == success
                    del missing[where]
            time.sleep(0.5)
        assert not missing, f"no data for: {missing}"

        for alert, state in [
            ("StreamClDriftDetected", "firing"),
            ("StreamClDeadLetters", "firing"),
            ("StreamClForgettingHigh", "pending"),  # for: 5m
        ]:
            found = prometheus.wait_for(f'ALERTS{{alertname="{alert}", alertstate="{state}"}}', timeout_s=15)
            assert found, alert
        quiet = prometheus.series(
            'ALERTS{alertname=~"StreamClCheckpointStale|StreamClLearnerDown|StreamClDeadLetterSinkDown|StreamClNonFiniteLoss'
            '|StreamClDeadLettersRejected|StreamClNoPartitions"}'
        )
        assert quiet == []
