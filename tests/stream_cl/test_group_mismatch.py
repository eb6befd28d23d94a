"""Workers whose models differ in size: every collective that carries the model says so, on every worker,
instead of one worker aborting inside gloo (and NCCL reducing mismatched buffers without a word)."""

from __future__ import annotations

import json
import os
from datetime import timedelta
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from stream_cl.build import build_learner
from stream_cl.group import Group, ModelMismatchError, process_group
from tests.fixtures.procs import free_port

MIDDLE_IS_THE_MEAN = (12, 20, 26)
"""MLP widths whose models (w² + 10w elements on 8 inputs: 264, 600, 936) have the middle one at the mean."""


def _mismatched_worker(rank: int, port: int, tmp: Path, sync: str, collective: str, widths: tuple[int, ...]) -> None:
    torch.set_num_threads(1)
    world_size = len(widths)
    init = {"init_method": f"tcp://127.0.0.1:{port}", "timeout": timedelta(seconds=30)}  # no 30 min hang
    with process_group("gloo", rank=rank, world_size=world_size, **init):
        group = Group(rank, world_size, torch.device("cpu"), sync=sync)
        make = partial(build_learner, "er", "mlp", device=torch.device("cpu"), width=widths[rank])
        learner = group.wrap(make)((8,), np.dtype("float32"))
        try:
            if collective == "align":
                group._align(learner)
            elif collective == "reduce":
                learner.aligned = True
                group.empty_step(learner)
            else:
                group.moved()
                group.average(learner)
        except ModelMismatchError as err:
            (tmp / f"{rank}.json").write_text(json.dumps(str(err)))
            # Out at once, without tearing the process group down: the peers have left the collective too
            # (no barrier), and gloo's teardown racing a peer's sometimes aborts (std::terminate) at exit.
            os._exit(0)


@pytest.mark.parametrize("widths", [(16, 24), MIDDLE_IS_THE_MEAN], ids=["two", "three-middle-at-the-mean"])
@pytest.mark.parametrize(
    ("sync", "collective"), [("allreduce", "align"), ("allreduce", "reduce"), ("average", "average")]
)
def test_workers_with_models_of_different_sizes_fail_with_a_clear_error(
    tmp_path: Path, sync: str, collective: str, widths: tuple[int, ...]
) -> None:
    args = (free_port(), tmp_path, sync, collective, widths)
    mp.spawn(_mismatched_worker, args=args, nprocs=len(widths), join=True)
    errors = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(len(widths))]
    assert all("the workers' models differ" in e for e in errors), errors  # every worker, the middle one too


def test_a_workers_error_is_logged_before_the_group_is_torn_down(caplog) -> None:
    """What a worker failed with is in its log before gloo's teardown, which can abort the process and would
    take the traceback with it."""
    torn_down = []
    real_destroy = torch.distributed.destroy_process_group

    def destroy() -> None:
        torn_down.append(caplog.text)
        real_destroy()

    init = {"init_method": f"tcp://127.0.0.1:{free_port()}", "rank": 0, "world_size": 1}
    with pytest.MonkeyPatch.context() as patch, caplog.at_level("ERROR"):
        patch.setattr(torch.distributed, "destroy_process_group", destroy)
        with pytest.raises(ModelMismatchError), process_group("gloo", **init):
            raise ModelMismatchError("the workers' models differ: 264 against 600 elements")
    assert len(torn_down) == 1
    assert "leaving the group after ModelMismatchError: the workers' models differ" in torn_down[0]
