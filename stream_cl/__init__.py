"""stream-cl: online continual learning on data streams.

Sources (``consumers``) feed micro-batches to a :class:`~stream_cl.learner.Learner` that replays
from a buffer (``buffers``) while ``monitoring`` exports accuracy, drift and forgetting live.
The learner types load on first use, so the command line starts without importing torch.
"""

from __future__ import annotations

from importlib import import_module, metadata
from typing import Any

try:
    __version__ = metadata.version("stream-cl")
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "unknown"

_LAZY = {
    "Batch": "stream_cl.learner",
    "Learner": "stream_cl.learner",
    "Observation": "stream_cl.learner",
    "Prediction": "stream_cl.learner",
    "StepStats": "stream_cl.learner",
    "LabelTree": "stream_cl.labels",
}
__all__ = ["Batch", "LabelTree", "Learner", "Observation", "Prediction", "StepStats", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'stream_cl' has no attribute {name!r}")
