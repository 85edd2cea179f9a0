"""Turning what callers hand us into named plain tensors, without ever executing a pickle.

Accepted: a mapping of name (a ``str``) -> numpy array or torch tensor (bf16 included), or a path to
a regular ``.safetensors``, ``.pt``/``.pth``/``.bin`` (a plain state dict, read with torch's
weights-only unpickler, which refuses any other object) or ``.npz`` (no pickled members) file.
Names can be mapped for files saved from a model wrapped in another module (``strip_prefix``/
``add_prefix``/an explicit ``mapping``).

What comes out is always a plain dense tensor holding the values it was given: non-contiguous views
are fine; tensors with the lazy neg/conj bit are resolved; big-endian numpy arrays are converted to
native byte order (same values). Refused with a ``WeightFileError`` naming the weight, before
anything is staged: meta, sparse, nested and quantized tensors, masked or non-numeric numpy arrays.
A path that is not a regular file (directory, FIFO, device, symlink loop) is refused from
``os.stat`` without being opened.

``expect`` (a manifest) makes a file reader check every weight's mapped name, shape and dtype from
the file's own header before reading any data, so a file naming an unknown weight, or holding a
wrong-shaped one, costs milliseconds and no memory whatever its size:

- ``.safetensors``: the header (names, dtypes, shapes) is read lazily; only checked tensors are read.
- ``.npz``: each member's ``.npy`` header is read from the zip stream; a member whose uncompressed
  size differs from what its header's shape and dtype take is refused, so with ``expect`` no more
  than the manifest's bytes are ever decompressed (no decompression bombs).
- ``.pt`` in torch's zip format: first loaded memory-mapped, so only the pickled structure is
  read before the check, then read in full (or, where the checked tensors are views into larger
  storages, just those views are copied out of the mapping). A legacy (non-zip) ``.pt`` file is
  unpickled in full before the check: its memory is bounded by the file's size only.

Without ``expect`` files are read in full and checked later by the caller (``check_weights``).
"""

from __future__ import annotations

import math
import os
import pickle
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from .errors import EngineError, WeightFileError
from .manifest import TensorSpec
from .paths import check_regular_file, open_regular
from .validation import check_known, check_spec, spec_dtype

WeightsLike = Union[Mapping[str, Any], str, os.PathLike]  # noqa: UP007 (a runtime alias)
Expect = Mapping[str, TensorSpec]

_WHAT = "weights file"

# safetensors' dtype names -> the manifest's
_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
_NP_DTYPES = {np.dtype(n): n for n in ("float64", "float32", "float16", "int64", "int32", "int16",
                                       "int8", "uint8", "bool")}


def _refuse(name: str, message: str) -> WeightFileError:
    return WeightFileError(f"weight {name!r}: {message}", name=name)


def plain_tensor(name: str, t: torch.Tensor) -> torch.Tensor:
    """``t`` detached, as a dense tensor whose memory holds its values; else WeightFileError."""
    t = t.detach()
    if t.is_nested:
        raise _refuse(name, "a nested tensor is not a weight")
    if t.layout is not torch.strided:
        raise _refuse(name, f"a tensor with layout {t.layout} is not a weight; pass it dense (.to_dense())")
    if t.device.type == "meta":
        raise _refuse(name, "a meta tensor has no data")
    if t.is_quantized:
        raise _refuse(name, f"a quantized tensor ({t.dtype}) is not a weight; pass it dequantized")
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()  # its memory holds the negated values until resolved
    return t


