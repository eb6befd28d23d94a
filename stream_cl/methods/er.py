"""Experience Replay (ER): learn each incoming batch together with a uniform replay draw."""

from __future__ import annotations

from typing import Any

import torch

from buffers.store import ReplayBatch, ReplayStore
from stream_cl.classifier import Classifier
from stream_cl.heads import hierarchical_ce
from stream_cl.inputs import on_device, to_model_input
from stream_cl.learner import Batch, Observation, Prediction, StepStats
from stream_cl.methods.common import (
    StepGuard,
    clear_grads,
    core_state,
    draw_replay,
    encode_targets,
    load_core_state,
    refused,
    require_number,
)
from stream_cl.methods.er_graph import StaticPrediction, StaticReplayStep


class ER:
    """Experience Replay with a reservoir buffer (Chaudhry et al., 2019).

    Each step: predict the incoming batch, draw ``replay_batch_size`` buffer samples and insert
    the incoming samples into the buffer (in one call, the draw first), then take one SGD step on
    incoming + replayed samples. A batch with a non-finite input or prediction is refused before
    it reaches the buffer, and a step whose loss or gradients are non-finite is not taken
    (:class:`~stream_cl.methods.common.StepGuard`).

    Parameters
    ----------
    model
        Backbone with level heads.
    buffer
        Replay store (memory or Redis).
    lr
        SGD learning rate (> 0).
    replay_batch_size
        Replayed samples per step (>= 0).
    cuda_graphs
        Predict and learn through :mod:`~stream_cl.methods.er_graph`: padded static batches, replayed
        as CUDA graphs on a CUDA model (run eagerly on CPU). Learning is not graphed in a group of workers.
    iterations
        Optimizer steps per incoming batch (>= 1), each with its own replay draw: ER given the
        compute of a costlier method.
    """

    name = "er"

    def __init__(
        self,
        model: Classifier,
        buffer: ReplayStore,
        *,
        lr: float = 0.05,
        replay_batch_size: int = 10,
        cuda_graphs: bool = False,
        iterations: int = 1,
    ) -> None:
        require_number("lr", lr, gt=0)
        require_number("replay_batch_size", replay_batch_size, integer=True, ge=0)
        require_number("iterations", iterations, integer=True, ge=1)
        self.model = model
        self.buffer = buffer
        self.labels = model.tree
        self.lr = lr
        self.replay_batch_size = replay_batch_size
        self.iterations = iterations
        self.optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        self.guard = StepGuard(model)
        self.static_step = (
            StaticReplayStep(model, self.optimizer, self.guard, replay_batch_size, graphs=True) if cuda_graphs else None
        )
        self.predictor = StaticPrediction(model, graphs=True) if cuda_graphs else model

    def observe(self, batch: Batch) -> Observation:
        x_raw = on_device(batch.x, self.model.device, non_blocking=True)
        x = to_model_input(x_raw)
        prediction = self.predictor.predict_prepared(x)
        n_learn = len(batch.labels) - batch.labels.count(None)  # no tensor reduction and sync
        reason = self.guard.screen(x, prediction, batch.labels) if n_learn else None
        if reason is not None:
            return refused(prediction, self.labels, batch.labels, reason)
        level, y, new = encode_targets(self.model, self.optimizer, batch.labels)
        if not n_learn:
            return Observation(prediction, level, y, StepStats(None, 0, 0), new)
        raw_in, inputs, targets, levels = x_raw, x, y, level
        if n_learn < len(y):  # unlabelled records are only predicted
            learn = y >= 0
            raw_in, inputs, targets, levels = x_raw[learn], x[learn], y[learn], level[learn]

        # Draw the replay from the buffer as it was, then insert this batch: one round trip for Redis.
        replay = draw_replay(self.model, self.optimizer, self.buffer, self.replay_batch_size, raw_in, targets, levels)
        if not self.model.training:
            self.model.train()
        values, replayed = [], 0
        for it in range(self.iterations):
            if it:  # compute-matched runs: each further step replays a fresh draw
                replay = draw_replay(self.model, self.optimizer, self.buffer, self.replay_batch_size)
            value = self._step(inputs, targets, levels, replay)
            if value is None and not values:
                return Observation(prediction, level, y, StepStats(None, 0, 0, rejected=self.guard.reason), new)
            if value is None:  # a later step refused: the batch is learned by the steps before it
                break
            values.append(value)
            replayed += len(replay)
        return Observation(prediction, level, y, StepStats(sum(values) / len(values), n_learn, replayed), new)

    def _step(
        self, inputs: torch.Tensor, targets: torch.Tensor, levels: torch.Tensor, replay: ReplayBatch
    ) -> float | None:
        if len(replay):
            device = self.model.device
            inputs = torch.cat([inputs, to_model_input(on_device(replay.x, device))])
            targets = torch.cat([targets, on_device(replay.y, device)])
            levels = torch.cat([levels, on_device(replay.level, device)])
        if self.static_step is not None and self.guard.reduce is None:  # a group averages gradients between steps
            return self.static_step(inputs, targets, levels, len(replay))
        self.guard.begin()
        loss = hierarchical_ce(self.model.level_logits(inputs), targets, levels)
        clear_grads(self.optimizer)
        loss.backward()
        return self.guard.step(loss, self.optimizer)

    def predict(self, x: torch.Tensor) -> Prediction:
        return self.model.predict(x)

    def state_dict(self) -> dict[str, Any]:
        return core_state(self.model, self.optimizer, self.buffer, self.guard)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_core_state(state, self.model, self.optimizer, self.buffer, self.guard)
