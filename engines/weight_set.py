"""Weight sets, the handles of staged sets, and the pool of reusable device buffers."""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum

import torch

from .backends.base import BoundProgram
from .packed import PackedBlock


class WeightSet:
    """A complete name -> device tensor mapping, the program bound to it, and its reader count.

    A set is immutable once built (copy mode excepted, where commit writes the live set's buffers
    while no reader holds it). In shared mode some tensors are borrowed from the caller (the
    object store's read-only copy): the set holds them, and nothing ever writes or pools them.
    ``readers`` and ``retired`` are guarded by the engine's lock; a retired set's buffers go back
    to the pool only when its last reader leaves.
    """

    __slots__ = ("set_id", "version", "tensors", "program", "readers", "retired", "storage_ptrs",
                 "borrowed", "blocks")

    def __init__(self, set_id: int, version: int, tensors: dict[str, torch.Tensor],
                 program: BoundProgram, borrowed: frozenset[str] = frozenset(),
                 blocks: tuple[PackedBlock, ...] = ()) -> None:
        self.set_id = set_id
        self.version = version
        self.tensors = tensors
        self.program = program
        self.readers = 0
        self.retired = False
        self.storage_ptrs = frozenset(t.untyped_storage().data_ptr() for t in tensors.values())
        self.borrowed = borrowed  # names whose tensors the caller lent (shared mode): never pooled
        self.blocks = blocks  # the packed blocks some of ``tensors`` are views of (engines.packed)


class StagedState(str, Enum):
    """Life of a staged set: STAGED -> COMMITTED, or STAGED -> DISCARDED."""

    STAGED = "staged"
    COMMITTED = "committed"
    DISCARDED = "discarded"


@dataclass(eq=False)
class StagedSet:
    """What ``Engine.stage`` returns: the new version's changed tensors, invisible to inference.

    ``names`` are the weights this set changes; every other weight is shared with the live set it
    was staged against (``base_id``), so a subset refit costs memory for the changed tensors only
    (``nbytes``). Commit it once, or discard it; a set staged against a live set that another
    commit has replaced is superseded and cannot be committed.
    """

    version: int
    names: tuple[str, ...]
    nbytes: int
    base_id: int
    stage_s: float
    state: StagedState = StagedState.STAGED
    weight_set: WeightSet | None = None  # swap mode
    host: dict[str, torch.Tensor] = field(default_factory=dict)  # copy mode
    base_version: int = 0
    owner: object = field(default=None, repr=False)  # the staging engine's token


class BufferPool:
    """Device buffers whose readers have all finished, kept for reuse by the next staged set."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: dict[tuple[tuple[int, ...], torch.dtype, str], list[torch.Tensor]] = defaultdict(list)
        self.nbytes = 0

    def put(self, t: torch.Tensor) -> None:
        with self._lock:
            self._free[(tuple(t.shape), t.dtype, str(t.device))].append(t)
            self.nbytes += t.numel() * t.element_size()

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: str) -> torch.Tensor | None:
        with self._lock:
            bucket = self._free.get((shape, dtype, str(torch.device(device))))
            if not bucket:
                return None
            t = bucket.pop()
            self.nbytes -= t.numel() * t.element_size()
            return t

    def reusable_bytes(self, tensors: Iterable[torch.Tensor], device: str) -> int:
        """Bytes of ``tensors`` that pooled buffers would cover (each buffer used once)."""
        dev = str(torch.device(device))
        with self._lock:
            left = {k: len(v) for k, v in self._free.items()}
        covered = 0
        for t in tensors:
            key = (tuple(t.shape), t.dtype, dev)
            if left.get(key, 0) > 0:
                left[key] -= 1
                covered += t.numel() * t.element_size()
        return covered

    def clear(self) -> int:
        with self._lock:
            freed = self.nbytes
            self._free.clear()
            self.nbytes = 0
            return freed
