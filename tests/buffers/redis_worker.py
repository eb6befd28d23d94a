"""A learner-like process for the concurrency test: inserts its own stream into shared Redis buffers.

``python -m tests.buffers.redis_worker URL PROC REPEATS TOTAL CAPACITY``: waits for the key
``go``, then inserts ``TOTAL`` samples (x = [proc, position]) in batches of 10 into each buffer
``shared-<r>``, and prints how many of its inserts saw another process's insert in between.
"""

from __future__ import annotations

import sys
import time

import torch

from buffers.open import open_store


def main(url: str, proc: int, repeats: int, total: int, capacity: int) -> None:
    stores = [open_store(f"{url}?name=shared-{r}", capacity, seed=1000 * proc + r) for r in range(repeats)]
    client = stores[0].client
    client.incr("ready")
    while not client.exists("go"):
        time.sleep(0.005)
    interleaved = 0
    for start in range(0, total, 10):
        pos = torch.arange(start, start + 10, dtype=torch.int32)
        x = torch.stack([torch.full_like(pos, proc), pos], dim=1)
        for store in stores:
            before = store.seen
            store.add(x, pos.long() % 5, torch.zeros(10, dtype=torch.long))
            interleaved += store.seen != before + 10
            if errors := store.stats().errors:
                raise SystemExit(f"redis errors: {errors}")
    print(interleaved)


if __name__ == "__main__":
    main(sys.argv[1], *map(int, sys.argv[2:]))
