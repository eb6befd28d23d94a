"""Workers whose models differ in size: every collective that carries the model says so, on every worker,
instead of one worker aborting inside gloo (and NCCL reducing mismatched buffers without a word)."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from stream_cl.build import build_learner
from stream_cl.group import Group, ModelMismatchError, process_group
from tests.fixtures.procs import free_port


def _mismatched_worker(rank: int, port: int, tmp: Path, sync: str, collective: str) -> None:
    torch.set_num_threads(1)
    with process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2):
        group = Group(rank, 2, torch.device("cpu"), sync=sync)
        make = partial(build_learner, "er", "mlp", device=torch.device("cpu"), width=16 + 8 * rank)
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
            raise SystemExit(0) from None  # no barrier: the peer has left the collective too


@pytest.mark.parametrize(
    ("sync", "collective"), [("allreduce", "align"), ("allreduce", "reduce"), ("average", "average")]
)
def test_workers_with_models_of_different_sizes_fail_with_a_clear_error(
    tmp_path: Path, sync: str, collective: str
) -> None:
    mp.spawn(_mismatched_worker, args=(free_port(), tmp_path, sync, collective), nprocs=2, join=True)
    errors = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)]
    assert all("the workers' models differ" in e for e in errors), errors
