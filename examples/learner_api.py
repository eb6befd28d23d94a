"""Use a learner directly: predict-then-learn micro-batches, predict at any time, save and restore.

python examples/learner_api.py
"""

from __future__ import annotations

import numpy as np
import torch

from stream_cl.build import build_learner
from stream_cl.learner import Batch

rng = np.random.default_rng(0)
centres = {"cat": rng.normal(0, 3, 8), "dog": rng.normal(0, 3, 8)}

# The learner is built for the input shape and dtype of the stream's records.
learner = build_learner("er", "mlp", (8,), np.dtype(np.float32), device=torch.device("cpu"), seed=0)
for _ in range(50):
    names = ["cat" if i % 2 else "dog" for i in range(10)]
    x = np.stack([centres[n] + rng.normal(0, 1, 8) for n in names]).astype(np.float32)
    # Labels are paths from coarse to fine: ("animal", "cat") works the same way; None = predict only.
    learner.observe(Batch(torch.from_numpy(x), [(n,) for n in names]))

probe = np.stack([centres["cat"], centres["dog"]]).astype(np.float32)
prediction = learner.predict(torch.from_numpy(probe))
print("predicted:", [path[-1][0] for path in prediction.paths(learner.labels)])

state = learner.state_dict()  # plain tensors: torch.save it, load it with weights_only=True
restored = build_learner("er", "mlp", (8,), np.dtype(np.float32), device=torch.device("cpu"), seed=1)
restored.load_state_dict(state)
assert torch.equal(restored.predict(torch.from_numpy(probe)).classes, prediction.classes)
print("restored learner predicts the same")
