"""Refusing paths that do not name regular files, before anything opens them.

``check_regular_file`` looks with ``os.stat`` (following symlinks) and opens nothing, so a FIFO
cannot block the caller and a device is never opened or read. ``open_regular`` then opens with
``O_NONBLOCK`` and checks the opened descriptor again, so a path swapped for a FIFO or a device
between the check and the open is refused too. Readers that only take a path (safetensors'
``safe_open``, ``torch.load(mmap=True)``) get the ``os.stat`` check alone. Running as root, a
``chmod 000`` file is still readable: permission is whatever ``open`` says.

Every refusal is the caller's ``error`` class with a message naming the file and what it is.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO

from .errors import EngineError


def _kind(mode: int) -> str | None:
    """What a non-regular file is, in words (None for a regular file)."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a directory"
    if stat.S_ISFIFO(mode):
        return "is a FIFO, not a regular file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is a device, not a regular file"
    if stat.S_ISSOCK(mode):
        return "is a socket, not a regular file"
    return "is not a regular file"


def _missing(p: Path) -> str:
    try:
        if p.is_symlink():
            return f"does not exist (a dangling symlink to {os.readlink(p)!r})"
    except OSError:
        pass
    return "does not exist"


def check_regular_file(path: str | os.PathLike, what: str, error: type[EngineError]) -> os.stat_result:
    """``os.stat`` of ``path``, or ``error("<what> '<path>' <what is wrong>")``; opens nothing."""
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise error(f"{what} {str(p)!r} {_missing(p)}") from None
    except PermissionError:
        raise error(f"{what} {str(p)!r} cannot be read: permission denied") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise error(f"{what} {str(p)!r} is a symlink loop") from None
        if exc.errno == errno.ENOTDIR:
            raise error(f"{what} {str(p)!r} does not exist (a parent is not a directory)") from None
        raise error(f"{what} {str(p)!r} cannot be examined: {exc.strerror or exc}") from None
    kind = _kind(st.st_mode)
    if kind is not None:
        raise error(f"{what} {str(p)!r} {kind}")
    if not os.access(p, os.R_OK):
        raise error(f"{what} {str(p)!r} cannot be read: permission denied")
    return st


def open_regular(path: str | os.PathLike, what: str, error: type[EngineError]) -> BinaryIO:
    """Open a regular file for binary reading; refuse anything else without blocking or reading."""
    p = Path(path)
    check_regular_file(p, what, error)
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except PermissionError:
        raise error(f"{what} {str(p)!r} cannot be read: permission denied") from None
    except OSError as exc:
        raise error(f"{what} {str(p)!r} cannot be opened: {exc.strerror or exc}") from None
    try:
        kind = _kind(os.fstat(fd).st_mode)
        if kind is not None:
            raise error(f"{what} {str(p)!r} {kind}")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
