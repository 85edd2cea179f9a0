"""Checkpoint store for full weight sets: ``<root>/v<version>.safetensors`` + ``<root>/v<version>.json``.

The data file is standard safetensors (read back with the safetensors library: no pickle anywhere);
the JSON manifest lists every tensor's shape, dtype and xxh3 checksum plus the set digest and the data
file's size. Both files are written atomically (temp file in the same directory, fsync, ``os.replace``,
fsync of the directory), the manifest last: a version exists exactly when its manifest does and the
data file is present. Loads verify every checksum.

Conventionally ``root`` is ``<state_dir>/checkpoints`` (``CheckpointStore.in_state_dir``); multi-node
fleets point it at a shared filesystem.
"""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from pydantic import BaseModel, ConfigDict, ValidationError

from actors.direct_io import DirectIOUnsupported, open_direct, write_views
from actors.durable import fsync_dir
from actors.failpoints import Failpoints
from engines.checksum import ChecksumMismatch, bytes_checksum, set_digest, tensor_bytes, tensor_checksum
from engines.engine_file import RawTensor, raw_safetensors
from engines.manifest import ITEMSIZE, SAFETENSORS_CODE, dtype_name

if TYPE_CHECKING:
    import torch

__all__ = [
    "CheckpointCorrupted",
    "CheckpointManifest",
    "CheckpointMissing",
    "CheckpointStore",
    "TensorEntry",
    "validate_label",
]

CHECKPOINT_DIR = "checkpoints"
MANIFEST_FORMAT = "weight-refit/checkpoint/1"
_TMP_SUFFIX = ".tmp"
_VERSION_FILE = re.compile(r"^v(0|[1-9][0-9]*)\.(safetensors|json)$")



@cache
def _st_dtypes() -> dict[torch.dtype, str]:
    """torch dtype -> safetensors code (torch imported on first use: the coordinator reads
    manifests and deletes versions without it)."""
    import torch

    return {getattr(torch, name): code for name, code in SAFETENSORS_CODE.items()}

_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def validate_label(label: str, what: str = "label") -> str:
    """Return ``label`` if it is safe as a file or fleet name, else raise ValueError naming it.

    The one rule for fleet names (the config, every command and ``Fleet.connect`` use it):
    1-64 characters from ``[A-Za-z0-9._-]``, starting with a letter or digit, with no ``..``.
    Path separators, NUL and anything else are rejected.
    """
    rule = ("1-64 characters from letters, digits, '.', '_' and '-', starting with a letter or digit, "
            "without '..'")
    if not isinstance(label, str):
        raise ValueError(f"invalid {what} {label!r}: not a string")
    if "\0" in label or "/" in label or "\\" in label or (os.altsep and os.altsep in label):
        raise ValueError(f"invalid {what} {label!r}: contains a path separator or NUL ({rule})")
    if ".." in label:
        raise ValueError(f"invalid {what} {label!r}: contains '..' ({rule})")
    if not _LABEL.fullmatch(label):
        raise ValueError(f"invalid {what} {label!r}: {rule}")
    return label


class CheckpointMissing(Exception):
    """The requested version has no complete checkpoint (``version``, ``path`` of the missing file)."""

    def __init__(self, version: int, path: str) -> None:
        super().__init__(version, path)
        self.version = version
        self.path = path

    def __str__(self) -> str:
        return f"checkpoint v{self.version} is missing: {self.path} does not exist"


class CheckpointCorrupted(Exception):
    """A checkpoint's files are unreadable or disagree with its manifest (``version``, ``path``,
    ``detail``). Corrupted tensor bytes raise ``ChecksumMismatch`` instead."""

    def __init__(self, version: int, path: str, detail: str) -> None:
        super().__init__(version, path, detail)
        self.version = version
        self.path = path
        self.detail = detail

    def __str__(self) -> str:
        return f"checkpoint v{self.version} is corrupted ({self.path}): {self.detail}"


