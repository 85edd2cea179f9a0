"""Small durability helpers shared by the transaction log and the checkpoint store."""

from __future__ import annotations

import errno
import os
from pathlib import Path

_WORDS = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EIO: "I/O error",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only filesystem",
}


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable (fsync of the directory itself)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def describe_os_error(exc: OSError, doing: str) -> str:
    """One line a person can act on: ``"disk full (ENOSPC) writing the transaction log
    /s/txn.log"``. ``doing`` says what was attempted ("writing the transaction log")."""
    code = exc.errno
    name = errno.errorcode.get(code, "") if code is not None else ""
    words = _WORDS.get(code or -1) or (exc.strerror or str(exc) or type(exc).__name__)
    path = exc.filename if isinstance(exc.filename, str) else ""
    return f"{words}{f' ({name})' if name else ''} {doing}{f' {path}' if path else ''}"
