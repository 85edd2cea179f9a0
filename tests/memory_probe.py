"""Peak memory growth of one call, for tests that must prove a call did not read a big file."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from pathlib import Path


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)


def peak_growth(call: Callable[[], None]) -> int:
    """Bytes the process's peak memory grew by during ``call``: the resident high-water mark,
    reset just before (``/proc/self/clear_refs``), where Linux allows it; else tracemalloc's peak,
    which sees numpy's and Python's allocations (not torch's)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        start = _rss_kib("VmRSS")
    except OSError:
        tracemalloc.start()
        try:
            call()
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        return peak
    call()
    return (_rss_kib("VmHWM") - start) << 10


