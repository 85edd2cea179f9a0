"""Named failure hooks for fault-injection tests. Inert unless armed.

Armed by a fleet config's ``failpoints`` mapping or by the environment variable
``WEIGHT_REFIT_FAILPOINTS`` (``name=action,name=action``). Actions:

- ``raise``: raise ``FailpointError`` at the hook.
- ``exit``: kill the process at once (``os._exit``), as a crash would.
- ``hang``: block the calling thread until the process dies.
- ``sleep:S``: sleep S seconds, then go on (a delayed message, a slow disk).
- ``drop:S``: a lost message: sleep S seconds (the sender times out meanwhile), then raise
  ``MessageDropped`` instead of going on. At a ``message.*`` hook the work is never done; at a
  ``reply.*`` hook the work was done and only the answer is lost.
- ``oserror:NAME``: raise ``OSError`` with that errno (``ENOSPC``, ``EIO``, ``EACCES``, ...), as the
  operating system would from the call the hook stands in front of.
- any action may be suffixed ``@N`` to fire only on the N-th time the hook is reached (1-based),
  and prefixed ``OWNER/`` to fire only in that process (a replica id, ``coordinator`` or
  ``persist``; e.g. ``r1/exit``).

An unarmed hook costs one dictionary lookup.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Mapping

ENV = "WEIGHT_REFIT_FAILPOINTS"

PROTOCOL_MESSAGES = ("prepare", "commit", "activate", "abort", "sync_to", "renew_lease", "exclude")

KNOWN = frozenset({
    "replica.before_vote",
    "replica.after_vote",
    "replica.before_commit",
    "replica.before_activate",
    "replica.during_activate",
    "replica.on_start",
    "replica.export",
    "coordinator.after_begin",
    "coordinator.after_decision_logged",
    "coordinator.mid_activate",
    "coordinator.before_activated_logged",
    "persist.before_save",
    # the operating system calls under the log and the checkpoint store
    "log.write",
    "log.fsync",
    "store.write",
    "store.fsync",
    "store.read",
    # one protocol message received by a replica (before its work) and its reply (after it)
    *(f"message.{m}" for m in PROTOCOL_MESSAGES),
    *(f"reply.{m}" for m in PROTOCOL_MESSAGES),
})


class FailpointError(RuntimeError):
    """Raised by a failpoint armed with ``raise``."""


class MessageDropped(FailpointError):
    """Raised by a failpoint armed with ``drop:S``: the message (or its reply) was lost."""


def parse(spec: str) -> dict[str, str]:
    """``"a=exit,b=sleep:1"`` -> ``{"a": "exit", "b": "sleep:1"}``."""
    out: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, action = item.partition("=")
        out[name.strip()] = action.strip()
    return out


def check_action(name: str, action: str) -> None:
    """Raise ValueError naming the failpoint if ``action`` is not a valid action."""
    if name not in KNOWN:
        raise ValueError(f"unknown failpoint {name!r}; known: {sorted(KNOWN)}")
    body = action.partition("/")[2] if "/" in action else action
    body, at, nth = body.partition("@")
    if at and not (nth.isdigit() and int(nth) >= 1):
        raise ValueError(f"failpoint {name!r}: '@{nth}' must be a hit count >= 1")
    kind, _, arg = body.partition(":")
    if kind in ("raise", "exit", "hang") and not arg:
        return
    if kind in ("sleep", "drop"):
        try:
            if float(arg) >= 0:
                return
        except ValueError:
            pass
        raise ValueError(f"failpoint {name!r}: {kind} needs seconds >= 0, as in '{kind}:2'")
    if kind == "oserror":
        if isinstance(getattr(errno, arg, None), int):
            return
        raise ValueError(f"failpoint {name!r}: oserror needs an errno name, as in 'oserror:ENOSPC'")
    raise ValueError(f"failpoint {name!r}: unknown action {action!r} "
                     f"(raise, exit, hang, sleep:S, drop:S, oserror:ERRNO)")


class Failpoints:
    """The armed hooks of one process (an actor): ``fp.hit("replica.before_vote")``."""

    def __init__(self, armed: Mapping[str, str] | None = None, owner: str = "") -> None:
        spec = dict(parse(os.environ.get(ENV, "")))
        spec.update(armed or {})
        for name, action in spec.items():
            check_action(name, action)
        self._armed = spec
        self._owner = owner
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def arm(self, name: str, action: str | None) -> None:
        """Arm (or, with None, disarm) a hook at run time; its hit count restarts."""
        if action is not None:
            check_action(name, action)
        elif name not in KNOWN:
            raise ValueError(f"unknown failpoint {name!r}; known: {sorted(KNOWN)}")
        with self._lock:
            if action is None:
                self._armed.pop(name, None)
            else:
                self._armed[name] = action
            self._counts.pop(name, None)

    def hit(self, name: str, detail: str = "") -> None:
        """Run the action armed at ``name``, if any. ``detail`` (a path, a transaction) goes into
        the errors it raises."""
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
        kind, _, arg = action.partition(":")
        where = f"failpoint {name}" + (f" ({detail})" if detail else "")
        if kind == "raise":
            raise FailpointError(f"{where} fired")
        if kind == "exit":
            os._exit(17)
        if kind == "hang":
            threading.Event().wait()
        if kind == "sleep":
            time.sleep(float(arg))
        if kind == "drop":
            time.sleep(float(arg))
            raise MessageDropped(f"{where}: message dropped")
        if kind == "oserror":
            code = getattr(errno, arg)
            raise OSError(code, os.strerror(code), detail or name)
