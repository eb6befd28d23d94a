"""Turn stored inputs (uint8 HWC images, float CHW images, feature vectors) into model inputs."""

from __future__ import annotations

import torch

# uint8 pixels are scaled to [0, 1] and centred; a fixed affine map keeps the store and the
# wire format raw (uint8 stays 4x smaller than float) and the conversion free of dataset stats.
PIXEL_MEAN = 0.5
PIXEL_STD = 0.25


def on_device(t: torch.Tensor, device: torch.device, *, non_blocking: bool = False) -> torch.Tensor:
    """``t`` on ``device``, without a ``.to`` dispatch when it is there already (small batches pay per op)."""
    return t if t.device == device else t.to(device, non_blocking=non_blocking)


def to_model_input(x: torch.Tensor) -> torch.Tensor:
    """Float model input from a stored batch: uint8 NHWC → normalised float NCHW.

    >>> to_model_input(torch.full((2, 4, 4, 3), 255, dtype=torch.uint8)).shape
    torch.Size([2, 3, 4, 4])
    """
    if x.dtype == torch.uint8:
        x = x.float().div_(255.0).sub_(PIXEL_MEAN).div_(PIXEL_STD)
        if x.dim() == 4:
            x = x.permute(0, 3, 1, 2)
        elif x.dim() == 3:  # greyscale HW images get a channel axis
            x = x.unsqueeze(1)
        return x.contiguous()
    return x.float()