class TensorEntry(BaseModel):
    """One tensor of a manifest."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    shape: list[int]
    dtype: str  # torch dtype name without "torch.", e.g. "bfloat16"
    checksum: str


class CheckpointManifest(BaseModel):
    """``v<version>.json``: what ``v<version>.safetensors`` must contain."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: str = MANIFEST_FORMAT
    version: int
    digest: str
    file: str
    size: int
    created: float
    tensors: dict[str, TensorEntry]

    @property
    def checksums(self) -> dict[str, str]:
        return {name: e.checksum for name, e in self.tensors.items()}




def _name_the_file(exc: BaseException, path: Path) -> None:
    """An OS error of a write names the file it was writing (for the person reading the error)."""
    if isinstance(exc, OSError) and not exc.filename:
        exc.filename = str(path)


def _write_all(f: BinaryIO, data: memoryview | bytes) -> None:
    mv = memoryview(data).cast("B")
    while mv.nbytes:
        n = f.write(mv[: 1 << 30])
        if not n:
            raise OSError("write returned 0 bytes")
        mv = mv[n:]


def _check_size(version: int, where: str, what: str, size: int, m: CheckpointManifest) -> None:
    if size != m.size:
        raise CheckpointCorrupted(version, where,
                                  f"{what} is {size} bytes, manifest says {m.size} (truncated?)")


def _check_against(version: int, m: CheckpointManifest, found: Mapping[str, tuple[list[int], str]],
                   checksum: Callable[[str], str], where: str) -> None:
    """The tensors read from ``where`` (name -> shape and dtype name; ``checksum(name)`` hashes
    one) are the manifest's: the same names, shapes, dtypes and checksums."""
    if set(found) != set(m.tensors):
        missing = sorted(set(m.tensors) - set(found))
        extra = sorted(set(found) - set(m.tensors))
        raise CheckpointCorrupted(
            version, where, f"tensor names differ from manifest: missing {missing}, extra {extra}"
        )
    for name, entry in m.tensors.items():
        shape, dtype = found[name]
        if shape != entry.shape or dtype != entry.dtype:
            raise CheckpointCorrupted(
                version, where, f"tensor {name!r} is {dtype}{shape}, manifest says {entry.dtype}{entry.shape}"
            )
        got = checksum(name)
        if got != entry.checksum:
            raise ChecksumMismatch(name, entry.checksum, got, f"checkpoint v{version} ({where})")


def _raw_checked(version: int, m: CheckpointManifest, data: memoryview, where: str) -> dict[str, RawTensor]:
    """The tensors of a checkpoint's bytes, checked against its manifest (``load_raw``)."""
    try:
        tensors = raw_safetensors(data)
    except (KeyError, ValueError, TypeError, struct.error) as e:
        raise CheckpointCorrupted(version, where, f"unreadable safetensors: {e}") from None
    _check_against(version, m, {n: (list(t.shape), t.dtype) for n, t in tensors.items()},
                   lambda name: bytes_checksum(tensors[name].data), where)
    return {name: tensors[name] for name in m.tensors}


