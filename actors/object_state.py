"""A fleet's state on object storage: ``state_dir`` as a URL (``s3://bucket/prefix``, ``gs://``,
``file://``), through ``fsspec``.

Contract:
- ``is_url(state_dir)``: a URL (``scheme://``) goes through fsspec; anything else is a local path
  (flock, fsync, rename: ``actors.store``, ``actors.log``), as before.
- ``ObjectCheckpointStore`` keeps the same files as the filesystem store (``v<N>.safetensors`` then
  ``v<N>.json``, the same manifest, the same checks on load). Each object is written whole (an
  S3 PUT, or a multipart upload, appears only once complete), the data before the manifest, so no
  reader ever sees a version without both complete; a failed write removes what it wrote. Loads
  read the whole object into memory and verify every checksum. Listings are never cached.
- ``checkpoint_store(state_dir, options)`` opens the store of either kind.
- ``local_dir(fleet, state_dir)``: where a coordinator keeps its working copy of the log for a
  URL state (on its own node; the URL holds the copy that counts: ``actors.log_mirror``).
- ``kept``/``local_copy``: a small file the coordinator must find again after a restart on another
  node (a canary's probes) goes to the URL, and comes back into a local cache when needed.
- ``storage_options`` are fsspec's (for S3 through s3fs: ``key``, ``secret``,
  ``client_kwargs={"endpoint_url": ...}``); credentials may as well come from the environment.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from engines.engine_file import RawTensor

from .failpoints import Failpoints
from .store import (
    CHECKPOINT_DIR,
    CheckpointCorrupted,
    CheckpointManifest,
    CheckpointMissing,
    CheckpointStore,
    _check_size,
    _raw_checked,
    _write_all,
)

if TYPE_CHECKING:
    import torch

__all__ = ["ObjectCheckpointStore", "checkpoint_store", "drop_kept", "is_url", "kept", "local_copy",
           "local_dir", "open_url"]

logger = logging.getLogger("weight_refit.state")

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_VERSION_OBJECT = re.compile(r"^v(0|[1-9][0-9]*)\.(safetensors|json)$")


def is_url(state_dir: str | Path) -> bool:
    return isinstance(state_dir, str) and bool(_URL.match(state_dir))


def open_url(url: str, options: Mapping[str, Any] | None = None) -> tuple[Any, str]:
    """``(filesystem, path)`` of ``url`` (fsspec), with ``options`` as its storage options."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url, **dict(options or {}))
    except (ImportError, ValueError) as exc:  # an unknown scheme, or its package is missing
        raise ValueError(f"state_dir {url!r}: {exc}") from None


def local_dir(fleet: str, state_dir: str, node: str = "") -> Path:
    """The coordinator's working directory for the log of a URL state: one per fleet, URL and
    Ray node (created). Nothing in it outlives what object storage holds."""
    tag = hashlib.sha256(state_dir.encode()).hexdigest()[:12]
    path = Path(tempfile.gettempdir()) / "weight-refit" / f"{fleet}-{tag}" / (node[:16] or "local")
    path.mkdir(parents=True, exist_ok=True)
    return path


def kept(path: Path, url_dir: str | None, options: Mapping[str, Any] | None = None) -> str:
    """Where a coordinator restarted on any node finds the file ``path``: a copy uploaded into
    ``url_dir`` (a URL state), or ``path`` itself (a filesystem state)."""
    if url_dir is None:
        return str(path)
    fs, key = open_url(f"{url_dir}/{path.name}", options)
    fs.put_file(str(path), key)
    return f"{url_dir}/{path.name}"


def drop_kept(directory: Path, url_dir: str | None, pattern: str,
              options: Mapping[str, Any] | None = None) -> list[str]:
    """Delete the files ``kept`` left in ``directory`` whose names match ``pattern`` (a glob), and
    their copies in ``url_dir`` (a URL state); the names deleted. Best effort: what cannot be
    deleted now is tried again next time."""
    dropped = set()
    for path in directory.glob(pattern) if directory.is_dir() else []:
        try:
            path.unlink()
            dropped.add(path.name)
        except OSError as exc:
            logger.info("could not delete %s: %s", path, exc)
    if url_dir is not None:
        try:
            fs, key = open_url(url_dir, options)
            for found in fs.glob(f"{key.rstrip('/')}/{pattern}"):
                fs.rm_file(found)
                dropped.add(found.rsplit("/", 1)[-1])
        except Exception as exc:  # noqa: BLE001  (any store error: the files wait for the next time)
            logger.info("could not delete %s/%s: %s: %s", url_dir, pattern, type(exc).__name__, exc)
    return sorted(dropped)


def local_copy(where: str, cache: Path, options: Mapping[str, Any] | None = None) -> Path:
    """A local path of what ``kept`` returned: downloaded into ``cache`` once if it is a URL."""
    if not is_url(where):
        return Path(where)
    local = cache / where.rsplit("/", 1)[-1]
    if not local.exists():  # restarted on another node
        cache.mkdir(parents=True, exist_ok=True)
        fs, key = open_url(where, options)
        fs.get_file(key, str(local))
    return local


