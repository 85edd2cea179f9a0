"""What a replica served recently, for a canary's judge (plain Python, thread-safe).

Each request is recorded as (wall time, latency, error); the newest ``capacity`` are kept, so
memory is bounded whatever the traffic. An error is an inference that raised for a reason other
than a bad input (``InputError`` is the caller's fault, not the weights'), or outputs with values
that are not finite. ``window(since)`` sums what was served from wall time ``since`` on, with at
most ``max_latencies`` latencies (an even sample) for the judge's percentiles.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

__all__ = ["ServingStats"]


class ServingStats:
    def __init__(self, capacity: int = 50_000) -> None:
        self._lock = threading.Lock()
        self._records: deque[tuple[float, float, bool]] = deque(maxlen=capacity)

    def record(self, latency_s: float, error: bool) -> None:
        with self._lock:
            self._records.append((time.time(), latency_s, error))

    def window(self, since: float, max_latencies: int = 5_000) -> dict[str, Any]:
        with self._lock:
            recent = [r for r in self._records if r[0] >= since]
        latencies = [r[1] for r in recent]
        step = max(1, len(latencies) // max_latencies)
        return {"served": len(recent), "errors": sum(1 for r in recent if r[2]),
                "latencies": latencies[::step]}