class CheckpointStore:
    """Full weight sets by version number, written atomically and verified on load.

    Contract:
    - ``save`` writes the data file, then the manifest, each atomically; a crash leaves either the
      previous state or a complete new version (plus, at worst, a temp file or a data file without
      manifest, neither of which counts as a version).
    - ``versions()``/``has()`` count only complete versions (manifest and data file present).
    - ``load`` never unpickles; it checks names/shapes/dtypes/size against the manifest
      (``CheckpointCorrupted``) and every tensor's checksum (``ChecksumMismatch``, naming it).
    - ``retain(keep)`` deletes every version not in ``keep``; never one in ``keep``.
    - Durable saves (``fsync=True``) write the data file with ``O_DIRECT`` where the filesystem
      allows it (``direct_io=True``, the default; see ``actors.direct_io``), else buffered.
    - Opening with ``cleanup=True`` (the writer: the coordinator) deletes stray temp files left by a
      crashed save. Readers (replicas) should pass ``cleanup=False`` so they never remove the temp
      file of a save in progress.
    - Creating the store's directory makes the directory entry durable too (fsync of its parent).
    - An ``OSError`` from any write (disk full, I/O or permission error) leaves no temp file and no
      new version behind; the previous versions are untouched. Failpoints ``store.write``,
      ``store.fsync`` and ``store.read`` stand in front of those OS calls (fault tests).
    """

    def __init__(self, root: Path | str, *, cleanup: bool = True, direct_io: bool = True,
                 fp: Failpoints | None = None) -> None:
        self._root = Path(root)
        self._direct_io = direct_io
        self._fp = fp or Failpoints()
        if not self._root.is_dir():
            self._root.mkdir(parents=True, exist_ok=True)
            fsync_dir(self._root.parent)
        if cleanup:
            self.clean_temp()

    @classmethod
    def in_state_dir(cls, state_dir: Path | str, *, cleanup: bool = True,
                     fp: Failpoints | None = None) -> CheckpointStore:
        """The store at ``<state_dir>/checkpoints``."""
        return cls(Path(state_dir) / CHECKPOINT_DIR, cleanup=cleanup, fp=fp)

    @property
    def root(self) -> Path:
        return self._root

    # -- paths -----------------------------------------------------------------------------------

    @staticmethod
    def _check_version(version: int) -> int:
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise ValueError(f"invalid checkpoint version {version!r}: must be an int >= 0")
        return version

    def data_path(self, version: int) -> Path:
        return self._root / f"v{self._check_version(version)}.safetensors"

    def manifest_path(self, version: int) -> Path:
        return self._root / f"v{self._check_version(version)}.json"

    # -- queries ---------------------------------------------------------------------------------

    def has(self, version: int) -> bool:
        """True when both files of ``version`` are present."""
        return self.manifest_path(version).is_file() and self.data_path(version).is_file()

    def versions(self) -> list[int]:
        """Complete versions (both files present), ascending."""
        found: dict[int, set[str]] = {}
        for p in self._root.iterdir():
            m = _VERSION_FILE.match(p.name)
            if m:
                found.setdefault(int(m.group(1)), set()).add(m.group(2))
        return sorted(v for v, kinds in found.items() if kinds == {"safetensors", "json"})

    def manifest(self, version: int) -> CheckpointManifest:
        """The parsed manifest (CheckpointMissing / CheckpointCorrupted)."""
        path = self.manifest_path(version)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise CheckpointMissing(version, str(path)) from None
        return self._parsed_manifest(version, raw, str(path))

    @staticmethod
    def _parsed_manifest(version: int, raw: bytes, where: str) -> CheckpointManifest:
        """``raw`` as the manifest of ``version`` read from ``where`` (CheckpointCorrupted)."""
        try:
            m = CheckpointManifest.model_validate_json(raw)
        except ValidationError as e:
            raise CheckpointCorrupted(version, where, f"bad manifest: {e.errors()[0]['msg']}") from None
        if m.format != MANIFEST_FORMAT or m.version != version:
            why = f"manifest is for {m.format} v{m.version}, expected v{version}"
            raise CheckpointCorrupted(version, where, why)
        return m

    # -- save ------------------------------------------------------------------------------------

    def save(
        self,
        version: int,
        tensors: Mapping[str, torch.Tensor],
        checksums: Mapping[str, str],
        *,
        fsync: bool = True,
        verify: bool = True,
    ) -> Path:
        """Persist a full weight set as ``version``; returns the data file's path.

        ``checksums`` must name exactly the tensors (ValueError otherwise). With ``verify`` (default)
        the tensors' bytes are checked against them first (ChecksumMismatch), so a manifest never
        vouches for bytes it does not describe. Overwrites an existing copy of the same version.
        """
        self._check_version(version)
        if set(tensors) != set(checksums):
            self._check_names(set(tensors), checksums)
        for name, t in tensors.items():
            if t.dtype not in _st_dtypes():
                raise ValueError(f"tensor {name!r}: dtype {t.dtype} cannot be stored in a checkpoint")
        raw = {name: RawTensor(tuple(t.shape), dtype_name(t.dtype), tensor_bytes(t))
               for name, t in tensors.items()}
        return self.save_raw(version, raw, checksums, fsync=fsync, verify=verify)

    @staticmethod
    def _check_names(names: set[str], checksums: Mapping[str, str]) -> None:
        if names != set(checksums):
            missing = sorted(names - set(checksums))
            extra = sorted(set(checksums) - names)
            raise ValueError(f"checksums do not match tensors: missing {missing}, extra {extra}")

    def save_raw(self, version: int, tensors: Mapping[str, RawTensor], checksums: Mapping[str, str], *,
                 fsync: bool = True, verify: bool = True) -> Path:
        """``save`` of tensors given as their bytes (``RawTensor``: e.g. copied from an engine
        file as they lie in it, without torch)."""
        self._check_version(version)
        self._check_names(set(tensors), checksums)
        for name, t in tensors.items():
            if t.dtype not in SAFETENSORS_CODE:
                raise ValueError(f"tensor {name!r}: dtype {t.dtype} cannot be stored in a checkpoint")
        entries: dict[str, TensorEntry] = {
            name: TensorEntry(shape=list(t.shape), dtype=t.dtype, checksum=checksums[name])
            for name, t in tensors.items()
        }
        header: dict[str, object] = {"__metadata__": {"format": MANIFEST_FORMAT, "version": str(version)}}
        # Largest item size first: with the header padded to 8 bytes every tensor is aligned.
        order = sorted(tensors, key=lambda n: (-ITEMSIZE[tensors[n].dtype], n))
        views: list[memoryview] = []
        offset = 0
        for name in order:
            t = tensors[name]
            data = t.data
            if verify:
                got = bytes_checksum(data)
                if got != checksums[name]:
                    raise ChecksumMismatch(name, checksums[name], got, f"save of checkpoint v{version}")
            views.append(data)
            header[name] = {
                "dtype": SAFETENSORS_CODE[t.dtype],
                "shape": list(t.shape),
                "data_offsets": [offset, offset + data.nbytes],
            }
            offset += data.nbytes
        hjson = json.dumps(header, separators=(",", ":")).encode()
        hjson += b" " * (-len(hjson) % 8)
        size = 8 + len(hjson) + offset

        head = struct.pack("<Q", len(hjson)) + hjson

        def write_data(f: BinaryIO) -> None:
            self._fp.hit("store.write", str(dpath))
            _write_all(f, head)
            for v in views:
                _write_all(f, v)

        manifest = CheckpointManifest(
            version=version,
            digest=set_digest(checksums),
            file=f"v{version}.safetensors",
            size=size,
            created=time.time(),
            tensors=entries,
        )
        dpath = self.data_path(version)
        mbytes = manifest.model_dump_json(indent=1).encode() + b"\n"
        self._write_version(version, [head, *views], write_data, mbytes, fsync)
        return dpath

    def _write_version(self, version: int, views: list[memoryview | bytes],
                       write_data: Callable[[BinaryIO], None], mbytes: bytes, fsync: bool) -> None:
        """The data file, then the manifest, each atomically."""
        mpath, dpath = self.manifest_path(version), self.data_path(version)
        if mpath.exists():  # re-save: the version stops counting until its new manifest lands
            mpath.unlink()
            if fsync:
                fsync_dir(self._root)
        if not (fsync and self._direct_io and self._direct_write(dpath, views)):
            self._atomic_write(dpath, write_data, fsync)
        self._atomic_write(mpath, lambda f: _write_all(f, mbytes), fsync)

    def _temp_path(self, path: Path) -> Path:
        return path.with_name(
            f".{path.name}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}{_TMP_SUFFIX}"
        )

    def _direct_write(self, path: Path, views: list[memoryview | bytes]) -> bool:
        """Atomic durable write through O_DIRECT; False (nothing left behind) where unsupported."""
        tmp = self._temp_path(path)
        fd = open_direct(tmp)
        if fd is None:
            return False
        try:
            try:
                self._fp.hit("store.write", str(path))
                write_views(fd, views)
                self._fp.hit("store.fsync", str(path))
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except DirectIOUnsupported:
            tmp.unlink(missing_ok=True)
            return False
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            _name_the_file(exc, path)
            raise
        fsync_dir(self._root)
        return True

    def _atomic_write(self, path: Path, write: Callable[[BinaryIO], None], fsync: bool) -> None:
        tmp = self._temp_path(path)
        try:
            with open(tmp, "xb", buffering=0) as f:
                write(f)  # type: ignore[arg-type]
                if fsync:
                    self._fp.hit("store.fsync", str(path))
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            _name_the_file(exc, path)
            raise
        if fsync:
            fsync_dir(self._root)

    # -- load ------------------------------------------------------------------------------------

    def load(self, version: int, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Read ``version`` (on CPU), verify it against its manifest, then move it to ``device``."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        m = self.manifest(version)
        dpath = self.data_path(version)
        self._fp.hit("store.read", str(dpath))
        try:
            size = dpath.stat().st_size
        except FileNotFoundError:
            raise CheckpointMissing(version, str(dpath)) from None
        _check_size(version, str(dpath), "file", size, m)
        try:
            tensors = load_file(dpath, device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointCorrupted(version, str(dpath), f"unreadable safetensors: {e}") from None
        return self._checked(version, m, tensors, str(dpath), device)

    def _checked(self, version: int, m: CheckpointManifest, tensors: dict[str, torch.Tensor], dpath: str,
                 device: str | torch.device) -> dict[str, torch.Tensor]:
        """``tensors`` read from ``dpath``, checked against the manifest and every checksum."""
        _check_against(version, m, {n: (list(t.shape), dtype_name(t.dtype)) for n, t in tensors.items()},
                       lambda name: tensor_checksum(tensors[name]), dpath)
        import torch

        dev = torch.device(device)
        return {name: tensors[name].to(dev) for name in m.tensors}

    def load_raw(self, version: int) -> dict[str, RawTensor]:
        """``load`` without torch: every tensor of ``version`` as its bytes where they lie in the
        (read-only, mapped) file, checked as ``load`` checks them."""
        import mmap

        m = self.manifest(version)
        dpath = self.data_path(version)
        self._fp.hit("store.read", str(dpath))
        try:
            with open(dpath, "rb") as fh:
                _check_size(version, str(dpath), "file", os.fstat(fh.fileno()).st_size, m)
                mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if m.size else b""
        except FileNotFoundError:
            raise CheckpointMissing(version, str(dpath)) from None
        return _raw_checked(version, m, memoryview(mapped), str(dpath))

    # -- retention and cleanup -------------------------------------------------------------------

    def retain(self, keep: Iterable[int], *, below: int | None = None) -> list[int]:
        """Delete the files of every version not in ``keep`` (complete or not) and, if ``below`` is
        given, lower than it; returns those versions. The manifest goes first, so a half-deleted
        version is never a version."""
        keep = {self._check_version(v) for v in keep}
        doomed: set[int] = set()
        for p in self._root.iterdir():
            m = _VERSION_FILE.match(p.name)
            if m and int(m.group(1)) not in keep and (below is None or int(m.group(1)) < below):
                doomed.add(int(m.group(1)))
        for v in sorted(doomed):
            self.manifest_path(v).unlink(missing_ok=True)
            self.data_path(v).unlink(missing_ok=True)
        if doomed:
            fsync_dir(self._root)
        return sorted(doomed)

    def clean_temp(self) -> list[Path]:
        """Delete temp files left by interrupted saves; returns them."""
        removed = []
        for p in self._root.iterdir():
            if p.name.startswith(".") and p.name.endswith(_TMP_SUFFIX) and p.is_file():
                p.unlink(missing_ok=True)
                removed.append(p)
        return removed