def checkpoint_store(state_dir: str | Path, options: Mapping[str, Any] | None = None, *,
                     cleanup: bool = True, fp: Failpoints | None = None) -> CheckpointStore:
    """The checkpoint store of ``state_dir``: ``<state_dir>/checkpoints`` on a filesystem or a URL."""
    if is_url(state_dir):
        return ObjectCheckpointStore(f"{str(state_dir).rstrip('/')}/{CHECKPOINT_DIR}", options, fp=fp)
    return CheckpointStore.in_state_dir(state_dir, cleanup=cleanup, fp=fp)


class ObjectCheckpointStore(CheckpointStore):
    """``CheckpointStore`` on object storage; see the module docstring."""

    def __init__(self, url: str, options: Mapping[str, Any] | None = None, *,
                 fp: Failpoints | None = None) -> None:
        self._url = url.rstrip("/")
        self._fs, self._key = open_url(self._url, options)
        self._fp = fp or Failpoints()
        self._direct_io = False
        self._fs.makedirs(self._key, exist_ok=True)

    @property
    def root(self) -> str:  # type: ignore[override]
        return self._url

    def _object(self, version: int, kind: str) -> str:
        return f"{self._key}/v{self._check_version(version)}.{kind}"

    def data_path(self, version: int) -> str:  # type: ignore[override]
        return self._object(version, "safetensors")

    def manifest_path(self, version: int) -> str:  # type: ignore[override]
        return self._object(version, "json")

    def _names(self) -> list[str]:
        self._fs.invalidate_cache(self._key)
        try:
            return [str(p).rstrip("/").rsplit("/", 1)[-1] for p in self._fs.ls(self._key, detail=False)]
        except FileNotFoundError:
            return []

    # -- queries

    def has(self, version: int) -> bool:
        names = set(self._names())
        return {f"v{version}.json", f"v{version}.safetensors"} <= names

    def versions(self) -> list[int]:
        found: dict[int, set[str]] = {}
        for name in self._names():
            if m := _VERSION_OBJECT.match(name):
                found.setdefault(int(m.group(1)), set()).add(m.group(2))
        return sorted(v for v, kinds in found.items() if kinds == {"safetensors", "json"})

    def manifest(self, version: int) -> CheckpointManifest:
        key = self.manifest_path(version)
        try:
            raw = self._fs.cat_file(key)
        except FileNotFoundError:
            raise CheckpointMissing(version, self._where(key)) from None
        return self._parsed_manifest(version, raw, self._where(key))

    def _where(self, key: str) -> str:
        return f"{self._url}/{key.rsplit('/', 1)[-1]}"

    # -- save

    def _write_version(self, version: int, views: list[memoryview | bytes],
                       write_data: Callable[[BinaryIO], None], mbytes: bytes, fsync: bool) -> None:
        mkey, dkey = self.manifest_path(version), self.data_path(version)
        if self._fs.exists(mkey):  # re-save: the version stops counting until its new manifest lands
            self._fs.rm_file(mkey)
        try:
            self._fp.hit("store.write", self._where(dkey))
            with self._fs.open(dkey, "wb") as f:
                for view in views:
                    _write_all(f, view)
            with self._fs.open(mkey, "wb") as f:
                _write_all(f, mbytes)
        except BaseException as exc:
            for key in (mkey, dkey):
                with contextlib.suppress(FileNotFoundError, OSError):
                    self._fs.rm_file(key)
            if isinstance(exc, OSError) and not exc.filename:
                exc.filename = self._where(dkey)
            raise

    # -- load

    def _fetched(self, version: int) -> tuple[CheckpointManifest, bytes, str]:
        """``version``'s manifest, its data object's bytes (their size checked) and where they are."""
        m = self.manifest(version)
        dkey = self.data_path(version)
        where = self._where(dkey)
        self._fp.hit("store.read", where)
        try:
            data = self._fs.cat_file(dkey)
        except FileNotFoundError:
            raise CheckpointMissing(version, where) from None
        _check_size(version, where, "object", len(data), m)
        return m, data, where

    def load_raw(self, version: int) -> dict[str, RawTensor]:
        m, data, where = self._fetched(version)
        return _raw_checked(version, m, memoryview(data), where)

    def load(self, version: int, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        from safetensors import SafetensorError
        from safetensors.torch import load

        m, data, where = self._fetched(version)
        try:
            tensors = load(data)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointCorrupted(version, where, f"unreadable safetensors: {e}") from None
        return self._checked(version, m, tensors, where, device)

    # -- retention

    def retain(self, keep: Iterable[int], *, below: int | None = None) -> list[int]:
        keep = {self._check_version(v) for v in keep}
        doomed = sorted({int(m.group(1)) for name in self._names() if (m := _VERSION_OBJECT.match(name))
                         and int(m.group(1)) not in keep and (below is None or int(m.group(1)) < below)})
        for v in doomed:  # the manifest first: a half-deleted version is never a version
            for key in (self.manifest_path(v), self.data_path(v)):
                with contextlib.suppress(FileNotFoundError):
                    self._fs.rm_file(key)
        return doomed

    def clean_temp(self) -> list[Path]:
        return []  # objects are written whole: there are no temp files
