"""Backbones: an MLP for feature vectors and ResNet-18 (reduced nf=20 or full nf=64, CIFAR stem)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

MODELS = ("mlp", "resnet18-reduced", "resnet18")


class UnsupportedInput(ValueError):
    """The configured model cannot be built for an input: a record of it is a dead letter, not a crash."""


class MLP(nn.Module):
    """Two hidden ReLU layers over the flattened input; ``out_dim`` features."""

    def __init__(self, in_dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.out_dim = hidden
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# Module types whose forward ignores train/eval mode (exact types: a subclass may read ``self.training``).
_MODE_FREE = {MLP, nn.Sequential, nn.Flatten, nn.Linear, nn.ReLU, nn.Identity}


def mode_matters(module: nn.Module) -> bool:
    """Whether ``module.train()``/``eval()`` may change what it computes: unless every submodule is
    known to ignore the mode, assume it does.

    ``nn.Module.train`` walks every submodule; for an MLP the walk costs as much as a small
    forward pass, so callers skip it when the mode changes nothing.
    """
    return any(type(m) not in _MODE_FREE for m in module.modules())


class BatchNorm2d(nn.BatchNorm2d):
    """Batch norm (affine, running statistics, momentum 0.1) that normalises a training batch of one value per
    channel (one sample whose map is 1×1, as a small image's is deep in a ResNet) with its running statistics,
    where torch raises: batch statistics are undefined there, and a stream of small images polled one record at
    a time meets that batch. Written without ``super().forward`` so that TorchScript compiles it."""

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        batch_stats = self.training and x.shape[0] * x.shape[2] * x.shape[3] > 1
        if batch_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        momentum = self.momentum
        assert momentum is not None
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, batch_stats, momentum, self.eps
        )


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 with the CIFAR stem (3×3 conv, stride 1, no max-pool); ``8·nf`` features.

    ``nf=64`` is the full network (512-d features, OnPro's backbone); ``nf=20`` is the reduced
    ResNet-18 of GEM/ER papers (160-d).
    """

    def __init__(self, in_channels: int = 3, nf: int = 64) -> None:
        super().__init__()
        self.out_dim = 8 * nf
        self.conv1 = nn.Conv2d(in_channels, nf, 3, 1, 1, bias=False)
        self.bn1 = BatchNorm2d(nf)
        layers, in_planes = [], nf
        for mult, stride in ((1, 1), (2, 2), (4, 2), (8, 2)):
            layers += [BasicBlock(in_planes, nf * mult, stride), BasicBlock(nf * mult, nf * mult, 1)]
            in_planes = nf * mult
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)


def build_backbone(name: str, input_shape: tuple[int, ...], *, width: int | None = None) -> nn.Module:
    """Backbone ``name`` for model inputs of ``input_shape`` (one sample, after ``to_model_input``).

    ``width`` overrides the MLP hidden size or the ResNet ``nf``.
    """
    if name == "mlp":
        return MLP(math.prod(input_shape), hidden=width or 256)
    if name in ("resnet18", "resnet18-reduced"):
        if len(input_shape) != 3:
            raise UnsupportedInput(f"{name} needs image inputs (C, H, W), got shape {input_shape}")
        nf = width or (64 if name == "resnet18" else 20)
        return ResNet18(in_channels=input_shape[0], nf=nf)
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")


def check_size(name: str, input_shape: tuple[int, ...], max_parameters: int, *, width: int | None = None) -> None:
    """Raise :class:`UnsupportedInput` if backbone ``name`` would have more than ``max_parameters`` for
    ``input_shape``. The first layer grows with the input, so one huge first record would otherwise fix a
    model every later record misfits; the count is taken on the meta device, allocating nothing."""
    with torch.device("meta"):
        n = sum(p.numel() for p in build_backbone(name, input_shape, width=width).parameters())
    if n > max_parameters:
        raise UnsupportedInput(f"{name} for inputs {input_shape} would have {n:,} parameters, over {max_parameters:,}")
