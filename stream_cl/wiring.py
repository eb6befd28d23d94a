"""The parts of a run built from its settings, shared by ``stream-cl run`` and ``stream-cl serve``.

``settings`` is the mapping of ``add_run_arguments``' options (``vars(args)`` for ``run``, the
effective config's ``run`` section for ``serve``); optional keys fall back to the CLI defaults.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from functools import partial
from typing import Any

import torch
from prometheus_client import CollectorRegistry

from consumers.urls import is_kafka_url
from consumers.wire import REASONS
from monitoring.drift import DriftMonitor, parse_drift
from monitoring.metrics import Metrics
from stream_cl.build import build_learner
from stream_cl.errors import ConfigError
from stream_cl.methods import method_class
from stream_cl.run import RUN_REASONS, LearnerFactory, RunOptions


def check_settings(settings: Mapping[str, Any]) -> None:
    """Fail early, before anything is opened, on settings argparse cannot check alone."""
    if not 0.0 <= settings["probe_fraction"] < 1.0:
        raise ConfigError(f"--probe-fraction must be in [0, 1), got {settings['probe_fraction']}")
    check_hparams(settings["method"], dict(settings.get("hparam") or []))


def check_hparams(method: str, hparams: dict) -> None:
    """Raise ConfigError for keys ``method``'s constructor does not take."""
    params = inspect.signature(method_class(method)).parameters
    known = [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(hparams) - set(known))
    if unknown:
        raise ConfigError(
            f"unknown hyper-parameter(s) {', '.join(unknown)} for method {method}; known: {', '.join(known)}"
        )


def make_metrics(settings: Mapping[str, Any], device: torch.device) -> Metrics:
    """Metrics on a fresh registry, every dead-letter reason touched, the model described."""
    metrics = Metrics(
        CollectorRegistry(), dead_letter_reasons=REASONS + RUN_REASONS, max_class_series=settings["max_class_series"]
    )
    metrics.model_info.info({"method": settings["method"], "model": settings["model"], "device": str(device)})
    return metrics


def learner_factory(settings: Mapping[str, Any], device: torch.device) -> LearnerFactory:
    """Builds the configured learner once the first record shows the input shape and dtype."""
    return partial(
        build_learner,
        settings["method"],
        settings["model"],
        device=device,
        seed=settings["seed"],
        buffer_size=settings["buffer_size"],
        buffer_spec=settings["buffer"],
        buffer_policy=settings["buffer_policy"],
        width=settings["width"],
        hparams=dict(settings.get("hparam") or []),
    )


def drift_monitor(settings: Mapping[str, Any], metrics: Metrics) -> DriftMonitor | None:
    if settings.get("no_drift"):
        return None
    try:
        return DriftMonitor(parse_drift(settings["drift"]), metrics, seed=settings["seed"])
    except ValueError as err:
        raise ConfigError(f"--drift: {err}") from err


def run_options(settings: Mapping[str, Any]) -> RunOptions:
    # A Kafka poll may wait for data; a file has it at once, so never wait on one.
    source = settings["source"] or ""
    return RunOptions(
        batch_size=settings["batch_size"],
        max_records=settings["max_records"],
        probe_every=settings["probe_every"],
        progress=not settings["no_progress"],
        poll_timeout_s=0.5 if is_kafka_url(source) else 0.0,
        until_idle_s=settings.get("until_idle"),
    )
