"""Learn a stream from Python: the same run `stream-cl run` does, configured in code.

python examples/learn_a_stream.py
"""

from __future__ import annotations

from stream_cl.config import Config
from stream_cl.service import serve

# A generated stream of 2,000 feature vectors in 4 classes; any source URL works here
# (kafka://HOST:PORT/TOPIC, a recorded-stream file).
config = Config.from_mapping(
    {
        "source": "synthetic://?records=2000&classes=4&dim=8",
        "method": "er",
        "model": "mlp",
        "buffer_size": 200,
        "metrics_port": 0,  # no /metrics server for this example
        "no_progress": True,
    }
)
summary = serve(config)
print(summary.render())
assert summary.consumed == 2000
