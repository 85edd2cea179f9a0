"""Turning what callers hand us into named torch tensors, without ever executing a pickle.

Accepted: a mapping of name -> numpy array or torch tensor (bf16 included), or a path to a
``.safetensors``, ``.pt``/``.pth`` (a plain state dict, read with torch's weights-only unpickler,
which refuses any other object) or ``.npz`` (read with ``allow_pickle=False``) file. Names can be
mapped for files saved from a model wrapped in another module (``strip_prefix``/``add_prefix``/an
explicit ``mapping``).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from .errors import WeightFileError

WeightsLike = Union[Mapping[str, Any], str, os.PathLike]  # noqa: UP007 (a runtime alias)


def as_tensor(name: str, value: Any) -> torch.Tensor:
    """A torch tensor sharing memory with ``value`` where it can (numpy arrays, tensors)."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise WeightFileError(f"weight {name!r}: numpy object arrays are not weights")
        if not value.flags.writeable:
            value = value.copy()
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, np.generic):
        return torch.from_numpy(np.asarray(value).copy())
    raise WeightFileError(
        f"weight {name!r}: expected a numpy array or torch tensor, got {type(value).__name__}"
    )


def read_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a weights file into CPU tensors. Never executes code from the file."""
    p = Path(path)
    if not p.is_file():
        raise WeightFileError(f"weights file {str(p)!r} does not exist")
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        return _read_safetensors(p)
    if suffix in (".pt", ".pth", ".bin"):
        return _read_torch(p)
    if suffix == ".npz":
        return _read_npz(p)
    raise WeightFileError(f"weights file {str(p)!r}: unknown format {suffix!r} (.safetensors, .pt, .npz)")


def _read_safetensors(p: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(p), device="cpu")
    except Exception as exc:  # safetensors raises its own SafetensorError and others
        raise WeightFileError(f"weights file {str(p)!r} is not a valid .safetensors file: {exc}") from exc


def _read_torch(p: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise WeightFileError(
            f"weights file {str(p)!r} refused: it carries pickled objects other than tensors "
            f"(nothing was executed): {str(exc).splitlines()[0]}"
        ) from exc
    except Exception as exc:
        raise WeightFileError(f"weights file {str(p)!r} is not a readable .pt file: {exc}") from exc
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightFileError(f"weights file {str(p)!r} must hold a flat name -> tensor dict")
    return {str(k): v for k, v in obj.items()}


def _read_npz(p: Path) -> dict[str, torch.Tensor]:
    try:
        with np.load(str(p), allow_pickle=False) as npz:
            return {k: torch.from_numpy(np.array(npz[k])) for k in npz.files}
    except ValueError as exc:
        raise WeightFileError(f"weights file {str(p)!r} refused: {exc}") from exc
    except Exception as exc:
        raise WeightFileError(f"weights file {str(p)!r} is not a readable .npz file: {exc}") from exc


def rename(
    tensors: Mapping[str, torch.Tensor],
    *,
    strip_prefix: str | None = None,
    add_prefix: str | None = None,
    mapping: Mapping[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """Map names: an explicit ``mapping`` first, then strip one prefix, then add one."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        new = mapping.get(name, name) if mapping else name
        if strip_prefix and new.startswith(strip_prefix):
            new = new[len(strip_prefix):]
        if add_prefix:
            new = add_prefix + new
        if new in out:
            raise WeightFileError(f"weight {new!r}: two inputs map to this name")
        out[new] = t
    return out


def load_weights(
    weights: WeightsLike,
    *,
    strip_prefix: str | None = None,
    add_prefix: str | None = None,
    mapping: Mapping[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """Named CPU-or-device tensors from a mapping or a weights file path, names mapped."""
    if isinstance(weights, (str, os.PathLike)):
        tensors = read_weights_file(weights)
    elif isinstance(weights, Mapping):
        tensors = {str(k): as_tensor(str(k), v) for k, v in weights.items()}
    else:
        raise WeightFileError(
            f"weights must be a name -> array mapping or a file path, got {type(weights).__name__}"
        )
    if strip_prefix or add_prefix or mapping:
        tensors = rename(tensors, strip_prefix=strip_prefix, add_prefix=add_prefix, mapping=mapping)
    return tensors
