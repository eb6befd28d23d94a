"""Parts of ``stream-cl bench throughput``: streams, the plain-PyTorch limit, the stream-cl paths, services, report."""

from __future__ import annotations
