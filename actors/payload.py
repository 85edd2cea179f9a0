"""How a weight version travels: as buckets, through Ray's object store or inside the calls.

A version is a list of buckets (``Publication.refs``). A bucket is a ``Wire``:
``(packed, offsets, arrays)``:
- ``arrays``: ``name -> numpy array`` for tensors above ``PACK_BYTES``. Numpy arrays are stored out
  of band, so every replica on a node maps the same shared-memory copy without copying it.
- ``packed``: one uint8 array holding every smaller tensor back to back (each at a 64-byte aligned
  offset), ``offsets``: ``name -> (offset, nbytes)``. One buffer instead of hundreds of small
  arrays: serialising a model of many small tensors costs one buffer, not one per tensor.
A plain ``{name: array}`` mapping is a bucket too (everything in ``arrays``).

numpy has no bf16, so 16-bit floats travel as int16 views and are viewed back by the dtype names
in the specs. Each bucket travels as an ``ObjectRef`` (put once; the refs sit in a list, so the
coordinator forwards them without fetching the bytes and each replica fetches under its own
timeout) or, for a version of at most ``INLINE_BYTES``, as the bucket itself inside the calls,
pickled once into ``bytes`` (``seal``): a small version then costs no object-store round trip at all.

``seal`` is also how a call's large plain arguments travel (a version's specs and checksums): Ray
passes ``bytes`` as they are, while it serialises a dict of hundreds of entries on a slower path,
again for each call of a fan-out. ``unseal`` opens what ``seal`` made and returns anything else as
it is, so a receiver takes both forms.
"""

from __future__ import annotations

import math
import pickle
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING, Any

import numpy as np
import xxhash

from engines.engine_file import RawTensor
from engines.manifest import ITEMSIZE, dtype_name, torch_dtype

if TYPE_CHECKING:
    import torch

    from engines.packed import PackedWeights

# the fetched arrays are read-only shared memory, and nothing writes to them: staged as copies, or
# served as they are in shared mode (a process-wide filter: catch_warnings is not thread-safe)
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning,
                        module=__name__)

__all__ = ["BUCKET_BYTES", "INLINE_BYTES", "PACK_BYTES", "Publication", "Wire", "buckets", "fetch",
           "from_wire", "is_inline", "iter_fetch", "packed_checksums", "packed_non_finite", "raw_from_wire",
           "seal", "spec_dict", "staged_from_wire", "to_wire", "unseal", "wire_nbytes"]

PACK_BYTES = 64 << 10  # tensors up to this size travel packed together in one buffer per bucket
BUCKET_BYTES = 64 << 20  # the default bound of a bucket's size (a larger tensor is a bucket alone)
INLINE_BYTES = 64 << 10  # a version up to this size travels inside the calls (Ray inlines args < 100 KiB)
_ALIGN = 64


@cache
def _view_as() -> dict[torch.dtype, torch.dtype]:
    """dtypes numpy lacks (or stores otherwise) -> the dtype they travel as."""
    import torch  # on first use: the coordinator forwards buckets without importing torch

    return {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.bool: torch.uint8}


Wire = tuple[np.ndarray | None, dict[str, tuple[int, int]], dict[str, np.ndarray]]


