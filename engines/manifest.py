"""Weight manifests: the name, shape and dtype of every refittable weight."""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    import torch

DTYPE_NAMES = ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8",
               "bool")
ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4,
            "int16": 2, "int8": 1, "uint8": 1, "bool": 1}
# the safetensors file format's name of each dtype
SAFETENSORS_CODE = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
                    "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


@cache
def _dtypes() -> dict[str, torch.dtype]:
    import torch  # on first use: a process that only reads manifests need not import torch

    return {name: getattr(torch, name) for name in DTYPE_NAMES}


@cache
def _names() -> dict[torch.dtype, str]:
    return {v: k for k, v in _dtypes().items()}


def dtype_name(dtype: torch.dtype) -> str:
    """The manifest's name of a torch dtype (``torch.bfloat16`` -> ``"bfloat16"``)."""
    try:
        return _names()[dtype]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype}") from None


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a manifest dtype name; ValueError for an unknown one."""
    try:
        return _dtypes()[name]
    except KeyError:
        raise ValueError(f"unknown dtype name {name!r}; known: {sorted(DTYPE_NAMES)}") from None


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
        torch_dtype(self.dtype)  # the same error for an unknown name
        return self.numel * ITEMSIZE[self.dtype]

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
