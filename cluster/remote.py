"""Errors from remote calls, as a person should read them.

Ray wraps an exception raised inside an actor in ``RayTaskError``, whose message starts with
``ray::ReplicaActor.infer() (pid=..., actor_id=...)`` and carries the remote traceback (with colour
codes); an actor that failed to start is an ``ActorDiedError`` with that text. At the ``Fleet``
boundary every such error becomes the error itself:

- one of the project's own errors (``engines``, ``actors``, ``cluster``) is raised as it was raised
  remotely (its type and message);
- any other remote error becomes ``RemoteError`` (or the given type), message first:
  ``"<Type>: <its first line>"``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from ray.exceptions import ActorDiedError, RayTaskError

from .errors import FleetError, RemoteError

__all__ = ["first_line", "readable", "readable_errors"]

_OWN = ("engines.", "actors.", "cluster.")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
E = TypeVar("E", bound=Exception)


def first_line(text: str) -> str:
    lines = [ln.strip() for ln in _ANSI.sub("", text).splitlines() if ln.strip()]
    return lines[0] if lines else ""


def _last_error_line(text: str) -> str:
    """The ``Type: message`` line a Python traceback ends with (the type without its module)."""
    lines = [ln.strip() for ln in _ANSI.sub("", text).splitlines() if ln.strip()]
    for line in reversed(lines):
        m = re.match(r"^(?:[A-Za-z_]\w*\.)*([A-Za-z_]\w*): (.*)$", line)
        if m:
            return f"{m.group(1)}: {m.group(2)}"
    return lines[-1] if lines else ""


def readable(exc: BaseException, wrap: Callable[[str], FleetError] = RemoteError,
             where: str = "") -> BaseException:
    """The error to raise in place of ``exc`` (see the module docstring); ``where`` prefixes the
    message of a wrapped error ("replica r0")."""
    prefix = f"{where}: " if where else ""
    if isinstance(exc, RayTaskError):
        cause = exc.cause
        if cause is not None and type(cause).__module__.startswith(_OWN):
            return cause
        if cause is not None:
            return wrap(f"{prefix}{type(cause).__name__}: {first_line(str(cause))}")
        return wrap(f"{prefix}{_last_error_line(str(exc))}")
    if isinstance(exc, ActorDiedError) and getattr(exc, "actor_init_failed", False):
        who = f"{where} could not start" if where else "could not start"
        return wrap(f"{who}: {_last_error_line(getattr(exc, 'error_msg', '') or str(exc))}")
    return exc


@contextmanager
def readable_errors(wrap: Callable[[str], FleetError] = RemoteError, where: str = "") -> Iterator[None]:
    """Re-raise remote errors raised inside the block as ``readable`` says."""
    try:
        yield
    except (RayTaskError, ActorDiedError) as exc:
        better = readable(exc, wrap, where)
        if better is exc:
            raise
        raise better from None
