"""Small durability helpers shared by the transaction log and the checkpoint store."""

from __future__ import annotations

import errno
import os
import time
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


class StateDirInUse(ValueError):
    """Another live coordinator holds this state directory (``holder`` says which, as it wrote)."""


class StateDirLock:
    """An exclusive ``flock`` on ``<state_dir>/coordinator.lock``, held by a coordinator for its
    whole life, so that two coordinators (of two Ray clusters on one machine, say) never share a
    log. The lock goes with the process: a crashed coordinator's successor takes it at once."""

    NAME = "coordinator.lock"

    def __init__(self, state_dir: Path | str) -> None:
        self.path = Path(state_dir) / self.NAME
        self._fd: int | None = None

    def acquire(self, holder: str) -> None:
        """Take the lock (writing ``holder`` into the file) or raise ``StateDirInUse``."""
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StateDirInUse(f"state_dir {str(self.path.parent)!r} is in use by another running "
                                f"coordinator ({self.read_holder() or 'unknown'})") from None
        os.ftruncate(fd, 0)
        os.write(fd, holder.encode())
        self._fd = fd

    def check_free(self, wait_s: float = 5.0) -> None:
        """Raise ``StateDirInUse`` if a live coordinator still holds the lock after ``wait_s``
        (one being stopped lets go within it); takes nothing."""
        if not self.path.exists():
            return
        deadline = time.monotonic() + wait_s
        while True:
            try:
                self.acquire("(a launch checking the directory)")
            except StateDirInUse:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.2)
                continue
            self.release()
            return

    def read_holder(self) -> str:
        try:
            return self.path.read_text().strip()
        except OSError:
            return ""

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
