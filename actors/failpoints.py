"""Named failure hooks for fault-injection tests. Inert unless armed.

Armed by a fleet config's ``failpoints`` mapping or by the environment variable
``WEIGHT_REFIT_FAILPOINTS`` (``name=action,name=action``). Actions:

- ``raise``: raise ``FailpointError`` at the hook.
- ``exit``: kill the process at once (``os._exit``), as a crash would.
- ``hang``: block the calling thread until the process dies.
- ``sleep:S``: sleep S seconds, then go on.
- any action may be suffixed ``@N`` to fire only on the N-th time the hook is reached (1-based),
  and prefixed ``REPLICA_ID/`` to fire only in that replica (e.g. ``r1/exit``).

An unarmed hook costs one dictionary lookup.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping

ENV = "WEIGHT_REFIT_FAILPOINTS"

KNOWN = frozenset({
    "replica.before_vote",
    "replica.after_vote",
    "replica.before_commit",
    "replica.before_activate",
    "replica.during_activate",
    "replica.on_start",
    "coordinator.after_begin",
    "coordinator.after_decision_logged",
    "coordinator.mid_activate",
    "coordinator.before_activated_logged",
    "persist.before_save",
})


class FailpointError(RuntimeError):
    """Raised by a failpoint armed with ``raise``."""


def parse(spec: str) -> dict[str, str]:
    """``"a=exit,b=sleep:1"`` -> ``{"a": "exit", "b": "sleep:1"}``."""
    out: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, action = item.partition("=")
        out[name.strip()] = action.strip()
    return out


class Failpoints:
    """The armed hooks of one process (an actor): ``fp.hit("replica.before_vote")``."""

    def __init__(self, armed: Mapping[str, str] | None = None, owner: str = "") -> None:
        spec = dict(parse(os.environ.get(ENV, "")))
        spec.update(armed or {})
        unknown = set(spec) - KNOWN
        if unknown:
            raise ValueError(f"unknown failpoint(s) {sorted(unknown)}; known: {sorted(KNOWN)}")
        self._armed = spec
        self._owner = owner
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def arm(self, name: str, action: str | None) -> None:
        """Arm (or, with None, disarm) a hook at run time; its hit count restarts."""
        if name not in KNOWN:
            raise ValueError(f"unknown failpoint {name!r}; known: {sorted(KNOWN)}")
        with self._lock:
            if action is None:
                self._armed.pop(name, None)
            else:
                self._armed[name] = action
            self._counts.pop(name, None)

    def hit(self, name: str) -> None:
        action = self._armed.get(name)
        if action is None:
            return
        if "/" in action:
            who, _, action = action.partition("/")
            if who != self._owner:
                return
        nth = 0
        if "@" in action:
            action, _, n = action.partition("@")
            nth = int(n)
        with self._lock:
            self._counts[name] = self._counts.get(name, 0) + 1
            count = self._counts[name]
        if nth and count != nth:
            return
        if action == "raise":
            raise FailpointError(f"failpoint {name} fired")
        if action == "exit":
            os._exit(17)
        if action == "hang":
            threading.Event().wait()
        if action.startswith("sleep:"):
            time.sleep(float(action.split(":", 1)[1]))
