"""Peak arithmetic rates of GPUs, to put a measured FLOP rate next to what the card could do.

Vendor datasheet figures in TFLOP/s, dense (without the 2:4 sparsity that doubles the tensor-core
figures), at boost clock. ``fp32`` is the plain CUDA-core rate; ``tf32`` the tensor-core rate that
cuDNN convolutions use for float32 by default (``torch.backends.cudnn.allow_tf32``); ``fp16``/``bf16``
the tensor-core rates of mixed precision. Names are matched as substrings of
``torch.cuda.get_device_name()``, most specific first.
"""

from __future__ import annotations

PEAKS_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200 NVL", {"fp32": 60.0, "tf32": 417.5, "fp16": 835.5, "bf16": 835.5}),
    ("H200", {"fp32": 67.0, "tf32": 494.5, "fp16": 989.5, "bf16": 989.5}),  # SXM, same compute as H100 SXM
    ("H100 NVL", {"fp32": 60.0, "tf32": 417.5, "fp16": 835.5, "bf16": 835.5}),
    ("H100 PCIe", {"fp32": 51.0, "tf32": 378.0, "fp16": 756.0, "bf16": 756.0}),
    ("H100", {"fp32": 67.0, "tf32": 494.5, "fp16": 989.5, "bf16": 989.5}),
    ("A100", {"fp32": 19.5, "tf32": 156.0, "fp16": 312.0, "bf16": 312.0}),
    ("L40S", {"fp32": 91.6, "tf32": 183.0, "fp16": 362.0, "bf16": 362.0}),
    ("L4", {"fp32": 30.3, "tf32": 60.0, "fp16": 121.0, "bf16": 121.0}),
    ("V100", {"fp32": 15.7, "fp16": 125.0}),
    ("T4", {"fp32": 8.1, "fp16": 65.0}),
]

TENSOR_PRECISION = {"float32": "tf32", "float16": "fp16", "bfloat16": "bf16"}
"""The tensor-core peak a step in this precision is compared with."""


def peaks_for(device_name: str) -> tuple[str, dict[str, float]]:
    """The table row matching ``device_name``: ``(matched name, peaks)``, or ``("unknown", {})``."""
    for name, peaks in PEAKS_TFLOPS:
        if name.lower() in device_name.lower():
            return name, peaks
    return "unknown", {}


def fraction_of_peak(achieved_tflops: float, device_name: str, precision: str) -> dict[str, float | str | None]:
    """The measured rate against the card's peaks for ``precision`` (``float32``/``float16``/``bfloat16``)."""
    matched, peaks = peaks_for(device_name)
    tensor = peaks.get(TENSOR_PRECISION[precision])
    fp32 = peaks.get("fp32")
    return {
        "card": matched,
        "tensor_peak_tflops": tensor,
        "fraction_of_tensor_peak": None if tensor is None else achieved_tflops / tensor,
        "fp32_peak_tflops": fp32,
        "fraction_of_fp32_peak": None if fp32 is None else achieved_tflops / fp32,
    }
