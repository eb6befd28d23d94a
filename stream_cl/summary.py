"""The run summary: what a run did, as JSON for machines and a short table for people."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class Summary:
    """Counts and accuracies of one run (accuracies and forgetting are 0-1 ratios)."""

    learned: int = 0
    learned_total: int = 0  # learned over the model's whole history, restored checkpoints included
    predicted: int = 0
    held_out: int = 0
    dead_letter: dict[str, int] = field(default_factory=dict)
    online_accuracy: float = 0.0
    final_accuracy: float = 0.0
    final_accuracy_by_level: dict[str, float] = field(default_factory=dict)
    forgetting: float = 0.0
    forgetting_by_level: dict[str, float] = field(default_factory=dict)
    classes_seen: int = 0
    classes_seen_by_level: list[int] = field(default_factory=list)
    drift_events: list[dict] = field(default_factory=list)
    elapsed_seconds: float = 0.0
    samples_per_second: float = 0.0
    method: str = ""
    model: str = ""
    device: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    def write(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    def render(self) -> str:
        dead = sum(self.dead_letter.values())
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.dead_letter.items())) or "none"
        rows = [
            ("method / model / device", f"{self.method} / {self.model} / {self.device}"),
            ("records learned", f"{self.learned}"),
            ("records predicted only", f"{self.predicted}"),
            ("records held out (probe)", f"{self.held_out}"),
            ("dead letters", f"{dead} ({reasons})"),
            ("classes seen (per level)", f"{self.classes_seen} {self.classes_seen_by_level}"),
            ("online accuracy", f"{self.online_accuracy:.3f}"),
            ("final average accuracy", f"{self.final_accuracy:.3f}"),
            ("average forgetting", f"{self.forgetting:.3f}"),
            ("drift events", f"{len(self.drift_events)}"),
            ("elapsed", f"{self.elapsed_seconds:.1f} s ({self.samples_per_second:.0f} records/s)"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
