"""The threads that do refit work (hashing, scanning, copying weights) beside the serving ones.

They run at the lowest CPU priority (nice ``BACKGROUND_NICE``, 19), below the threads that
serve requests (Ray runs its worker processes at nice 15, a driver at 0), so that on a machine
whose cores also serve requests a refit takes the cores the serving threads leave idle instead
of delaying requests (I6 in practice, not only in principle). A refit on a busy machine is
slower for it. ``WEIGHT_REFIT_BACKGROUND_NICE`` sets another level (0-19) or, with ``off``,
leaves refit work at the priority of the thread that asked for it. Torch-free.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import cache

__all__ = ["BACKGROUND_NICE", "background_nice", "helper_count", "helpers", "lower_priority"]

BACKGROUND_NICE = 19


def background_nice() -> int | None:
    """The nice level refit work runs at; None: as the thread that asked for it."""
    raw = os.environ.get("WEIGHT_REFIT_BACKGROUND_NICE", "").strip().lower()
    if raw in ("", "default"):
        return BACKGROUND_NICE
    if raw in ("off", "none", "no"):
        return None
    level = int(raw) if raw.isdigit() else -1
    if not 0 <= level <= 19:
        raise ValueError(f"WEIGHT_REFIT_BACKGROUND_NICE={raw!r}: expected a nice level 0-19 or 'off'")
    return level


def lower_priority(pid: int | None = None) -> None:
    """Run the calling thread (a Linux task of its own), or the main thread of process ``pid``
    (and the threads it starts afterwards), at ``background_nice()`` if that is lower than its
    priority now, for good: an unprivileged task may not raise it back, so only threads (or
    processes) that do nothing but refit work call this. Best effort: nothing happens where the
    platform refuses."""
    level = background_nice()
    if level is None:
        return
    try:
        task = threading.get_native_id() if pid is None else pid
        if os.getpriority(os.PRIO_PROCESS, task) < level:
            os.setpriority(os.PRIO_PROCESS, task, level)
    except (AttributeError, OSError):
        pass


def helper_count() -> int:
    """How many threads ``helpers()`` has: as many as the cores allow, 2-4."""
    return max(2, min(4, os.cpu_count() or 2))


@cache
def helpers() -> ThreadPoolExecutor:
    """The pool refit work runs on: ``helper_count()`` threads, each at ``background_nice()`` (a
    bad ``WEIGHT_REFIT_BACKGROUND_NICE`` raises its ValueError here)."""
    background_nice()
    return ThreadPoolExecutor(max_workers=helper_count(), thread_name_prefix="refit-helper",
                              initializer=lower_priority)
