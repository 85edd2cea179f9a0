"""Checks of named weights against a manifest, done in full before anything is copied (I4).

``check_spec`` checks a name, shape and dtype alone, so a file reader can refuse a weight from
its header before reading its data; ``check_weight`` adds the value check (non-finite policy).
``checksums_and_non_finite`` checksums a set and finds its non-finite weights, each large tensor
hashed and scanned in one pass on a helper thread (xxhash and torch release the GIL).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
import xxhash

from .checksum import tensor_bytes, tensor_checksum
from .config import NonFinitePolicy
from .errors import (
    DtypeMismatchError,
    NonFiniteWeightError,
    ShapeMismatchError,
    UnknownWeightError,
)
from .manifest import TensorSpec, dtype_name
from .threads import helpers


def check_known(name: str, manifest: Mapping[str, TensorSpec]) -> TensorSpec:
    """The manifest's spec of ``name``, or ``UnknownWeightError`` (with a hint at name mapping)."""
    spec = manifest.get(name)
    if spec is None:
        close = [n for n in manifest if n.endswith(name) or name.endswith(n)]
        hint = f"; did you mean {close[0]!r} (see name mapping)?" if close else ""
        raise UnknownWeightError(name, f"not a refittable weight of this engine{hint}")
    return spec


def check_spec(name: str, shape: tuple[int, ...], dtype: str, manifest: Mapping[str, TensorSpec]) -> None:
    """Raise the error that names ``name`` if its name, ``shape`` or ``dtype`` (a manifest dtype
    name; any other string for a dtype the manifest cannot hold) does not fit the manifest."""
    spec = check_known(name, manifest)
    if tuple(shape) != spec.shape:
        raise ShapeMismatchError(name, f"shape {tuple(shape)} != expected {spec.shape}")
    if dtype != spec.dtype:
        raise DtypeMismatchError(name, f"dtype {dtype} != expected {spec.dtype} (no implicit casts)")


def spec_dtype(dtype: torch.dtype) -> str:
    """The manifest name of ``dtype``, or its torch spelling when the manifest cannot hold it."""
    return dtype_name(dtype) if dtype in _KNOWN else str(dtype)


def check_weight(name: str, tensor: torch.Tensor, manifest: Mapping[str, TensorSpec],
                 non_finite: NonFinitePolicy) -> None:
    """Raise the error that names ``name`` if it does not fit the manifest; else return."""
    check_spec(name, tuple(tensor.shape), spec_dtype(tensor.dtype), manifest)
    if non_finite is NonFinitePolicy.REJECT and tensor.is_floating_point() and not all_finite(tensor):
        raise non_finite_error(name, tensor)


def non_finite_error(name: str, tensor: torch.Tensor) -> NonFiniteWeightError:
    """The error refusing ``name`` for its non-finite values, with their count."""
    count = int((~torch.isfinite(tensor)).sum())
    return NonFiniteWeightError(name, f"{count} non-finite value(s) (NaN/Inf) refused by policy")


def all_finite(tensor: torch.Tensor) -> bool:
    """True when no element is NaN or +-Inf. One vectorised pass, no temporary the size of the
    tensor: a NaN or an infinity makes any sum non-finite, so a finite sum proves every element
    finite; only a sum that overflowed (or a dtype whose sum overflows easily) takes a second,
    exact pass (min and max propagate NaN and expose infinities)."""
    if tensor.numel() == 0:
        return True
    flat = tensor.detach().reshape(-1)
    if flat.dtype in _SUM_PROVES_FINITE and math.isfinite(torch.sum(flat).item()):
        return True
    lo, hi = torch.aminmax(flat)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


_SUM_PROVES_FINITE = {torch.float32, torch.float64, torch.bfloat16}  # float16 sums overflow at 65504


_KNOWN = {torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
          torch.int16, torch.int8, torch.uint8, torch.bool}


_BATCHED_NUMEL = 1 << 16  # CPU tensors up to this size are checked for non-finite values together
_CHUNK_NUMEL = 1 << 20  # elements per joined check (bounds its temporary)


