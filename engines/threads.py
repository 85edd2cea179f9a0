"""The threads that do refit work (hashing, scanning, copying weights) beside the serving ones.

They run at ``BACKGROUND_NICE`` less CPU priority than the rest of the process, so that on a
machine whose cores also serve requests, a refit takes the cores the serving threads leave
idle instead of delaying requests (I6 in practice, not only in principle). Torch-free.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import cache

__all__ = ["BACKGROUND_NICE", "helpers", "lower_priority"]

BACKGROUND_NICE = int(os.environ.get("WEIGHT_REFIT_BACKGROUND_NICE", "10"))  # 0: refit work as serving


def lower_priority(pid: int | None = None) -> None:
    """Give the calling thread (a Linux task of its own), or the main thread of process ``pid``
    (and the threads it starts afterwards), ``BACKGROUND_NICE`` less CPU priority, for good: an
    unprivileged task may not raise it back, so only threads (or processes) that do nothing but
    refit work call this. Best effort: nothing happens where the platform refuses."""
    if BACKGROUND_NICE <= 0:
        return
    try:
        task = threading.get_native_id() if pid is None else pid
        os.setpriority(os.PRIO_PROCESS, task, os.getpriority(os.PRIO_PROCESS, task) + BACKGROUND_NICE)
    except (AttributeError, OSError):
        pass


@cache
def helpers() -> ThreadPoolExecutor:
    """The pool refit work runs on: as many threads as the cores allow (2-4), each at
    ``BACKGROUND_NICE``."""
    return ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2)),
                              thread_name_prefix="refit-helper", initializer=lower_priority)