def as_tensor(name: str, value: Any) -> torch.Tensor:
    """A plain tensor holding ``value`` (see the module docstring), sharing memory where it can."""
    if isinstance(value, torch.Tensor):
        return plain_tensor(name, value)
    if isinstance(value, np.generic):
        value = np.asarray(value)
    if isinstance(value, np.ndarray):
        if isinstance(value, np.ma.MaskedArray):
            raise _refuse(name, "a masked array is not a weight (its mask would be dropped)")
        dt = value.dtype
        if dt.hasobject:
            raise _refuse(name, "numpy object arrays are not weights")
        if dt.kind not in "biufc" or dt.fields is not None:
            raise _refuse(name, f"numpy dtype {dt} is not a weight dtype")
        if not dt.isnative:
            value = value.astype(dt.newbyteorder("="))
        elif not value.flags.writeable:
            value = value.copy()
        try:
            return torch.from_numpy(np.ascontiguousarray(value))
        except TypeError:
            raise _refuse(name, f"numpy dtype {dt} has no torch equivalent") from None
    raise _refuse(name, f"expected a numpy array or torch tensor, got {type(value).__name__}")


def map_name(name: str, *, strip_prefix: str | None = None, add_prefix: str | None = None,
             mapping: Mapping[str, str] | None = None) -> str:
    """One name mapped: an explicit ``mapping`` first, then strip one prefix, then add one."""
    new = mapping.get(name, name) if mapping else name
    if strip_prefix and new.startswith(strip_prefix):
        new = new[len(strip_prefix):]
    if add_prefix:
        new = add_prefix + new
    return new


