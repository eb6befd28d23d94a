"""``stream-cl serve --workers N`` and signals: SIGTERM to the launcher drains every worker, like one process."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from kafka import KafkaAdminClient

from stream_cl.checkpoint import CheckpointStore
from stream_cl.scaleout import _STOPPING, _forward_stop_signals
from tests.fixtures.redis import RedisServer
from tests.stream_cl.test_scaleout import GROUP, learned_ids, run, shared_buffer, start
from tests.stream_cl.test_serve_kafka import produce, wait_until


def test_sigterm_to_the_launcher_drains_every_worker_and_the_next_run_learns_the_rest_once(
    kafka_bootstrap: str, make_topic: Callable[..., str], redis_server: RedisServer, tmp_path: Path
) -> None:
    topic = make_topic(4)
    where = produce(kafka_bootstrap, topic, 3000)
    buffer = shared_buffer(redis_server, f"signals-{topic}")
    proc = start(kafka_bootstrap, topic, tmp_path, "first", *GROUP, *buffer, "--drain-timeout", 20)
    log = tmp_path / "first.log"
    predictions = [tmp_path / f"first.{r}.jsonl" for r in (0, 1)]
    with proc:
        try:
            wait_until(lambda: all(p.exists() and p.read_bytes().count(b"\n") >= 200 for p in predictions), proc, log)
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0, log.read_text()[-3000:]
            assert time.monotonic() - started < 30
        finally:
            proc.kill()
    text = log.read_text()
    assert "worker 1 of 2" in text and text.count("worker 1 of 2 (gloo)") == 1  # drained, not restarted
    first = json.loads((tmp_path / "first.json").read_text())  # the group's summary, as after any drain
    learned = learned_ids(tmp_path, "first", 2)
    assert first["learned_total"] == len(learned) < len(where)
    _, checkpoint = CheckpointStore(tmp_path / "ckpt").latest()
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    committed = {
        (tp.topic, tp.partition): om.offset for tp, om in admin.list_group_offsets(f"g-{topic}")[f"g-{topic}"].items()
    }
    admin.close()
    assert {(t, p): o for t, p, o in checkpoint["offsets"]} == committed  # every worker committed what it learned

    # a consumer group of its own, as in test_scaleout: the checkpoint decides where every partition starts
    second = run(kafka_bootstrap, topic, tmp_path, "second", *GROUP, *buffer, "--group", f"second-{topic}")
    rest = learned_ids(tmp_path, "second", 2)
    assert sorted(learned + rest) == sorted(where)  # nothing learned twice, nothing skipped
    assert second["learned_total"] == len(where)


def test_the_launcher_forwards_a_stop_signal_to_its_workers_and_later_workers_start_stopped() -> None:
    worker = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(60,))
    before = signal.getsignal(signal.SIGTERM)
    with _forward_stop_signals() as received:
        worker.start()
        os.kill(os.getpid(), signal.SIGTERM)
        worker.join(30)
        assert worker.exitcode == -signal.SIGTERM  # the worker got the signal, the launcher lives on
        assert received == [signal.SIGTERM]
        assert os.environ[_STOPPING] == "1"  # a group restarted from now on starts stopped
    assert _STOPPING not in os.environ and signal.getsignal(signal.SIGTERM) is before
