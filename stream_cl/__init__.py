"""stream-cl: online continual learning on data streams.

Sources (``consumers``) feed micro-batches to a :class:`~stream_cl.learner.Learner` that replays
from a buffer (``buffers``) while ``monitoring`` exports accuracy, drift and forgetting live.
"""

from __future__ import annotations

from stream_cl.labels import LabelTree
from stream_cl.learner import Batch, Learner, Observation, Prediction, StepStats

__version__ = "0.1.0"
__all__ = ["Batch", "LabelTree", "Learner", "Observation", "Prediction", "StepStats", "__version__"]
