"""Path (d): Avalanche's ``OnlineNaive`` with a ``ReplayPlugin``, on the case's model and stream.

Optional (``pip install '.[bench]'``): Avalanche is imported only when this path runs. The stream is
split, in order, into online experiences of ``case.batch_size`` records; each experience is one
learner step: one SGD step on the incoming records plus ``case.replay_batch_size`` replayed ones from
a ``ReservoirSamplingBuffer`` of ``case.buffer_size`` (Avalanche's reservoir: uniform over the stream,
as Algorithm R), then the buffer update. Same backbone and head as path (a), same SGD learning rate.
Unlike (a), Avalanche does not predict the incoming batch before training on it (no prequential
forward), so it does a little less arithmetic per step.
"""

from __future__ import annotations

import importlib
import sys
import time
import warnings
from importlib import metadata
from typing import Any

import numpy as np
import torch
from torch import nn

from stream_cl.bench.perf.data import Case, Stream
from stream_cl.bench.perf.timing import StepTimes
from stream_cl.build import model_input_shape
from stream_cl.errors import StreamClError
from stream_cl.inputs import to_model_input
from stream_cl.models import build_backbone

INSTALL_HINT = "Avalanche is not installed: pip install '.[bench]' (avalanche-lib, and torchvision matching torch)"

# torchvision's PyPI wheels are CUDA builds; with a CPU torch their C++ ops fail to load, and
# torchvision 0.28's import then stops at a fake-kernel registration for these two ops. Declaring
# their schemas (never called: OnlineNaive and replay use no detection ops) lets the import finish.
_TORCHVISION_OPS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor",
)
_declared: list[Any] = []  # keeps the torch.library fragment (and its definitions) alive


def available() -> str | None:
    """None when Avalanche imports, else why not (for the report)."""
    try:
        _import()
    except StreamClError as error:
        return str(error)
    return None


def note() -> str:
    """How path (d) was run, with the versions (for the report; call when ``available()`` is None)."""
    return (
        f"(d) is Avalanche {metadata.version('avalanche-lib')} (torchvision {metadata.version('torchvision')}): "
        "OnlineNaive with a ReplayPlugin whose storage is a ReservoirSamplingBuffer of the case's buffer size, "
        "replay batch = the case's replay batch, on the same backbone + linear head and SGD learning rate as (a). "
        "The stream is split in order into online experiences of one stream batch (`split_online_stream`, no "
        "shuffle): one experience = one SGD step on incoming + replayed samples, then the reservoir update. A step "
        "is timed from the experience's dataset adaptation to the end of its buffer update. Unlike (a), Avalanche "
        "does not predict each batch before training on it, so it does slightly less arithmetic per step."
    )


def _import() -> dict[str, Any]:
    """The Avalanche names this path uses; raises StreamClError with the install hint when missing."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # qpsolvers (an Avalanche dependency) warns on import: no QP solver
        try:
            _import_torchvision()
            training = importlib.import_module("avalanche.training")
            plugins = importlib.import_module("avalanche.training.plugins")
            storage = importlib.import_module("avalanche.training.storage_policy")
            scenarios = importlib.import_module("avalanche.benchmarks.scenarios")
            online = importlib.import_module("avalanche.benchmarks.scenarios.online")
            datasets = importlib.import_module("avalanche.benchmarks.utils.classification_dataset")
        except ImportError as error:
            raise StreamClError(f"{INSTALL_HINT} ({error})") from error
    return {
        "OnlineNaive": training.OnlineNaive,
        "ReplayPlugin": plugins.ReplayPlugin,
        "SupervisedPlugin": plugins.SupervisedPlugin,
        "EvaluationPlugin": plugins.EvaluationPlugin,
        "ReservoirSamplingBuffer": storage.ReservoirSamplingBuffer,
        "benchmark_from_datasets": scenarios.benchmark_from_datasets,
        "split_online_stream": online.split_online_stream,
        "tensor_dataset": datasets._make_taskaware_tensor_classification_dataset,
    }


def _import_torchvision() -> None:
    try:
        importlib.import_module("torchvision")
    except RuntimeError as error:
        if "torchvision::" not in str(error) or _declared:
            raise
        library = torch.library.Library("torchvision", "FRAGMENT")
        for schema in _TORCHVISION_OPS:
            library.define(schema)
        _declared.append(library)
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]  # the failed import left a half-initialised package
        importlib.import_module("torchvision")


class _ModelInput(nn.Module):
    """Stored samples → model inputs, inside the model, as the stream-cl learner does per batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return to_model_input(x)


def run_avalanche_er(case: Case, stream: Stream, device: torch.device, seed: int = 0) -> StepTimes:
    """Run OnlineNaive + ReplayPlugin over the whole stream; returns one timing per experience (= SGD step)."""
    av = _import()
    torch.manual_seed(seed)
    xs, ys = torch.from_numpy(stream.x), torch.from_numpy(stream.y.astype(np.int64))
    backbone = build_backbone(case.model, model_input_shape(stream.x.shape[1:], stream.x.dtype), width=case.width)
    net = nn.Sequential(_ModelInput(), backbone, nn.Linear(backbone.out_dim, len(stream.names)))
    times = StepTimes()

    class Clock(av["SupervisedPlugin"]):
        """Times each experience from its dataset adaptation (the first per-experience hook) to its end."""

        def before_train_dataset_adaptation(self, strategy: Any, **kwargs: Any) -> None:
            self.start = time.perf_counter()

        def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
            times.add(self.start, time.perf_counter(), len(strategy.experience.dataset))

    class Reservoir(av["ReservoirSamplingBuffer"]):
        """Avalanche's reservoir, minus the deprecation warning its ``update`` gives on every experience."""

        def update(self, strategy: Any, **kwargs: Any) -> None:
            self.post_adapt(strategy, strategy.experience)

    replay = av["ReplayPlugin"](
        mem_size=case.buffer_size,
        batch_size=case.batch_size,
        batch_size_mem=case.replay_batch_size,
        storage_policy=Reservoir(max_size=case.buffer_size),
    )
    # Avalanche 0.6 deprecates OnlineNaive for Naive (the same template) and warns that no logger is set
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("ignore")
        strategy = av["OnlineNaive"](
            model=net,
            optimizer=torch.optim.SGD(net.parameters(), lr=case.lr),
            train_mb_size=case.batch_size,
            device=device,
            plugins=[replay, Clock()],  # Clock last: its after_training_exp follows the buffer update
            evaluator=av["EvaluationPlugin"](loggers=[]),
        )
    data = av["tensor_dataset"](xs, ys, task_labels=0)
    train = av["benchmark_from_datasets"](train=[data]).train_stream
    strategy.train(av["split_online_stream"](train, experience_size=case.batch_size, shuffle=False))
    return times
