"""What a label delay costs: delayed prequential accuracy against the delay, through the real join.

A labelled recorded stream is replayed with its labels taken out of the records and fed back as label
messages, label *i* only once ``delay`` more feature records have been read, so every sample is
predicted ``delay`` records before the model may learn it, as with labels that come late in
production. The run loop, the pending store and the scoring are those of ``--labels``; only the
label topic is replaced by this in-memory feed. ``python -m stream_cl.bench.delay`` prints a
Markdown table (``--out`` also writes it).
"""

from __future__ import annotations

import argparse
import json
from collections import deque
from dataclasses import replace
from pathlib import Path

import torch

from consumers.label_wire import LabelRecord, encode_label
from consumers.open import open_source
from consumers.record import Message, Poll, Position
from monitoring.labeljoin import JoinMetrics
from stream_cl.assemble import default_stream, learner_factory, make_metrics
from stream_cl.bench.accuracy_report import machine
from stream_cl.config import Config
from stream_cl.delayed import DelayedLabels
from stream_cl.pending import MemoryPending
from stream_cl.run import CountOnly, RunOptions, RunParts, run_stream
from stream_cl.summary import Summary

LABEL_TOPIC = "labels"


class LabelFeed:
    """The label topic of the benchmark: label *i* becomes readable once ``delay`` records after it were predicted.

    A record counts as predicted once the next poll of the feature topic starts (the loop predicts a batch
    before it polls again), so ``delay`` 0 learns each batch before the next is predicted, as inline labels do.
    """

    exhausted, poll_timeout_s, fetches_ahead = False, 0.0, False

    def __init__(self, delay: int) -> None:
        self.delay, self.read, self.predicted = delay, 0, 0
        self.ended = False  # the stream has ended: the labels still held come in
        self.queued: deque[tuple[int, LabelRecord]] = deque()
        self.next_offset = 0

    def hold(self, record_index: int, sample_id: str, label: tuple[str, ...], timestamp: float) -> None:
        position = Position(LABEL_TOPIC, 0, self.next_offset)
        self.next_offset += 1
        message = Message(position, timestamp, None, encode_label(sample_id, list(label)))
        self.queued.append((record_index + self.delay, LabelRecord(sample_id, label, position, timestamp, message)))

    def poll(self, timeout_s: float, max_records: int) -> Poll:
        poll = Poll()
        while self.queued and (self.ended or self.queued[0][0] < self.predicted) and len(poll.records) < max_records:
            poll.records.append(self.queued.popleft()[1])
        return poll

    def commit(self, offsets: object) -> None:
        pass


class Unlabelled:
    """The feature topic: the stream's records without their labels, which go to ``feed``."""

    poll_timeout_s, fetches_ahead = 0.0, False

    def __init__(self, inner: object, feed: LabelFeed) -> None:
        self.inner, self.feed = inner, feed

    @property
    def exhausted(self) -> bool:
        self.feed.ended = self.inner.exhausted
        return self.inner.exhausted and not self.feed.queued

    def poll(self, timeout_s: float, max_records: int) -> Poll:
        self.feed.predicted = self.feed.read
        poll = self.inner.poll(timeout_s, max_records)
        out = Poll(dead_letters=poll.dead_letters)
        for record in poll.records:
            if record.label is not None:
                self.feed.hold(self.feed.read, record.id, record.label, record.timestamp)
            self.feed.read += 1
            out.records.append(replace(record, label=None))
        return out

    def commit(self, offsets: object) -> None:
        self.inner.commit(offsets)


def measure(delay: int | None, cfg: Config, stream: str) -> Summary:
    """One pass over ``stream``: labels in the records (``delay`` None) or ``delay`` records late."""
    torch.manual_seed(cfg.learner.seed)
    device = torch.device("cpu")
    metrics = make_metrics(cfg, device)
    options = RunOptions(batch_size=cfg.run.batch_size, progress=False)
    with open_source(stream) as inner:
        parts = RunParts(dead_letters=CountOnly())
        source = inner
        if delay is not None:
            feed = LabelFeed(delay)
            source = Unlabelled(inner, feed)
            join = JoinMetrics(metrics.registry)
            parts.labels = DelayedLabels(
                feed, CountOnly(), store=MemoryPending(ttl_s=1e12, max_pending=10**9), metrics=join
            )
        summary, _ = run_stream(source, learner_factory(cfg, device), metrics, options, parts)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stream_cl.bench.delay", description=__doc__.split("\n")[0])
    parser.add_argument("--delays", type=int, nargs="+", default=[0, 10, 100, 1000], help="label delays, in records")
    parser.add_argument("--stream", default=str(default_stream()), help="a labelled recorded stream")
    parser.add_argument("--method", default="er")
    parser.add_argument("--out", type=Path, help="also write the Markdown table here")
    args = parser.parse_args(argv)
    cfg = Config().with_values(method=args.method, probe_fraction=0.0, no_drift=True, metrics_port=0, device="cpu")
    rows = [
        "| label delay (records) | delayed prequential accuracy | learned | predicted only |",
        "|---|---|---|---|",
    ]
    for delay in [None, *args.delays]:
        s = measure(delay, cfg, args.stream)
        name = "labels in the records" if delay is None else f"{delay:,}"
        rows.append(f"| {name} | {s.online_accuracy:.3f} | {s.learned} | {s.predicted} |")
    info = machine(torch.device("cpu"))
    table = (
        "\n".join(rows)
        + f"\n\n{cfg.learner.method} / {cfg.learner.model}, batch {cfg.run.batch_size}, {json.dumps(info)}\n"
    )
    print(table)
    if args.out is not None:
        args.out.write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
