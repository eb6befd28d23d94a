"""Device choice: CUDA, then Apple MPS, then CPU, unless the user says otherwise."""

from __future__ import annotations

import torch


def pick_device(requested: str = "auto") -> torch.device:
    """Resolve ``auto``/``cpu``/``cuda``/``cuda:N``/``mps`` to an available torch device.

    Raises
    ------
    ValueError
        If the requested device is not available on this machine, or is not a device string.
    """
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:  # "cpu:x", "cuda:abc": a RuntimeError would end the command with a traceback
        raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, got {requested!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= (count := torch.cuda.device_count()):
        raise ValueError(f"device {requested!r} requested but this machine has {count} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' requested but MPS is not available; use --device cpu")
    return device