def rename(
    tensors: Mapping[str, torch.Tensor],
    *,
    strip_prefix: str | None = None,
    add_prefix: str | None = None,
    mapping: Mapping[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """Map every name (see ``map_name``); WeightFileError where two names map to one."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        new = map_name(name, strip_prefix=strip_prefix, add_prefix=add_prefix, mapping=mapping)
        if new in out:
            raise _refuse(new, "two inputs map to this name")
        out[new] = t
    return out


def check_header(entries: list[tuple[str, tuple[int, ...], str]], expect: Expect | None) -> None:
    """Check ``(mapped name, shape, dtype name)`` triples read from a header: no name twice, and
    with ``expect`` every name known (all names first, as ``check_weights`` does), shape and dtype
    as expected."""
    seen: set[str] = set()
    for name, _, _ in entries:
        if name in seen:
            raise _refuse(name, "two inputs map to this name")
        seen.add(name)
    if expect is None:
        return
    for name, _, _ in entries:
        check_known(name, expect)
    for name, shape, dtype in entries:
        check_spec(name, shape, dtype, expect)


NameFn = Callable[[str], str]


def name_fn(strip_prefix: str | None = None, add_prefix: str | None = None,
            mapping: Mapping[str, str] | None = None) -> NameFn:
    def names(key: str) -> str:
        return map_name(key, strip_prefix=strip_prefix, add_prefix=add_prefix, mapping=mapping)

    return names


def read_weights_file(path: str | os.PathLike, *, expect: Expect | None = None,
                      strip_prefix: str | None = None, add_prefix: str | None = None,
                      mapping: Mapping[str, str] | None = None,
                      names: NameFn | None = None) -> dict[str, torch.Tensor]:
    """Read a weights file, or a checkpoint directory (``engines.checkpoint_dir``), into CPU
    tensors under their mapped names. Never executes code from the file; with ``expect``, checks
    names, shapes and dtypes from the headers before any data."""
    p = Path(path)
    names = names or name_fn(strip_prefix, add_prefix, mapping)
    if p.is_dir():
        from .checkpoint_dir import CheckpointDir

        checkpoint = CheckpointDir(p, names)
        check_header(checkpoint.entries, expect)
        return checkpoint.read_all(expect)
    check_regular_file(p, _WHAT, WeightFileError)
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        return _read_safetensors(p, names, expect)
    if suffix in (".pt", ".pth", ".bin"):
        return _read_torch(p, names, expect)
    if suffix == ".npz":
        return _read_npz(p, names, expect)
    raise WeightFileError(f"weights file {str(p)!r}: unknown format {suffix!r} (.safetensors, .pt, .npz)")


def file_entries(path: Path) -> list[tuple[str, tuple[int, ...], str]]:
    """``(name as saved, shape, dtype)`` of every tensor in a ``.safetensors`` or ``.bin``/``.pt``
    file, from its header (a zip ``.pt`` memory-mapped: only its pickled structure is read)."""
    check_regular_file(path, _WHAT, WeightFileError)
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as fh:
                out = []
                for key in fh.keys():  # noqa: SIM118  (a safe_open handle, not a dict)
                    piece = fh.get_slice(key)
                    dtype = piece.get_dtype()
                    out.append((key, tuple(piece.get_shape()), _ST_DTYPES.get(dtype, dtype)))
                return out
        except Exception as exc:
            raise WeightFileError(f"weights file {str(path)!r} is not a valid .safetensors file: "
                                  f"{exc}") from exc
    with open_regular(path, _WHAT, WeightFileError) as fh:
        zipped = fh.read(4) == b"PK\x03\x04"
    obj = _torch_load(path, str(path), mmap=zipped)
    return _torch_entries(path, obj, lambda k: k)


def fill_tied(tensors: dict[str, torch.Tensor], tied: list[list[str]]) -> dict[str, torch.Tensor]:
    """Weights the model ties (one tensor under several names, e.g. GPT-2's ``lm_head.weight`` and
    ``wte.weight``): a name given alone stands for its whole group (checkpoints save one of them);
    names of one group given together must hold equal values, else WeightFileError naming them."""
    for group in tied:
        given = [n for n in group if n in tensors]
        if not given:
            continue
        first = tensors[given[0]]
        for other in given[1:]:
            t = tensors[other]
            same_memory = t.data_ptr() == first.data_ptr() and t.stride() == first.stride()
            if not same_memory and not torch.equal(t, first):
                raise _refuse(other, f"the model ties it to {given[0]!r}, but they hold different values")
        for name in group:
            tensors.setdefault(name, first)
    return tensors


def _read_safetensors(p: Path, names: NameFn, expect: Expect | None) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="pt", device="cpu") as fh:
            keys = list(fh.keys())
            entries = []
            for key in keys:
                piece = fh.get_slice(key)
                dtype = piece.get_dtype()
                entries.append((names(key), tuple(piece.get_shape()), _ST_DTYPES.get(dtype, dtype)))
            check_header(entries, expect)
            return {new: fh.get_tensor(key) for key, (new, _, _) in zip(keys, entries, strict=True)}
    except EngineError:
        raise
    except Exception as exc:  # safetensors raises its own SafetensorError and others
        raise WeightFileError(f"weights file {str(p)!r} is not a valid .safetensors file: {exc}") from exc


def _torch_load(p: Path, source: Any, *, mmap: bool = False) -> Any:
    try:
        return torch.load(source, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        raise WeightFileError(
            f"weights file {str(p)!r} refused: it carries pickled objects other than tensors "
            f"(nothing was executed): {str(exc).splitlines()[0]}"
        ) from exc
    except Exception as exc:
        raise WeightFileError(f"weights file {str(p)!r} is not a readable .pt file: {exc}") from exc


def _torch_entries(p: Path, obj: Any, names: NameFn) -> list[tuple[str, tuple[int, ...], str]]:
    if not isinstance(obj, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise WeightFileError(f"weights file {str(p)!r} must hold a flat name -> tensor dict")
    return [(names(k), tuple(v.shape), spec_dtype(v.dtype)) for k, v in obj.items()]


def _read_torch(p: Path, names: NameFn, expect: Expect | None) -> dict[str, torch.Tensor]:
    with open_regular(p, _WHAT, WeightFileError) as fh:
        zipped = fh.read(4) == b"PK\x03\x04"
        fh.seek(0)
        if zipped and expect is not None:
            # memory-mapped, only the pickled structure is read: check it before any tensor data
            mapped = _torch_load(p, str(p), mmap=True)
            entries = _torch_entries(p, mapped, names)
            check_header(entries, expect)
            plain = {new: plain_tensor(new, t)
                     for (new, _, _), t in zip(entries, mapped.values(), strict=True)}
            storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in plain.values()}
            if sum(storages.values()) > sum(t.numel() * t.element_size() for t in plain.values()):
                # views into larger storages: copy out just the checked views, not the storages
                return {new: t.clone(memory_format=torch.contiguous_format) for new, t in plain.items()}
            del mapped, plain
        obj = _torch_load(p, fh)
    entries = _torch_entries(p, obj, names)
    check_header(entries, expect)  # again: the file may have changed since the mapped read
    return {new: plain_tensor(new, t) for (new, _, _), t in zip(entries, obj.values(), strict=True)}


def _npy_header(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and header length of one ``.npy`` member, reading only its header bytes."""
    fmt = np.lib.format
    with zf.open(info) as stream:
        version = fmt.read_magic(stream)
        if version == (1, 0):
            shape, _, dtype = fmt.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, _, dtype = fmt.read_array_header_2_0(stream)
        else:
            raise ValueError(f".npy format version {version} is not supported")
        return tuple(int(d) for d in shape), dtype, stream.tell()


def _read_npz(p: Path, names: NameFn, expect: Expect | None) -> dict[str, torch.Tensor]:
    where = f"weights file {str(p)!r}"
    with open_regular(p, _WHAT, WeightFileError) as fh:
        try:
            with zipfile.ZipFile(fh) as zf:
                members = []
                for info in zf.infolist():
                    if not info.filename.endswith(".npy"):
                        raise WeightFileError(
                            f"{where} refused: member {info.filename!r} is not a .npy array")
                    key = info.filename[:-4]
                    new = names(key)
                    shape, dtype, header_len = _npy_header(zf, info)
                    if dtype.hasobject:
                        raise _refuse(new, f"{where}: object (pickled) arrays are not weights")
                    if dtype.kind not in "biufc" or dtype.fields is not None:
                        raise _refuse(new, f"{where}: numpy dtype {dtype} is not a weight dtype")
                    want = header_len + math.prod(shape) * dtype.itemsize
                    if info.file_size != want:
                        state = "more" if info.file_size > want else "fewer"
                        raise _refuse(new, f"{where}: member holds {info.file_size} bytes, {state} than "
                                           f"the {want} its header's shape {shape} and dtype {dtype} take")
                    native = dtype.newbyteorder("=")
                    members.append((info, new, shape, _NP_DTYPES.get(native, str(dtype))))
                check_header([(new, shape, dt) for _, new, shape, dt in members], expect)
                out = {}
                for info, new, _, _ in members:
                    with zf.open(info) as stream:
                        out[new] = as_tensor(new, np.lib.format.read_array(stream, allow_pickle=False))
                return out
        except EngineError:
            raise
        except Exception as exc:  # zipfile, zlib and numpy's format errors
            raise WeightFileError(f"{where} is not a readable .npz file: {exc}") from exc


def load_weights(
    weights: WeightsLike,
    *,
    strip_prefix: str | None = None,
    add_prefix: str | None = None,
    mapping: Mapping[str, str] | None = None,
    expect: Expect | None = None,
) -> dict[str, torch.Tensor]:
    """Named plain tensors from a mapping or a weights file path, names mapped.

    With ``expect``, every returned tensor's mapped name, shape and dtype fit it (for files:
    checked from the header before the data is read), else the error naming the weight.
    """
    if isinstance(weights, (str, os.PathLike)):
        return read_weights_file(weights, expect=expect, strip_prefix=strip_prefix,
                                 add_prefix=add_prefix, mapping=mapping)
    if not isinstance(weights, Mapping):
        raise WeightFileError(
            f"weights must be a name -> array mapping or a file path, got {type(weights).__name__}"
        )
    tensors: dict[str, torch.Tensor] = {}
    for k, v in weights.items():
        if not isinstance(k, str):
            raise WeightFileError(f"weight names must be strings, got {type(k).__name__} {k!r}")
        tensors[k] = as_tensor(k, v)
    if strip_prefix or add_prefix or mapping:
        tensors = rename(tensors, strip_prefix=strip_prefix, add_prefix=add_prefix, mapping=mapping)
    if expect is not None:
        check_header([(n, tuple(t.shape), spec_dtype(t.dtype)) for n, t in tensors.items()], expect)
    return tensors
