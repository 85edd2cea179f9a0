"""The transaction log of a fleet whose ``state_dir`` is a URL: the coordinator's local log file,
copied to object storage before any record that must be durable counts.

Contract:
- Objects: ``<url>/log/g<G>/o<offset>``. Generation G's objects, read in offset order (each one
  starting where the one before ended), are byte for byte the log file of the coordinator
  incarnation that wrote G. Every object is created exclusively (fsspec ``xb``: S3's
  ``If-None-Match: *``, ``O_EXCL`` on ``file://``): a second writer at the same place gets
  ``LogFenced`` instead of overwriting.
- ``restore(path)`` reads the newest generation (the highest G that has its ``o0``) back into the
  local file at ``path`` (replacing it atomically); no generation: an empty log.
- ``start(data)`` opens generation G+1 holding ``data`` (the whole local log) for this incarnation
  (an empty log: the first record shipped creates it).
  First it seals G (an empty object at its end), unless it is sealed already, so that an older
  coordinator still appending to G (one that Ray thinks dead) fails there instead of writing where
  nobody reads. Then it deletes G's records, keeping its seal. Two coordinators starting at once:
  one of them gets ``LogFenced``.
- ``ship(read, end)`` uploads the local bytes from the last shipped offset to ``end`` as one
  object. ``TxnLog`` calls it after every sync'd write (EPOCH, COMMIT, ABORT, exclusions, CANARY),
  before the append returns, so such a record is in object storage before it counts; the records
  written without a sync since go with it. A failed upload raises (``TxnLog`` cuts the local line
  back); one whose answer was lost but which landed with these bytes counts as shipped.
- ``replace(data)`` (compaction) is ``start`` of the next generation.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .object_state import open_url

logger = logging.getLogger("weight_refit.coordinator")

__all__ = ["LogFenced", "LogMirror"]

_GENERATION = re.compile(r"^g(\d+)$")
_OBJECT = re.compile(r"^o(\d+)$")


class LogFenced(RuntimeError):
    """Another coordinator wrote the log in object storage where this one was about to."""


class LogMirror:
    def __init__(self, url: str, options: Mapping[str, Any] | None = None) -> None:
        self.url = url.rstrip("/")
        self._fs, self._key = open_url(self.url, options)
        self._lock = threading.Lock()
        self.generation = 0  # the generation this incarnation writes (0: none yet)
        self.shipped = 0  # bytes of the local log in object storage
        self._restored: tuple[int, int, bool] = (0, 0, False)  # newest generation, its end, sealed

    # -- layout

    def _gen_key(self, g: int) -> str:
        return f"{self._key}/g{g:08d}"

    def _obj_key(self, g: int, offset: int) -> str:
        return f"{self._gen_key(g)}/o{offset:015d}"

    def _children(self, key: str, pattern: re.Pattern[str]) -> dict[int, str]:
        self._fs.invalidate_cache(key)
        try:
            names = self._fs.ls(key, detail=False)
        except FileNotFoundError:
            return {}
        found = {}
        for p in names:
            if m := pattern.match(str(p).rstrip("/").rsplit("/", 1)[-1]):
                found[int(m.group(1))] = str(p).rstrip("/")
        return found

    def _create(self, key: str, data: bytes) -> None:
        """Create ``key`` holding ``data``, exclusively; ``LogFenced`` if it exists with other bytes."""
        try:
            with self._fs.open(key, "xb") as f:
                f.write(data)
        except FileExistsError:
            raise LogFenced(f"the log in {self.url} was written by another coordinator at {key!r}") from None
        except Exception:
            with contextlib.suppress(Exception):  # the upload may have landed: then it counts
                if self._fs.cat_file(key) == data:
                    return
            raise

    # -- restore, start, ship

    def restore(self, path: Path) -> bytes:
        """Write the newest generation's log to ``path``; returns its bytes."""
        data, end, sealed, newest = b"", 0, False, 0
        for g in sorted(self._children(self._key, _GENERATION), reverse=True):
            objects = {off: key for off, key in self._children(self._gen_key(g), _OBJECT).items()}
            if 0 not in objects:
                continue
            chunks, end = [], 0
            while end in objects:
                chunk = self._fs.cat_file(objects[end])
                if not chunk:
                    sealed = True
                    break
                chunks.append(chunk)
                end += len(chunk)
            data, newest = b"".join(chunks), g
            break
        self._restored = (newest, end, sealed)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.restore.{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        logger.info("log restored from %s: generation %d, %d bytes%s", self.url, newest, len(data),
                    " (sealed)" if sealed else "")
        return data

    def start(self, data: bytes) -> None:
        """Open the next generation for this incarnation, holding ``data``."""
        with self._lock:
            if self.generation == 0:
                newest, end, sealed = self._restored
            else:
                newest, end, sealed = self.generation, self.shipped, False
            if newest and not sealed:
                self._create(self._obj_key(newest, end), b"")  # seal it: nobody appends there again
            g = newest + 1
            self._fs.makedirs(self._gen_key(g), exist_ok=True)  # a directory on file://; nothing on S3
            if data:  # an empty log: its first shipped record creates the generation
                self._create(self._obj_key(g, 0), data)
            self.generation, self.shipped = g, len(data)
            self._restored = (g, len(data), False)
        if newest:
            self._drop_all_but_the_seal(newest)

    def _drop_all_but_the_seal(self, g: int) -> None:
        """Delete a sealed generation's records but keep its seal: an old coordinator still
        appending there must keep failing (restore skips a generation without its ``o0``)."""
        objects = self._children(self._gen_key(g), _OBJECT)
        for offset, key in objects.items():
            if offset < max(objects):
                with contextlib.suppress(Exception):  # a leftover is never read
                    self._fs.rm_file(key)

    def replace(self, data: bytes) -> None:
        self.start(data)

    def ship(self, read: Callable[[int], bytes], end: int) -> None:
        """Upload the local log's bytes from the shipped offset up to ``end``."""
        with self._lock:
            if end <= self.shipped:
                return
            if self.generation == 0:
                raise RuntimeError("LogMirror.ship before start")
            chunk = read(self.shipped)[: end - self.shipped]
            self._create(self._obj_key(self.generation, self.shipped), chunk)
            self.shipped = end
