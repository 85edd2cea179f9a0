"""What an engine takes as input, and checking a request against it before anything runs.

An engine's inputs are the exported program's user inputs, in order: each has a name (the
``forward`` argument's), a dtype and a shape whose dims are fixed sizes or dynamic dims with a
name and a range (``torch.export.Dim``; MagicMind's ``-1`` dims, TensorRT's profiles).
``InputSpec``s are recorded in the engine file's metadata (``inputs``) and, for a file that lacks
them, read back from the program itself (its placeholders and range constraints).

``check_inputs`` refuses, with an ``InputError`` naming the input, what it expects and what it
was given: a wrong number of inputs, a value that is not an array or tensor (a string, a dict, an
object array), a wrong dtype (no silent casts), a wrong rank, a fixed dim of another size, a
dynamic dim outside its range, and two inputs that disagree on one dynamic dim (a batch of 4
images with 3 masks). Nothing of the engine is touched before it passes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .errors import InputError
from .manifest import DTYPE_NAMES

if TYPE_CHECKING:
    import torch

__all__ = ["DimSpec", "InputSpec", "check_inputs", "dim_names_of", "input_specs_of"]


class DimSpec(BaseModel):
    """A dynamic dim: its name and the sizes it accepts (``max`` None: no upper bound)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dim: str = Field(min_length=1)
    min: int = Field(ge=0)
    max: int | None = Field(default=None, ge=0)

    def accepts(self, size: int) -> bool:
        return size >= self.min and (self.max is None or size <= self.max)

    def __str__(self) -> str:
        return f"{self.dim}[{self.min}..{'' if self.max is None else self.max}]"


class InputSpec(BaseModel):
    """One input: name, dtype (the manifest's names) and shape (sizes and dynamic dims)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    dtype: str
    shape: tuple[int | DimSpec, ...]

    def describe(self) -> str:
        return f"{self.dtype}[{', '.join(str(d) for d in self.shape)}]"

    @property
    def dynamic(self) -> dict[int, DimSpec]:
        """Index -> dynamic dim."""
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, DimSpec)}


def input_specs_of(program: torch.export.ExportedProgram,
                   dim_names: Mapping[tuple[int, int], str] | None = None) -> list[InputSpec]:
    """The user inputs of ``program``, in order. ``dim_names`` names the dynamic dims
    ``(input index, dim index) -> name`` (as the builder was given them); unnamed ones are named
    after their symbol (``s0``)."""
    import torch

    from .manifest import dtype_name

    user = [s.arg.name for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    vals = {n.name: n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder"}
    ranges = {str(k): v for k, v in program.range_constraints.items()}
    specs = []
    for i, name in enumerate(user):
        val = vals.get(name)
        if not isinstance(val, torch.Tensor):
            raise InputError(name, "a tensor", f"an input of kind {type(val).__name__} the engine cannot "
                                               "check (only tensor inputs are supported)")
        shape: list[int | DimSpec] = []
        for d, size in enumerate(val.shape):
            if isinstance(size, int):
                shape.append(size)
                continue
            symbol = str(size)
            vr = ranges.get(symbol)
            lower = int(vr.lower) if vr is not None else 0
            upper = _finite(vr.upper) if vr is not None else None
            label = (dim_names or {}).get((i, d), symbol)
            shape.append(DimSpec(dim=label, min=max(lower, 0), max=upper))
        specs.append(InputSpec(name=name, dtype=dtype_name(val.dtype), shape=tuple(shape)))
    return specs


def _finite(bound: Any) -> int | None:
    try:
        value = int(bound)
    except (TypeError, ValueError, OverflowError):
        return None  # int_oo: no upper bound
    return value if value < (1 << 62) else None


def dim_names_of(dynamic_shapes: Any, arg_names: Sequence[str]) -> dict[tuple[int, int], str]:
    """``(input index, dim index) -> name`` of the ``torch.export.Dim``s in a ``dynamic_shapes``
    spec (a tuple/list in argument order, or a dict keyed by argument name; per input a dict
    ``{dim: Dim}`` or a sequence of ``Dim | None``)."""
    if dynamic_shapes is None:
        return {}
    per_input = ([dynamic_shapes.get(n) for n in arg_names] if isinstance(dynamic_shapes, Mapping)
                 else list(dynamic_shapes))
    out: dict[tuple[int, int], str] = {}
    for i, spec in enumerate(per_input):
        items = spec.items() if isinstance(spec, Mapping) else enumerate(spec or ())
        for d, dim in items:
            name = getattr(dim, "__name__", None)
            if isinstance(name, str) and name:
                out[(i, int(d))] = name
    return out


def _dtype_of(value: Any) -> str | None:
    """The manifest's name of an input's dtype, or None for a dtype an engine never takes."""
    import torch

    from .manifest import dtype_name

    if isinstance(value, torch.Tensor):
        try:
            return dtype_name(value.dtype)
        except ValueError:
            return str(value.dtype)
    name = value.dtype.name
    return name if name in DTYPE_NAMES else None


def check_inputs(specs: Sequence[InputSpec], values: Sequence[Any]) -> None:
    """Raise the ``InputError`` that names the first input not fitting ``specs``; else return.
    ``values`` are numpy arrays or torch tensors (see the module docstring)."""
    import torch

    if len(values) != len(specs):
        names = ", ".join(s.name for s in specs)
        raise InputError("(inputs)", f"{len(specs)} input(s) ({names})", f"{len(values)}")
    bound: dict[str, tuple[int, str]] = {}  # dynamic dim -> (size, the input that set it)
    for spec, value in zip(specs, values, strict=True):
        if isinstance(value, np.ndarray):
            if value.dtype.hasobject or value.dtype.kind not in "biuf":
                raise InputError(spec.name, spec.describe(), f"a numpy array of dtype {value.dtype}")
        elif not isinstance(value, torch.Tensor):
            raise InputError(spec.name, spec.describe(), f"a {type(value).__name__} (an array or tensor "
                                                         "is expected)")
        got = _dtype_of(value)
        if got != spec.dtype:
            raise InputError(spec.name, spec.describe(), f"dtype {got or value.dtype} (no implicit casts)")
        shape = tuple(int(s) for s in value.shape)
        if len(shape) != len(spec.shape):
            raise InputError(spec.name, spec.describe(), f"shape {list(shape)} (rank {len(shape)}, "
                                                         f"expected rank {len(spec.shape)})")
        for d, (want, size) in enumerate(zip(spec.shape, shape, strict=True)):
            if isinstance(want, DimSpec):
                if not want.accepts(size):
                    raise InputError(spec.name, spec.describe(),
                                     f"shape {list(shape)}: dim {d} ({want.dim}) is {size}, outside "
                                     f"{want.min}..{'' if want.max is None else want.max}")
                first = bound.setdefault(want.dim, (size, spec.name))
                if first[0] != size:
                    raise InputError(spec.name, spec.describe(),
                                     f"shape {list(shape)}: dim {d} ({want.dim}) is {size}, but input "
                                     f"{first[1]!r} has {want.dim} = {first[0]}")
            elif want != size:
                raise InputError(spec.name, spec.describe(),
                                 f"shape {list(shape)}: dim {d} is {size}, expected {want}")
