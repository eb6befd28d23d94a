"""Path (a): the practical limit -- ER written as a plain in-memory PyTorch loop, no stream-cl code.

Same backbone, optimizer, batch and replay sizes and the same arithmetic per step as
``stream_cl.methods.er.ER``: predict the incoming batch in eval mode, draw a uniform replay batch
from a preallocated tensor buffer, one SGD step on incoming + replayed samples, reservoir insert.
The only differences are those a hand-written loop would make: one fixed-size linear head (the
stream-cl learner grows its heads as classes appear) and integer labels known up front.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from stream_cl.bench.perf.data import Case, Stream
from stream_cl.bench.perf.timing import StepTimes
from stream_cl.build import model_input_shape
from stream_cl.models import build_backbone, mode_matters


def _prepare(x: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC pixels → normalised float NCHW (the same affine map as ``stream_cl.inputs``)."""
    if x.dtype == torch.uint8:
        return x.float().div_(255.0).sub_(0.5).div_(0.25).permute(0, 3, 1, 2).contiguous()
    return x.float()


def run_plain_er(case: Case, stream: Stream, device: torch.device, seed: int = 0) -> StepTimes:
    """Run ER over the whole stream in a plain loop; returns the step timings."""
    torch.manual_seed(seed)
    xs, ys = torch.from_numpy(stream.x), torch.from_numpy(stream.y.astype(np.int64))
    backbone = build_backbone(case.model, model_input_shape(stream.x.shape[1:], stream.x.dtype), width=case.width)
    net = nn.Sequential(backbone, nn.Linear(backbone.out_dim, len(stream.names))).to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=case.lr)
    switch_mode = mode_matters(net)  # a hand-written loop toggles train/eval only where it changes anything
    capacity = case.buffer_size
    buf_x = torch.zeros((capacity, *xs.shape[1:]), dtype=xs.dtype, device=device)
    buf_y = torch.zeros(capacity, dtype=torch.long, device=device)
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed + 1)
    seen, correct = 0, torch.zeros((), dtype=torch.long, device=device)
    times = StepTimes()
    for begin in range(0, len(stream), case.batch_size):
        start = time.perf_counter()
        xb = xs[begin : begin + case.batch_size].to(device, non_blocking=True)
        yb = ys[begin : begin + case.batch_size].to(device, non_blocking=True)
        inputs, targets = _prepare(xb), yb
        if switch_mode:
            net.eval()
        with torch.no_grad():
            _confidence, predicted = net(inputs).softmax(dim=1).max(dim=1)
        if switch_mode:
            net.train()
        correct += (predicted == yb).sum()
        stored = min(seen, capacity)
        if stored:
            idx = torch.randperm(stored, generator=gen)[: case.replay_batch_size].to(device)
            inputs = torch.cat([inputs, _prepare(buf_x[idx])])
            targets = torch.cat([targets, buf_y[idx]])
        loss = F.cross_entropy(net(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n = len(yb)
        t = np.arange(seen + 1, seen + n + 1)  # Algorithm R for the batch, vectorised
        slots = t - 1
        full = t > capacity
        if full.any():
            j = rng.integers(0, t[full])
            slots[full] = np.where(j < capacity, j, -1)
        keep = np.flatnonzero(slots >= 0)
        if keep.size:
            dst = torch.from_numpy(slots[keep]).to(device)
            src = torch.from_numpy(keep).to(device)
            buf_x[dst], buf_y[dst] = xb[src], yb[src]
        seen += n
        loss.item()  # a real loop logs its loss; the stream-cl learner reads it too
        times.add(start, time.perf_counter(), n)
    return times
