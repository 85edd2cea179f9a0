"""Python's cycle collector, kept off the serving path, and its pauses measured.

A full collection walks every object the collector tracks while holding the GIL, so every thread
of the process (the serving ones included) waits for it. A replica tracks a few hundred thousand
objects after start-up (Ray, torch, the loaded program), nearly all alive for as long as the
process; a full collection then held requests for longer than a refit (``docs/benchmarks.md``,
"Serving stalls"). Freezing them (``gc.freeze``) moves them out of every generation: later
collections, full ones included, walk only the objects made after. The frozen ones are never
collected, which is what they are anyway. ``CollectorPauses`` records how long collections
held the process, per generation (a replica's ``status()["gc"]``). Torch-free.
"""

from __future__ import annotations

import gc
import threading
import time
from typing import Any

__all__ = ["CollectorPauses", "freeze_startup_heap"]


def freeze_startup_heap() -> int:
    """Collect once, then freeze every object alive now; returns how many are frozen. Call it
    once start-up is done, in a process that serves requests."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


class CollectorPauses:
    """The longest pause and the count of pauses of at least ``long_s``, per generation, of the
    collections run in this process since ``install()``; ``as_dict`` adds the objects frozen and
    those a full collection would walk now (``tracked``)."""

    def __init__(self, long_s: float = 0.01) -> None:
        self.long_s = long_s
        self._started: dict[int, float] = {}  # thread id -> when its collection started
        self.longest_s = [0.0, 0.0, 0.0]
        self.long = [0, 0, 0]
        # reentrant: a collection set off by an allocation under the lock runs the callback in
        # the same thread, which takes the lock again
        self._lock = threading.RLock()

    def install(self) -> CollectorPauses:
        gc.callbacks.append(self._on_collect)
        return self

    def _on_collect(self, phase: str, info: dict[str, Any]) -> None:
        now = time.perf_counter()
        key = threading.get_ident()
        if phase == "start":
            self._started[key] = now
            return
        started = self._started.pop(key, None)
        if started is None:
            return
        pause, gen = now - started, int(info.get("generation", 2))
        with self._lock:
            self.longest_s[gen] = max(self.longest_s[gen], pause)
            self.long[gen] += pause >= self.long_s

    def as_dict(self) -> dict[str, Any]:
        with self._lock:
            longest, long = tuple(self.longest_s), tuple(self.long)
        return {"frozen": gc.get_freeze_count(), "tracked": len(gc.get_objects()),
                "collections": [g["collections"] for g in gc.get_stats()],
                "longest_ms": [round(s * 1e3, 3) for s in longest],
                f"over_{self.long_s * 1e3:g}ms": list(long)}