def non_finite_names(weights: Mapping[str, torch.Tensor]) -> list[str]:
    """The floating-point weights holding a NaN or an infinity, in ``weights``' order.

    Large tensors get one ``all_finite`` pass each; small CPU tensors are joined per dtype into
    chunks checked with one call each, since a per-tensor call costs more than its few elements
    (models of hundreds of small tensors). Only a chunk that fails is looked into tensor by tensor.
    """
    bad: set[str] = set()
    small: dict[torch.dtype, list[tuple[str, torch.Tensor]]] = {}
    for name, t in weights.items():
        if not t.is_floating_point() or t.numel() == 0:
            continue
        if t.numel() <= _BATCHED_NUMEL and t.device.type == "cpu":
            small.setdefault(t.dtype, []).append((name, t))
        elif not all_finite(t):
            bad.add(name)
    for group in small.values():
        chunk: list[tuple[str, torch.Tensor]] = []
        size = 0
        for i, (name, t) in enumerate(group):
            chunk.append((name, t))
            size += t.numel()
            if size >= _CHUNK_NUMEL or i == len(group) - 1:
                joined = torch.cat([c.detach().reshape(-1) for _, c in chunk])
                if not bool(torch.isfinite(joined).all()):
                    bad.update(n for n, c in chunk if not all_finite(c))
                chunk, size = [], 0
    return [n for n in weights if n in bad]


def check_weights(weights: Mapping[str, torch.Tensor], manifest: Mapping[str, TensorSpec],
                  non_finite: NonFinitePolicy) -> None:
    """Check every weight; unknown names are reported first, then shapes and dtypes, then values
    (the first weight, in order, that holds a non-finite value under ``REJECT``)."""
    for name in weights:
        if name not in manifest:
            check_known(name, manifest)
    for name, tensor in weights.items():
        check_spec(name, tuple(tensor.shape), spec_dtype(tensor.dtype), manifest)
    if non_finite is NonFinitePolicy.REJECT and (bad := non_finite_names(weights)):
        raise non_finite_error(bad[0], weights[bad[0]])


_PARALLEL_NUMEL = 1 << 20  # tensors from this size are hashed and scanned on the helper threads
_SCAN_BLOCK_BYTES = 4 << 20  # scanned right after it is hashed, while it is still in cache


def checksum_and_all_finite(t: torch.Tensor) -> tuple[str, bool]:
    """``(tensor_checksum(t), all_finite(t))`` in one pass over memory: block by block, each block
    scanned right after it is hashed, while it is in cache (a contiguous CPU tensor; any other is
    hashed, then scanned)."""
    if not (t.device.type == "cpu" and t.is_contiguous() and t.numel() > 0):
        return tensor_checksum(t), all_finite(t)
    raw = tensor_bytes(t)
    flat = t.detach().reshape(-1)
    size = t.element_size()
    step = max(1, _SCAN_BLOCK_BYTES // size)
    h = xxhash.xxh3_64()
    finite = True
    for start in range(0, flat.numel(), step):
        h.update(raw[start * size:(start + step) * size])
        finite = finite and all_finite(flat[start:start + step])
    return h.hexdigest(), finite


def checksums_and_non_finite(weights: Mapping[str, torch.Tensor], *,
                             scan_values: bool) -> tuple[dict[str, str], list[str]]:
    """``(checksums, non-finite names)`` of ``weights``: the same values as ``checksum.checksums``
    and (when ``scan_values``) ``non_finite_names``. Each large CPU tensor is one task on a small
    thread pool, hashed and scanned in one pass over memory; the small tensors are done here
    meanwhile."""
    return start_checksums_and_non_finite(weights, scan_values=scan_values)()


def start_checksums_and_non_finite(weights: Mapping[str, torch.Tensor], *, scan_values: bool
                                   ) -> Callable[[], tuple[dict[str, str], list[str]]]:
    """``checksums_and_non_finite`` started on the helper threads, one task per large tensor (its
    hash and scan in one pass); the returned function waits for it and returns its result (the
    small tensors are done then, in the caller's thread)."""
    tasks = []
    rest: dict[str, torch.Tensor] = {}
    for name, t in weights.items():
        if t.numel() >= _PARALLEL_NUMEL and t.device.type == "cpu":
            if scan_values and t.is_floating_point():
                tasks.append((name, helpers().submit(checksum_and_all_finite, t)))
            else:  # a view of a contiguous tensor; a copy of any other, made here
                tasks.append((name, helpers().submit(_checksum_only, tensor_bytes(t))))
        else:
            rest[name] = t

    def result() -> tuple[dict[str, str], list[str]]:
        sums = {name: tensor_checksum(t) for name, t in rest.items()}
        bad = set(non_finite_names(rest)) if scan_values else set()
        for name, future in tasks:
            sums[name], finite = future.result()
            if not finite:
                bad.add(name)
        return {n: sums[n] for n in weights}, [n for n in weights if n in bad]

    return result


def _checksum_only(raw: memoryview) -> tuple[str, bool]:
    return xxhash.xxh3_64_hexdigest(raw), True


def parallel_checksums(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """``checksum.checksums`` of ``tensors``, the large CPU ones hashed on the helper threads."""
    return start_checksums_and_non_finite(tensors, scan_values=False)()[0]
