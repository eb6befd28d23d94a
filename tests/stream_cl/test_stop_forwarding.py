"""The ``serve --workers N`` launcher's stop signals: SIGTERM/SIGINT go on to its own workers, which drain and
return, whichever torch runs the launcher (torch's elastic agent is a small, real group here: no broker)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from stream_cl.scaleout import _STOPPING, _forward_stop_signals
from tests.fixtures.procs import free_port


def _drains(ready: str) -> str:
    """A worker that drains on SIGTERM: it says it is ready, waits for the signal and returns."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    (Path(ready) / os.environ["RANK"]).touch()
    return "drained" if stop.wait(60) else "never stopped"


def test_where_torch_s_agent_takes_sigterm_itself_it_is_forwarded_and_the_workers_return(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No signals_to_handle: the agent handles SIGTERM, SIGINT, SIGHUP and SIGQUIT itself, as torch before
    # that setting always did (its handler raises in the launcher and kills the workers 30 s later).
    monkeypatch.setenv("TORCHELASTIC_SIGNALS_TO_HANDLE", "SIGTERM,SIGINT,SIGHUP,SIGQUIT")  # the agent sets it
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=2,
        run_id="stop-forwarding",
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{free_port()}",
        max_restarts=0,
        monitor_interval=0.2,
        start_method="spawn",
    )
    assert config.signals_to_handle.startswith("SIGTERM,SIGINT")

    def stop_when_ready() -> None:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGTERM)

    sender = threading.Thread(target=stop_when_ready, daemon=True)
    sender.start()
    started = time.monotonic()
    with _forward_stop_signals(agent_handles_them=True) as received:
        results = elastic_launch(config, _drains)(str(tmp_path))
    sender.join()
    assert results == {0: "drained", 1: "drained"}  # forwarded, and what the workers returned was read
    assert received == [signal.SIGTERM]
    assert time.monotonic() - started < 60  # not the agent's 30 s shutdown after the workers' 60 s


def test_the_launcher_forwards_a_stop_signal_to_its_own_workers_only_and_later_workers_start_stopped() -> None:
    spawn = multiprocessing.get_context("spawn")
    bystander = spawn.Process(target=time.sleep, args=(60,))  # a child the launcher did not start
    bystander.start()
    worker = spawn.Process(target=time.sleep, args=(60,))
    before = signal.getsignal(signal.SIGTERM)
    try:
        with _forward_stop_signals() as received:
            worker.start()
            os.kill(os.getpid(), signal.SIGTERM)
            worker.join(30)
            assert worker.exitcode == -signal.SIGTERM  # the worker got the signal, the launcher lives on
            bystander.join(1)
            assert bystander.exitcode is None  # started before the launch: not one of its workers
            assert received == [signal.SIGTERM]
            assert os.environ[_STOPPING] == "1"  # a group restarted from now on starts stopped
        assert _STOPPING not in os.environ and signal.getsignal(signal.SIGTERM) is before
    finally:
        for process in (worker, bystander):
            process.kill()
            process.join()
