"""The label-delay benchmark: no delay reproduces labels in the records, a delay still learns every sample."""

from __future__ import annotations

from stream_cl.bench.delay import main, measure
from stream_cl.config import Config

STREAM = "synthetic://?records=400&classes=4&dim=8&seed=1"


def config() -> Config:
    return Config().with_values(probe_fraction=0.0, no_drift=True, metrics_port=0, device="cpu", width=16)


def test_no_delay_scores_exactly_like_labels_in_the_records_and_a_delay_learns_every_sample_later() -> None:
    inline, joined, late = (measure(delay, config(), STREAM) for delay in (None, 0, 150))
    assert inline.learned == joined.learned == late.learned == 400 and late.predicted == 0
    assert joined.online_accuracy == inline.online_accuracy
    assert (joined.labels_joined, late.labels_joined, late.pending) == (400, 400, 0)
    assert late.online_accuracy < inline.online_accuracy  # predicted 150 records before it could learn them


def test_the_report_is_a_markdown_table(tmp_path, capsys) -> None:
    assert main(["--stream", STREAM, "--delays", "5", "--out", str(tmp_path / "delay.md")]) == 0
    table = (tmp_path / "delay.md").read_text().splitlines()
    assert table[0].startswith("| label delay") and table[2].startswith("| labels in the records |")
    assert table[3].startswith("| 5 |")
