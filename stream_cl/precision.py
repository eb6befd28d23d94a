"""Loss arithmetic kept in float32 under mixed precision.

Masks filled with large negatives, divisions by small temperatures and exponentials overflow or
underflow in float16 (largest finite 65,504; smallest subnormal 6e-8), and bfloat16 keeps 8 bits of
mantissa: a contrastive logit of 1/0.07 loses its last digits. Losses therefore compute their
similarities and log-probabilities in float32 with autocast switched off, whatever the forward ran in.
"""

from __future__ import annotations

import contextlib

import torch

_UNCHANGED = contextlib.nullcontext()


def full_precision(*tensors: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast off on the tensors' device (the first one's) for the block: its ops run in the inputs' dtype.

    Where autocast is not on (every CPU step, GPU steps without AMP) nothing is switched: entering and
    leaving an autocast context costs ~9 µs, the check ~0.5 µs, on every learning step.
    """
    device = tensors[0].device.type if tensors else "cpu"
    if not torch.is_autocast_enabled(device):
        return _UNCHANGED
    return torch.autocast(device, enabled=False)


def masked_min(dtype: torch.dtype) -> float:
    """The fill that removes a logit from a softmax in ``dtype`` without overflowing it."""
    return torch.finfo(dtype).min
