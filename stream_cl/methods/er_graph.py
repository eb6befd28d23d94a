"""ER's prediction and learning step on fixed storage, replayed as CUDA graphs (``--hparam cuda_graphs=True``).

At stream batch 10 a GPU step is launch-bound: the kernels of one forward, backward and SGD update
take less time than the Python that launches them. A CUDA graph records those launches once and
replays them with one call, which needs every tensor the step touches at a fixed address and of a
fixed shape:

* **Inputs**: the incoming rows go to ``x[:n_stream]`` and the replayed ones to
  ``x[S : S + n_replay]`` of one static batch of ``S + R`` rows (``S`` the largest stream batch seen,
  ``R`` the replay batch); a row weight of 1 or 0 marks real rows, and the loss is
  ``Σ w·CE / Σ w``, so padding rows change neither the loss nor any gradient (their output
  gradients are exactly 0). Models whose training forward mixes rows (batch-norm) would see the
  padding in their batch statistics: for them the static batch is the exact shape
  ``(n_stream, n_replay)``, one graph per shape (a steady stream has one).
* **Update and guard inside the step**: gradients come from ``torch.autograd.grad`` into tensors of
  the graph's pool; plain SGD (no momentum, hence no optimizer state) is applied as
  ``p -= lr · where(ok, g, 0)`` and the batch-norm statistics are put back unless ``ok``, where
  ``ok`` = the loss and the gradient and statistics norms are finite
  (:class:`~stream_cl.methods.common.StepGuard`'s rule, without a host sync before the update). One
  host read after the step fetches the loss and ``ok``.
* **Capture** follows the PyTorch recipe: warm-up iterations on a side stream (the model is saved
  before and restored after them, so warming up learns nothing), then ``torch.cuda.graph``; each
  graph keeps its own memory pool (graphs of different shapes replay in any order). A head that
  grows (a new class), a learning rate that changes or a load that replaces parameters changes the
  parameter set: the graphs are dropped, and the step runs eagerly until the parameters have stayed
  the same for ``settle`` steps (while new classes keep arriving, one capture per step would cost
  more than it saves), then captures afresh. Capture errors are thread-local, so a prefetch or
  fetch thread touching CUDA meanwhile does not invalidate it.

The prediction before learning (:class:`StaticPrediction`) is graphed the same way, padded to the
largest stream batch seen. On CPU, or with graphs off, the same static steps run eagerly: they are
what the CPU tests compare with the dynamic ones of :class:`~stream_cl.methods.er.ER`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from stream_cl.classifier import Classifier
from stream_cl.learner import Prediction
from stream_cl.methods.common import NON_FINITE_LOSS, StepGuard
from stream_cl.models import mode_matters

WARMUP_STEPS = 3  # the recipe's side-stream iterations: cuBLAS/cuDNN workspaces and autograd set up before capture
MAX_GRAPHS = 4  # graphs kept at once (one per batch shape, each with its activations); other shapes run eagerly


@dataclass
class _Slots:
    """The static tensors of one batch shape and what the step writes (loss, ok) there."""

    x: torch.Tensor
    y: torch.Tensor
    level: torch.Tensor
    weight: torch.Tensor
    stream_rows: int
    graph: torch.cuda.CUDAGraph | None = None
    loss: torch.Tensor | None = None
    ok: torch.Tensor | None = None


class StaticReplayStep:
    """One ER learning step (CE over incoming + replayed rows, SGD under the step guard) on static storage.

    Parameters
    ----------
    model, optimizer, guard
        The learner's; ``optimizer`` must be plain SGD (no momentum, dampening, weight decay or
        Nesterov), whose update is written out here. ``guard.reason`` is set as
        :meth:`StepGuard.step` sets it.
    replay_rows
        The replay batch size ``R``.
    graphs
        Capture and replay CUDA graphs (only on a CUDA model; otherwise the step runs eagerly).
    settle
        Steps with unchanged parameters before a capture.
    """

    def __init__(
        self,
        model: Classifier,
        optimizer: torch.optim.Optimizer,
        guard: StepGuard,
        replay_rows: int,
        *,
        graphs: bool,
        settle: int = 3,
    ) -> None:
        plain = isinstance(optimizer, torch.optim.SGD) and all(
            not g["momentum"] and not g["weight_decay"] and not g["nesterov"] and not g["maximize"]
            for g in optimizer.param_groups
        )
        if not plain:
            raise ValueError("the static ER step needs plain SGD (no momentum, weight decay, Nesterov or maximize)")
        self.model, self.optimizer, self.guard = model, optimizer, guard
        self.replay_rows = replay_rows
        self.graphs = graphs and model.device.type == "cuda"
        self.exact_shapes = mode_matters(model.backbone)  # batch-norm: padding would enter the batch statistics
        self.stream_rows = 0
        self._slots: dict[tuple[int, int], _Slots] = {}
        self._signature: tuple = ()
        self.settle, self._unchanged = settle, 0

    def __call__(
        self, inputs: torch.Tensor, targets: torch.Tensor, levels: torch.Tensor, n_replay: int
    ) -> float | None:
        """Learn ``inputs`` (incoming rows, then ``n_replay`` replayed rows); the loss, or None if refused."""
        n_stream = len(inputs) - n_replay
        signature = self._parameter_signature()
        if signature != self._signature:  # new heads or learning rates: the recorded step is stale
            self._slots.clear()
            self._signature, self._unchanged = signature, 0
        slots = self._fill(inputs, targets, levels, n_stream, n_replay)
        captured = sum(s.graph is not None for s in self._slots.values())
        if self.graphs and slots.graph is None and self._unchanged >= self.settle and captured < MAX_GRAPHS:
            self._capture(slots)
        self._unchanged += 1
        if slots.graph is not None:
            slots.graph.replay()
        else:
            slots.loss, slots.ok = self._step(slots)
        loss, ok = torch.stack([slots.loss, slots.ok.float()]).tolist()  # the step's one host sync
        self.guard.reason = None if ok else NON_FINITE_LOSS
        return loss if ok else None

    def _fill(
        self, inputs: torch.Tensor, targets: torch.Tensor, levels: torch.Tensor, n_stream: int, n_replay: int
    ) -> _Slots:
        """Copy the rows into the static batch of their shape (allocated on first use) and set the weights."""
        if self.exact_shapes:
            key = (n_stream, n_replay)
        else:
            self.stream_rows = max(self.stream_rows, n_stream)
            key = (self.stream_rows, max(self.replay_rows, n_replay))
        slots = self._slots.get(key)
        if slots is None:
            rows = key[0] + key[1]
            device = self.model.device
            slots = _Slots(
                x=torch.zeros((rows, *inputs.shape[1:]), dtype=inputs.dtype, device=device),
                y=torch.zeros(rows, dtype=torch.long, device=device),
                level=torch.zeros(rows, dtype=torch.long, device=device),
                weight=torch.zeros(rows, device=device),
                stream_rows=key[0],
            )
            self._slots[key] = slots
        s = slots.stream_rows
        for part, begin, count, source_begin in ((0, 0, n_stream, 0), (1, s, n_replay, n_stream)):
            end = s if part == 0 else len(slots.x)
            rows = slice(begin, begin + count)
            source = slice(source_begin, source_begin + count)
            slots.x[rows] = inputs[source]
            slots.y[rows] = targets[source]
            slots.level[rows] = levels[source]
            slots.weight[rows] = 1.0
            if begin + count < end:  # padding: weight 0, zero inputs (finite, so 0 · gradient stays 0)
                pad = slice(begin + count, end)
                slots.x[pad] = 0
                slots.y[pad] = 0
                slots.level[pad] = 0
                slots.weight[pad] = 0.0
        return slots

    def _step(self, slots: _Slots) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward, backward, guarded SGD update: tensor ops only, no host sync (capturable)."""
        buffers = [b for b in self.model.buffers()]
        saved = [b.clone() for b in buffers]
        logits = self.model.logits(self.model(slots.x))
        total = slots.weight.new_zeros(())
        for lvl, out in enumerate(logits):
            at_level = slots.level == lvl
            target = torch.where(at_level, slots.y, 0)  # rows of other levels index nothing out of range
            ce = F.cross_entropy(out.float(), target, reduction="none")
            total = total + (ce * slots.weight * at_level).sum()
        loss = total / slots.weight.sum().clamp_min(1.0)
        groups = [[p for p in group["params"] if p.requires_grad] for group in self.optimizer.param_groups]
        params = [p for group in groups for p in group]
        grads = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)
        checks = [loss.detach(), torch.nn.utils.get_total_norm(grads).float()]
        statistics = [b for b in buffers if b.is_floating_point()]
        if statistics:
            checks.append(torch.nn.utils.get_total_norm(statistics).float())
        ok = torch.isfinite(torch.stack(checks)).all()
        with torch.no_grad():
            updates = iter([torch.where(ok, g, 0.0) for g in grads])
            for group, opt_group in zip(groups, self.optimizer.param_groups, strict=True):
                if group:
                    torch._foreach_add_(group, [next(updates) for _ in group], alpha=-opt_group["lr"])
            for buffer, before in zip(buffers, saved, strict=True):
                buffer.copy_(torch.where(ok, buffer, before))
        return loss.detach(), ok

    def _capture(self, slots: _Slots) -> None:
        """Record the step as a CUDA graph (PyTorch's whole-network capture recipe)."""
        state = [t.detach().clone() for t in (*self.model.parameters(), *self.model.buffers())]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self._step(slots)
        torch.cuda.current_stream().wait_stream(side)
        with torch.no_grad():  # warming up must not learn: put the model back as it was
            for tensor, before in zip((*self.model.parameters(), *self.model.buffers()), state, strict=True):
                tensor.copy_(before)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            slots.loss, slots.ok = self._step(slots)
        slots.graph = graph

    def _parameter_signature(self) -> tuple:
        """What a recorded step depends on: each parameter's and buffer's storage and shape, each group's lr."""
        params = tuple((p.data_ptr(), tuple(p.shape)) for g in self.optimizer.param_groups for p in g["params"])
        buffers = tuple(b.data_ptr() for b in self.model.buffers())
        return params, buffers, tuple(g["lr"] for g in self.optimizer.param_groups)


