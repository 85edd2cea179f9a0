"""Per-tensor checksums (xxh3_64 over raw bytes) and whole-set digests.

A checksum covers a tensor's bytes exactly as stored, in its own dtype: nothing is converted, so
bf16/fp16/fp8 weights hash without a detour through float32 and two tensors have equal checksums
exactly when their bytes are equal. Shape and dtype are not part of the checksum; the weight manifest
carries those and is checked separately.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import xxhash

if TYPE_CHECKING:
    import torch

__all__ = [
    "ChecksumMismatch",
    "ChecksumMissing",
    "bytes_checksum",
    "checksums",
    "copy_and_checksum",
    "set_digest",
    "tensor_bytes",
    "tensor_checksum",
    "verify",
]


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """Return a flat byte view of ``t`` (moved to CPU and made contiguous only where needed).

    For a contiguous, dense CPU tensor this is a zero-copy view of its storage; the view keeps the
    storage alive. Raises TypeError for sparse/quantized layouts and tensors without data (meta).
    """
    import torch
    if t.layout != torch.strided:
        raise TypeError(f"cannot take the bytes of a tensor with layout {t.layout}")
    if t.is_quantized:
        raise TypeError("cannot take the bytes of a quantized tensor")
    if t.device.type == "meta":
        raise TypeError("cannot take the bytes of a meta tensor")
    t = t.detach().resolve_conj().resolve_neg()
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    # reshape(-1) is a view for a contiguous tensor (and lets 0-d tensors be viewed as bytes).
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def bytes_checksum(data: bytes | bytearray | memoryview) -> str:
    """xxh3_64 hex digest (16 lowercase hex digits) of a byte buffer (no copy)."""
    return xxhash.xxh3_64_hexdigest(data)


def tensor_checksum(t: torch.Tensor) -> str:
    """xxh3_64 hex digest (16 lowercase hex digits) of the tensor's raw bytes."""
    return xxhash.xxh3_64_hexdigest(tensor_bytes(t))


_BLOCK_BYTES = 1 << 20  # bytes copied and hashed at a time: the block is still in cache when hashed


def copy_and_checksum(dst: torch.Tensor, src: torch.Tensor) -> str:
    """Copy ``src`` into ``dst`` (same shape and dtype) and return the checksum of what ``dst``
    now holds. A contiguous CPU pair is copied block by block, each block hashed from ``dst``
    while it is in cache (one pass over the bytes instead of two); any other pair is copied, then
    hashed."""
    import torch
    if not (dst.device.type == src.device.type == "cpu" and dst.is_contiguous() and src.is_contiguous()
            and dst.dtype == src.dtype and dst.shape == src.shape and dst.numel() > 0):
        dst.copy_(src)
        return tensor_checksum(dst)
    d = dst.detach().reshape(-1).view(torch.uint8)
    s = src.detach().reshape(-1).view(torch.uint8)
    raw = memoryview(d.numpy())
    h = xxhash.xxh3_64()
    for start in range(0, d.numel(), _BLOCK_BYTES):
        stop = min(start + _BLOCK_BYTES, d.numel())
        d[start:stop].copy_(s[start:stop])
        h.update(raw[start:stop])
    return h.hexdigest()


def checksums(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Checksum every tensor of a named set: ``{name: tensor_checksum(tensor)}``."""
    return {name: tensor_checksum(t) for name, t in tensors.items()}


def set_digest(checksums: Mapping[str, str]) -> str:
    """One xxh3_64 hex digest of a whole named set, from its per-tensor checksums.

    Independent of mapping order (names are sorted). Two sets have equal digests when they have the
    same names with the same checksums; used to detect a refit identical to the active version.
    """
    h = xxhash.xxh3_64()
    for name in sorted(checksums):
        # NUL and LF separators cannot occur in a hex checksum; the name length prefix removes any
        # ambiguity from names that contain them.
        h.update(f"{len(name)}:{name}\0{checksums[name]}\n".encode())
    return h.hexdigest()


class ChecksumMismatch(Exception):
    """A tensor's bytes do not match the checksum it was sent or stored with.

    Attributes: ``name`` (the tensor), ``expected`` and ``actual`` (hex digests), ``where`` (optional
    context, e.g. a checkpoint path). Picklable, so it crosses process boundaries intact.
    """

    def __init__(self, name: str, expected: str, actual: str, where: str | None = None) -> None:
        super().__init__(name, expected, actual, where)
        self.name = name
        self.expected = expected
        self.actual = actual
        self.where = where

    def __str__(self) -> str:
        ctx = f" in {self.where}" if self.where else ""
        return (
            f"checksum mismatch for tensor {self.name!r}{ctx}: expected {self.expected}, "
            f"got {self.actual} (corrupted or altered bytes)"
        )


class ChecksumMissing(KeyError):
    """A tensor has no expected checksum to verify against (``name`` names it). A KeyError."""

    def __init__(self, name: str, where: str | None = None) -> None:
        super().__init__(name, where)
        self.name = name
        self.where = where

    def __str__(self) -> str:
        ctx = f" in {self.where}" if self.where else ""
        return f"no expected checksum for tensor {self.name!r}{ctx}"


def verify(
    tensors: Mapping[str, torch.Tensor], expected: Mapping[str, str], *, where: str | None = None
) -> None:
    """Check every tensor in ``tensors`` against ``expected`` (in the mapping's order).

    Raises ChecksumMissing for the first tensor without an expected checksum, ChecksumMismatch for
    the first whose bytes differ. Names in ``expected`` absent from ``tensors`` are not an error (a
    subset may be verified).
    """
    for name, t in tensors.items():
        want = expected.get(name)
        if want is None:
            raise ChecksumMissing(name, where)
        got = tensor_checksum(t)
        if got != want:
            raise ChecksumMismatch(name, want, got, where)
