"""Weight manifests: the name, shape and dtype of every refittable weight."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from pydantic import BaseModel, ConfigDict

_DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAMES = {v: k for k, v in _DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """The manifest's name of a torch dtype (``torch.bfloat16`` -> ``"bfloat16"``)."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype}") from None


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a manifest dtype name; ValueError for an unknown one."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype name {name!r}; known: {sorted(_DTYPES)}") from None


class TensorSpec(BaseModel):
    """Shape and dtype of one weight. Immutable; equal specs compare equal."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=torch_dtype(self.dtype)).element_size()

    @classmethod
    def of(cls, t: torch.Tensor) -> TensorSpec:
        return cls(shape=tuple(t.shape), dtype=dtype_name(t.dtype))


Manifest = dict[str, TensorSpec]


def manifest_of(tensors: Mapping[str, torch.Tensor]) -> Manifest:
    """The manifest describing a name -> tensor mapping."""
    return {name: TensorSpec.of(t) for name, t in tensors.items()}


def manifest_bytes(manifest: Mapping[str, TensorSpec]) -> int:
    """Total bytes of the weights a manifest describes."""
    return sum(spec.nbytes for spec in manifest.values())