class StaticPrediction:
    """:meth:`Classifier.predict_prepared` on a fixed batch of ``S`` rows, replayed as a CUDA graph.

    Prediction runs in eval mode, where no layer mixes rows (batch-norm uses its running statistics),
    so padding rows never change a real row's prediction, for any model. The graph is recaptured when
    the heads change, after ``settle`` unchanged calls, like :class:`StaticReplayStep`; on CPU (or
    with graphs off) the same padded prediction runs eagerly. Results are copied out of the static
    outputs, so a caller may keep them while the next batch is predicted.
    """

    def __init__(self, model: Classifier, *, graphs: bool, settle: int = 3) -> None:
        self.model = model
        self.graphs = graphs and model.device.type == "cuda"
        self.settle, self._unchanged = settle, 0
        self._signature: tuple = ()
        self._x: torch.Tensor | None = None
        self._graph: torch.cuda.CUDAGraph | None = None
        self._out: Prediction | None = None

    def predict_prepared(self, x: torch.Tensor) -> Prediction:
        n = len(x)
        signature = (
            tuple((p.data_ptr(), tuple(p.shape)) for p in self.model.heads.parameters()),
            self.model.tree.depth,
        )
        if self._x is None or n > len(self._x) or x.shape[1:] != self._x.shape[1:] or x.dtype != self._x.dtype:
            self._x = torch.zeros(
                (max(n, 0 if self._x is None else len(self._x)), *x.shape[1:]), dtype=x.dtype, device=x.device
            )
            self._graph, self._unchanged = None, 0  # new storage: a recorded prediction reads the old one
        if signature != self._signature:
            self._graph, self._signature, self._unchanged = None, signature, 0
        self._x[:n] = x
        self._x[n:] = 0
        if self.graphs and self._graph is None and self._unchanged >= self.settle:
            self._capture()
        self._unchanged += 1
        if self._graph is not None:
            self._graph.replay()
            out = self._out
        else:
            out = self.model.predict_prepared(self._x)
        return Prediction(out.classes[:n].clone(), out.confidence[:n].clone())

    def _capture(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # eval-mode and no-grad: warming up changes nothing
            for _ in range(WARMUP_STEPS):
                self.model.predict_prepared(self._x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self._out = self.model.predict_prepared(self._x)
        self._graph = graph
