"""The run summary: what a run did, as JSON for machines and a short table for people.

Every consumed record has exactly one outcome, so the counts add up, in one run and (the
``*_total`` fields, carried by checkpoints) over the model's whole history::

    consumed = learned + held_out + predicted + overload_skipped + dead letters

``predicted`` counts unlabelled records (predict only); ``overload_skipped`` labelled records an
overload policy predicted instead of learning them.

With delayed labels (``--labels``) an unlabelled feature record has no outcome until its label
joins it (then it is ``learned``, or held out or dead-lettered as any labelled record) or it
expires (then it is ``predicted``, and ``pending_expired`` counts it too); meanwhile it is
``pending``, a level carried by checkpoints rather than a flow. Label messages are counted apart::

    consumed_total = learned_total + held_out_total + predict_only_total + overload_skipped_total
                     + dead_letter_total + pending
    labels_consumed_total = labels_joined_total + labels_unmatched_total + labels_waiting

(per run, add the ``pending`` and ``labels_waiting`` restored from the checkpoint on the left).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

COUNTS = ("consumed", "learned", "held_out", "predicted", "overload_skipped", "dead_letter")
"""The outcome counters of one run."""
LABEL_COUNTS = ("labels_consumed", "labels_joined", "labels_unmatched", "pending_expired")
"""The delayed-label counters of one run."""
TOTALS = {name: f"{name}_total" for name in COUNTS + LABEL_COUNTS} | {"predicted": "predict_only_total"}
"""Outcome counter → its total over the model's history (restored checkpoints included)."""


@dataclass
class Summary:
    """Counts and accuracies of one run (accuracies and forgetting are 0-1 ratios; None without a probe set)."""

    consumed: int = 0
    learned: int = 0
    held_out: int = 0
    predicted: int = 0
    overload_skipped: int = 0
    dead_letter: dict[str, int] = field(default_factory=dict)
    consumed_total: int = 0
    learned_total: int = 0
    held_out_total: int = 0
    predict_only_total: int = 0
    overload_skipped_total: int = 0
    dead_letter_total: int = 0
    labels_consumed: int = 0
    labels_joined: int = 0
    labels_unmatched: int = 0
    pending_expired: int = 0
    pending: int = 0
    labels_waiting: int = 0
    label_delay_seconds: dict[str, float] = field(default_factory=dict)
    labels_consumed_total: int = 0
    labels_joined_total: int = 0
    labels_unmatched_total: int = 0
    pending_expired_total: int = 0
    buffer_errors: int = 0
    online_accuracy: float = 0.0
    final_accuracy: float | None = None
    final_accuracy_by_level: dict[str, float] = field(default_factory=dict)
    forgetting: float | None = None
    forgetting_by_level: dict[str, float] = field(default_factory=dict)
    classes_seen: int = 0
    classes_seen_by_level: list[int] = field(default_factory=list)
    drift_events: list[dict] = field(default_factory=list)
    elapsed_seconds: float = 0.0
    samples_per_second: float = 0.0
    method: str = ""
    model: str = ""
    device: str = ""
    world_size: int = 1
    never_assigned: bool = False
    """The run ended (``--until-idle``) because its consumer group never assigned it a partition."""
    workers: list[dict] = field(default_factory=list)
    """With several workers (``serve --workers``): per rank, ``rank``, ``learned`` and ``model_sha256``."""

    def count(self, name: str) -> int:
        """This run's count of outcome ``name`` (one of :data:`COUNTS`)."""
        value = getattr(self, name)
        return sum(value.values()) if isinstance(value, dict) else value

    def totals(self, base: Mapping[str, int]) -> dict[str, int]:
        """Every :data:`TOTALS` entry: ``base`` (from a restored checkpoint) plus this run."""
        return {total: int(base.get(total, 0)) + self.count(name) for name, total in TOTALS.items()}

    def set_totals(self, base: Mapping[str, int]) -> None:
        for name, value in self.totals(base).items():
            setattr(self, name, value)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    def write(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    def render(self) -> str:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.dead_letter.items())) or "none"
        rows = [
            ("method / model / device", f"{self.method} / {self.model} / {self.device}"),
            ("records consumed", f"{self.consumed} ({self.consumed_total} in the model's history)"),
            ("records learned", f"{self.learned}"),
            ("records predicted only", f"{self.predicted}"),
            ("records held out (probe)", f"{self.held_out}"),
            ("dead letters", f"{self.count('dead_letter')} ({reasons})"),
            ("classes seen (per level)", f"{self.classes_seen} {self.classes_seen_by_level}"),
            ("online accuracy", f"{self.online_accuracy:.3f}"),
            ("final average accuracy", _ratio(self.final_accuracy)),
            ("average forgetting", _ratio(self.forgetting)),
            ("drift events", f"{len(self.drift_events)}"),
            ("elapsed", f"{self.elapsed_seconds:.1f} s ({self.samples_per_second:.0f} records/s)"),
        ]
        if self.overload_skipped:
            rows.insert(4, ("labelled, not learned (overload)", f"{self.overload_skipped}"))
        if self.labels_consumed or self.pending:
            delay = ", ".join(f"{k} {v:.1f} s" for k, v in self.label_delay_seconds.items()) or "n/a"
            rows[4:4] = [
                (
                    "label messages (joined / unmatched)",
                    f"{self.labels_consumed} ({self.labels_joined} / {self.labels_unmatched})",
                ),
                ("pending (expired / still waiting)", f"{self.pending_expired} / {self.pending}"),
                ("label delay", delay),
            ]
        if self.buffer_errors:
            rows.append(("replay-buffer errors", f"{self.buffer_errors} (ran on the local fallback meanwhile)"))
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
