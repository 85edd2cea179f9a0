"""Copies from pageable host memory to a card, chunk by chunk through two pinned buffers.

A stage copies each tensor from the object store's pageable memory. Handed straight to the card's
copy engine, such a copy goes through the driver's own small bounce buffer, at a fraction of the
link's speed (DESIGN.md, Floors: 8.5 against 55 GB/s on the H200 machine). ``PinnedPipe`` keeps
two pinned buffers per engine and moves a tensor through them in chunks: the host copy of chunk
k+1 into one buffer (split over the refit helper threads, ``engines.threads``) runs while the card
reads chunk k from the other on a stream of the pipe's own.

Contract:
  - ``copy(dst, src)`` fills ``dst`` with ``src``'s bytes (same dtype and number of elements, both
    contiguous, ``src`` in host memory). It returns once every chunk is queued; the card may
    still be reading the last two. The pipe's stream first waits for the work already queued on
    the caller's stream (``dst`` may be a block that stream just freed), and the caller's stream
    then waits for the pipe's, so whatever the caller queues next, the allocator's reuse of
    ``dst`` included, comes after the copy; ``Engine._copies`` also synchronizes the device
    before the stage is used. A pinned buffer is written again only after the card's read of it
    has finished (an event per buffer), so queued chunks are never overwritten.
  - One copy at a time per pipe (a lock): a pipe's two buffers serve one stream of chunks.
  - Where pinned memory cannot be had (no CUDA, or the platform refuses to pin), ``copy`` makes a
    plain ``dst.copy_(src)`` and ``pinned`` says False; nothing fails for it.
  - On ``device="cpu"`` the pipe runs the same chunked path through two ordinary buffers, with no
    stream: what the tests exercise on a machine without a card.

Written against torch's documented CUDA API (``pin_memory``, ``torch.cuda.Stream``, ``Event``).
No card was at hand where it was written: ``scripts/bench_refit.py --device cuda`` measures it
against a plain copy (``host_to_device`` rows, ``docs/benchmarks.md``).
"""

from __future__ import annotations

import threading
from concurrent.futures import wait
from typing import Any

import torch

from .devices import device_kind, pinned_memory_available
from .threads import helper_count, helpers

__all__ = ["CHUNK_BYTES", "PinnedPipe"]

CHUNK_BYTES = 32 << 20  # bytes per chunk: two of them pinned per engine
_PART_BYTES = 4 << 20  # a chunk's host copy is split over the helper threads in parts of at least this


class PinnedPipe:
    """Host-to-card copies of one engine's stages through two pinned buffers (module docstring)."""

    def __init__(self, device: str, chunk_bytes: int = CHUNK_BYTES) -> None:
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
        self.device = device
        self.chunk_bytes = chunk_bytes
        self._card = device_kind(device) == "cuda"
        self.pinned = self._card and pinned_memory_available(device)
        self._lock = threading.Lock()
        self._buffers: list[torch.Tensor] = []
        self._read: list[Any] = []  # per buffer: an event recorded after the card's last read of it
        self._stream: Any = None

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        if dst.dtype != src.dtype or dst.numel() != src.numel():
            raise ValueError(f"copy of {src.dtype} x {src.numel()} into {dst.dtype} x {dst.numel()}")
        if not (dst.is_contiguous() and src.is_contiguous() and src.device.type == "cpu"):
            raise ValueError("copy needs contiguous tensors and a source in host memory")
        if src.numel() == 0:
            return
        with self._lock:
            if not self._ready():
                dst.copy_(src)
                return
            flat_dst, flat_src = dst.reshape(-1).view(torch.uint8), src.reshape(-1).view(torch.uint8)
            if self._stream is None:
                self._copy_chunks(flat_dst, flat_src)
                return
            caller = torch.cuda.current_stream(dst.device)
            self._stream.wait_stream(caller)  # dst may be a block the caller's stream just freed
            try:
                self._copy_chunks(flat_dst, flat_src)
            finally:
                caller.wait_stream(self._stream)  # what the caller queues next comes after the copy

    def _ready(self) -> bool:
        """Make the two buffers (and the stream) at first use; False where they cannot be had."""
        if self._buffers:
            return True
        if self._card and not self.pinned:
            return False
        try:
            self._buffers = [torch.empty(self.chunk_bytes, dtype=torch.uint8, pin_memory=self.pinned)
                             for _ in range(2)]
            if self._card:
                self._stream = torch.cuda.Stream(device=self.device)
                self._read = [torch.cuda.Event(), torch.cuda.Event()]  # unrecorded: nothing to wait for
        except RuntimeError:  # the platform refused to pin (or to make a stream): plain copies from now
            self._buffers, self._stream, self.pinned = [], None, False
            return False
        return True

    def _copy_chunks(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        for k, start in enumerate(range(0, src.numel(), self.chunk_bytes)):
            end = min(start + self.chunk_bytes, src.numel())
            i = k % 2
            if self._stream is not None:
                self._read[i].synchronize()  # the card has read what this buffer held
            bounce = self._buffers[i][:end - start]
            _host_copy(bounce, src[start:end])
            if self._stream is None:
                dst[start:end].copy_(bounce)
                continue
            with torch.cuda.stream(self._stream):
                dst[start:end].copy_(bounce, non_blocking=True)
                self._read[i].record(self._stream)


def _host_copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` for two flat uint8 host tensors, split over the helper threads."""
    parts = max(1, min(helper_count(), src.numel() // _PART_BYTES))
    if parts == 1:
        dst.copy_(src)
        return
    step = -(-src.numel() // parts)
    jobs = [helpers().submit(dst[s:s + step].copy_, src[s:s + step]) for s in range(0, src.numel(), step)]
    wait(jobs)  # every part done (or failed) before the buffer is used or written again
    for job in jobs:
        job.result()