def _host_view(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    view = _view_as().get(t.dtype)
    return t.view(view) if view is not None else t


def to_wire(tensors: Mapping[str, torch.Tensor], *, pack_bytes: int = PACK_BYTES) -> Wire:
    """One bucket of ``tensors``: large ones as numpy views (no copy for contiguous CPU tensors),
    the small ones copied into one packed buffer (zero padding between them)."""
    arrays: dict[str, np.ndarray] = {}
    offsets: dict[str, tuple[int, int]] = {}
    small: list[torch.Tensor] = []
    end = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if nbytes > pack_bytes:
            arrays[name] = _host_view(t).numpy()  # a view of a contiguous CPU tensor
            continue
        offsets[name] = (end, nbytes)
        small.append(t)
        end += nbytes + (-nbytes % _ALIGN)
    if not small:
        return None, offsets, arrays
    packed = np.zeros(end, np.uint8)
    view_as = _view_as()
    for t, (start, nbytes) in zip(small, offsets.values(), strict=True):
        plain = t.device.type == "cpu" and t.dtype not in view_as and t.is_contiguous()
        host = t.detach() if plain else _host_view(t)
        packed[start:start + nbytes] = host.numpy().reshape(-1).view(np.uint8)
    return packed, offsets, arrays


def buckets(tensors: Mapping[str, torch.Tensor], bucket_bytes: int) -> list[dict[str, torch.Tensor]]:
    """``tensors`` in order, cut into groups of at most ``bucket_bytes`` (a larger tensor makes a
    group of its own)."""
    out: list[dict[str, torch.Tensor]] = []
    group: dict[str, torch.Tensor] = {}
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if group and size + nbytes > bucket_bytes:
            out.append(group)
            group, size = {}, 0
        group[name] = t
        size += nbytes
    if group or not out:
        out.append(group)
    return out


def _spec_dtype(spec: Any) -> torch.dtype:
    return torch_dtype(spec["dtype"] if isinstance(spec, Mapping) else spec.dtype)


def from_wire(wire: Wire | Mapping[str, np.ndarray], specs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Tensors sharing memory with the (read-only) bucket, in the dtypes and shapes ``specs`` name."""
    import torch

    if isinstance(wire, Mapping):
        packed, offsets, arrays = None, {}, wire
    else:
        packed, offsets, arrays = wire
    out: dict[str, torch.Tensor] = {}
    for name, arr in arrays.items():
        dtype = _spec_dtype(specs[name])
        t = torch.from_numpy(arr)
        out[name] = t.view(dtype) if t.dtype != dtype else t
    if offsets:
        from engines.packed import views

        assert packed is not None
        out.update(views(torch.from_numpy(packed), offsets, specs))
    return out


def packed_checksums(wire: Wire | Mapping[str, np.ndarray]) -> dict[str, str]:
    """xxh3 checksums (``engines.checksum``'s) of the bucket's packed tensors, each hashed where
    it lies in the packed buffer: the same digests as of the tensors, without a call per tensor
    into torch."""
    if isinstance(wire, Mapping) or not wire[1]:
        return {}
    packed, offsets, _ = wire
    raw = memoryview(packed)
    return {name: xxhash.xxh3_64_hexdigest(raw[start:start + nbytes])
            for name, (start, nbytes) in offsets.items()}


def packed_non_finite(wire: Wire | Mapping[str, np.ndarray], specs: Mapping[str, Any]) -> set[str]:
    """The bucket's packed floating-point tensors holding a NaN or an infinity, scanned where they
    lie (``engines.packed.non_finite``)."""
    import torch

    from engines.packed import non_finite

    if isinstance(wire, Mapping) or not wire[1]:
        return set()
    packed, offsets, _ = wire
    return non_finite(torch.from_numpy(packed), offsets, lambda name: _spec_dtype(specs[name]))


def staged_from_wire(wires: list[Wire | Mapping[str, np.ndarray]], specs: Mapping[str, Any]
                     ) -> tuple[dict[str, torch.Tensor], list[PackedWeights]]:
    """Every bucket's large tensors (as ``from_wire``) and its packed buffer as it lies, for
    ``Engine.stage(..., packed=)``: the engine checks each packed entry and stages the buffer with
    one copy, where ``from_wire`` would make a tensor of each."""
    import torch

    from engines.packed import PackedWeights

    tensors: dict[str, torch.Tensor] = {}
    packed: list[PackedWeights] = []
    for wire in wires:
        if isinstance(wire, Mapping):
            tensors.update(from_wire(wire, specs))
            continue
        buffer, offsets, arrays = wire
        tensors.update(from_wire((None, {}, arrays), specs))
        if offsets:
            assert buffer is not None
            packed.append(PackedWeights(torch.from_numpy(buffer), offsets, specs))
    return tensors, packed


def raw_from_wire(wires: list[Wire | Mapping[str, np.ndarray]], specs: Mapping[str, Any]
                  ) -> dict[str, RawTensor]:
    """Every bucket's tensors as their bytes where they lie in it (``RawTensor``, in the shapes and
    dtype names ``specs`` give), without torch: what the checkpoint writer stores. ValueError
    naming the tensor whose bytes do not fit its spec."""
    out: dict[str, RawTensor] = {}
    for wire in wires:
        packed, offsets, arrays = (None, {}, wire) if isinstance(wire, Mapping) else wire
        raw = memoryview(packed) if packed is not None else memoryview(b"")
        for name, (start, nbytes) in offsets.items():
            out[name] = _raw(name, raw[start:start + nbytes], specs[name])
        for name, arr in arrays.items():
            data = memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))
            out[name] = _raw(name, data, specs[name])
    return out


def _raw(name: str, data: memoryview, spec: Any) -> RawTensor:
    shape = tuple(spec["shape"] if isinstance(spec, Mapping) else spec.shape)
    dtype = spec["dtype"] if isinstance(spec, Mapping) else spec.dtype
    if dtype not in ITEMSIZE:
        raise ValueError(f"tensor {name!r}: dtype {dtype} cannot be stored in a checkpoint")
    want = ITEMSIZE[dtype] * math.prod(shape)
    if data.nbytes != want:
        raise ValueError(f"tensor {name!r}: {data.nbytes} bytes travelled, its spec {dtype}{list(shape)} "
                         f"needs {want}")
    return RawTensor(shape, dtype, data)


def wire_nbytes(wire: Wire) -> int:
    packed, _, arrays = wire
    return (0 if packed is None else packed.nbytes) + sum(a.nbytes for a in arrays.values())


def seal(obj: Any) -> bytes:
    """``obj`` pickled once, to travel as ``bytes`` in Ray calls (see the module docstring)."""
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def unseal(item: Any) -> Any:
    """What ``seal`` sealed; anything but ``bytes`` as it is."""
    return pickle.loads(item) if isinstance(item, bytes) else item


def is_inline(item: Any) -> bool:
    """Whether an item of ``Publication.refs`` is a bucket itself, sealed or not (not an
    object-store ref)."""
    return isinstance(item, (bytes, tuple, Mapping))


def iter_fetch(refs: list[Any], timeout: float | None) -> Iterator[Wire | Mapping[str, np.ndarray]]:
    """The buckets of ``refs`` in order, each as soon as it is here (inline ones at once)."""
    import ray

    for item in refs:
        yield unseal(item) if is_inline(item) else ray.get(item, timeout=timeout)


def fetch(refs: list[Any], timeout: float | None) -> list[Wire | Mapping[str, np.ndarray]]:
    """Every bucket of ``refs``: inline buckets as they are, the others from the object store."""
    import ray

    remote = [item for item in refs if not is_inline(item)]
    got = iter(ray.get(remote, timeout=timeout)) if remote else iter(())
    return [unseal(item) if is_inline(item) else next(got) for item in refs]


def spec_dict(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """``name -> {"shape": [...], "dtype": "float32"}``: the manifest as it travels."""
    return {n: {"shape": list(t.shape), "dtype": dtype_name(t.dtype)} for n, t in tensors.items()}


@dataclass
class Publication:
    """A version published once: its buckets (refs, or inline), specs, checksums, size."""

    refs: list[Any]
    specs: dict[str, dict[str, Any]]
    checksums: dict[str, str]
    nbytes: int
    timings: dict[str, float] = field(default_factory=dict)
    hashed_on: str | None = None  # the node whose object-store copy the checksums were taken of
