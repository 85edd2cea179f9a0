"""Small weights that lie back to back in one host buffer, staged with one copy.

A caller (the fleet's replica) may hand ``Engine.stage`` its small weights as ``PackedWeights``:
one uint8 host buffer and, per weight, where it lies in it (byte offset and size) and the shape and
dtype the sender says it has. The engine checks every entry against its manifest (the errors name
the weight) before it copies anything.

In ``swap`` mode on the CPU the engine then copies the whole buffer into a block of its own, in one
copy, and the staged set's tensors are views of that block (``PackedBlock``). A retired set's block
waits in a ``BlockPool`` for the next version of the same layout, views and all: a refit of hundreds
of small weights then costs one copy and no work per weight beyond the checks. Anywhere else the
engine stages ``views`` of the caller's buffer as ordinary tensors.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .errors import WeightFileError
from .manifest import ITEMSIZE, TensorSpec, torch_dtype
from .validation import check_spec

Layout = tuple[int, tuple[tuple[str, tuple[int, int]], ...]]


@dataclass(frozen=True)
class PackedWeights:
    """``offsets``: name -> (byte offset, byte size) in ``buffer`` (uint8, 1-D, contiguous, on the
    CPU); ``specs``: name -> ``{"shape", "dtype"}`` (or a ``TensorSpec``) as the sender describes
    each weight; it may name more weights than ``offsets`` does."""

    buffer: torch.Tensor
    offsets: Mapping[str, tuple[int, int]]
    specs: Mapping[str, Any]

    def layout(self) -> Layout:
        """What a block must match to be reused: the buffer's size and every entry's place."""
        return self.buffer.numel(), tuple(self.offsets.items())


def _shape_and_dtype(spec: Any) -> tuple[tuple[int, ...], str]:
    if type(spec) is dict or isinstance(spec, Mapping):
        return tuple(spec["shape"]), spec["dtype"]
    return tuple(spec.shape), spec.dtype


class PackingIndex:
    """What ``check_packed`` needs of each manifest entry, worked out once per engine."""

    def __init__(self, manifest: Mapping[str, TensorSpec]) -> None:
        self.manifest = manifest
        self.entries = {name: (spec.shape, spec.dtype, spec.nbytes, ITEMSIZE[spec.dtype])
                        for name, spec in manifest.items()}


def check_packed(packed: PackedWeights, index: PackingIndex) -> None:
    """Raise the error naming the weight when an entry does not fit the manifest (name, shape,
    dtype, as ``validation.check_spec``), or does not lie where its bytes can be read as it (outside
    the buffer, a size other than its shape's, an offset its dtype cannot start at)."""
    buf = packed.buffer
    if buf.dtype != torch.uint8 or buf.dim() != 1 or not buf.is_contiguous() or buf.device.type != "cpu":
        raise WeightFileError(f"packed weights need a contiguous 1-D uint8 CPU buffer, got {buf.dtype} "
                              f"of shape {tuple(buf.shape)} on {buf.device}")
    size = buf.numel()
    entries, specs = index.entries, packed.specs
    for name, (start, nbytes) in packed.offsets.items():
        if name not in specs:
            raise WeightFileError(f"weight {name!r}: packed without a shape and dtype", name=name)
        shape, dtype = _shape_and_dtype(specs[name])
        want = entries.get(name)
        if want is None or shape != want[0] or dtype != want[1]:
            check_spec(name, shape, dtype, index.manifest)  # raises the error naming it
        assert want is not None
        if nbytes != want[2] or start < 0 or start + nbytes > size:
            raise WeightFileError(f"weight {name!r}: packed at bytes [{start}, {start + nbytes}) of a "
                                  f"{size}-byte buffer, but it needs {want[2]} bytes there", name=name)
        if start % want[3]:
            raise WeightFileError(f"weight {name!r}: packed at byte {start}, not a multiple of its "
                                  f"{want[1]} size", name=name)


def views(buffer: torch.Tensor, offsets: Mapping[str, tuple[int, int]],
          specs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Each entry of ``offsets`` as a tensor of the shape and dtype ``specs`` gives it (a
    ``TensorSpec`` or ``{"shape", "dtype"}``), sharing ``buffer``'s memory."""
    out = {}
    for name, (start, nbytes) in offsets.items():
        shape, dtype = _shape_and_dtype(specs[name])
        out[name] = buffer[start:start + nbytes].view(torch_dtype(dtype)).view(shape)
    return out


def non_finite(buffer: torch.Tensor, offsets: Mapping[str, tuple[int, int]],
               dtype_of: Callable[[str], torch.dtype]) -> set[str]:
    """The floating-point entries holding a NaN or an infinity. Consecutive entries of one dtype
    are checked with one call over the span of the buffer they cover (a scan of the bytes between
    them too: padding); only a span that fails is looked into entry by entry."""
    def finite(start: int, end: int, dtype: torch.dtype) -> bool:
        return bool(torch.isfinite(buffer[start:end].view(dtype)).all())

    runs: list[tuple[torch.dtype, list[tuple[str, int, int]]]] = []
    for name, (start, nbytes) in offsets.items():
        dtype = dtype_of(name)
        if not runs or runs[-1][0] != dtype:
            runs.append((dtype, []))
        runs[-1][1].append((name, start, start + nbytes))
    bad: set[str] = set()
    for dtype, run in runs:
        if not dtype.is_floating_point:
            continue
        lo, hi = min(start for _, start, _ in run), max(end for _, _, end in run)
        if not finite(lo, hi, dtype):
            bad.update(name for name, start, end in run if not finite(start, end, dtype))
    return bad


class PackedBlock:
    """An engine's own copy of a packed buffer and its weights as views of it."""

    __slots__ = ("data", "layout", "views")

    def __init__(self, layout: Layout, data: torch.Tensor, views: dict[str, torch.Tensor]) -> None:
        self.layout = layout
        self.data = data
        self.views = views

    @property
    def nbytes(self) -> int:
        return self.data.numel()


class BlockPool:
    """Blocks whose sets are gone, kept for the next version of the same layout."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: dict[Layout, list[PackedBlock]] = defaultdict(list)
        self.nbytes = 0

    def put(self, block: PackedBlock) -> None:
        with self._lock:
            self._free[block.layout].append(block)
            self.nbytes += block.nbytes

    def take(self, layout: Layout) -> PackedBlock | None:
        with self._lock:
            free = self._free.get(layout)
            if not free:
                return None
            block = free.pop()
            self.nbytes -= block.nbytes
            return block
