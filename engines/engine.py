"""A refittable inference engine on one device.

Contract:
- ``infer`` is thread-safe. A call takes a reference to the live weight set once, under the
  engine's lock, and runs only on it: one version per response, and the response names it (I1).
- ``stage`` validates every weight against the manifest before copying anything (I4), then
  copies the changed tensors into spare buffers invisible to inference. ``commit`` makes a staged
  set live: in ``swap`` mode one reference swap (microseconds, any model size; no reader waits,
  I6); in ``copy`` mode a copy into the live buffers while new readers wait and none is inside.
- In ``shared`` mode (CPU) ``stage(..., borrow=True)`` copies nothing: the staged set holds the
  caller's tensors, which must never change while the engine holds them (the fleet passes the
  object store's immutable copy). Such a set is otherwise a swap set; no buffer is pooled in
  shared mode, so a retired set's memory goes back as soon as its last reader leaves.
- A buffer goes back to the pool only when every call that read it has returned (reader
  counts). On CUDA the outputs are copied to the host before the reader leaves, so the device
  work that read the buffer has finished too.
- Every refit error leaves the engine serving the weights it served before the call.
- A version is an ``int`` (numpy integers are accepted) in ``[0, 2**63)``; a bool, a float (even
  ``5.0``), a string or a negative number is an ``InvalidVersionError`` (a ``VersionOrderError``),
  checked before any weight is read. ``stage`` checks a weights file's names, shapes and dtypes
  against the manifest from the file's header before reading its data (``load_weights(expect=)``).
- ``commit``/``discard`` take only sets this engine staged (``StagedSetError`` otherwise).
- ``stage(..., packed=)`` takes small weights as they lie in one host buffer (``engines.packed``),
  each entry checked like any weight before anything is copied. In ``swap`` mode on the CPU the
  buffer is copied once into a block whose views the set holds; a block goes back to be reused
  only once no set holds a view of it.
- ``prestage`` copies tensors into spare buffers before their version is known (a fleet's replica
  copies each bucket as it arrives, ahead of the PREPARE). The caller owns those buffers until it
  passes them to ``stage(..., adopt=...)``, which then owns them (staged as they are, or pooled on
  failure), or back with ``release_prestaged``; never both.
"""

from __future__ import annotations

import numbers
import threading
import time
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import Future, wait
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .backends.base import Backend
from .checksum import ChecksumMismatch, ChecksumMissing, bytes_checksum, copy_and_checksum, tensor_checksum
from .config import BuilderConfig, MemoryMode, NonFinitePolicy
from .devices import device_kind, pinned_memory_available
from .engine_file import MAX_VERSION, EngineFile, write_engine_file
from .errors import (
    EngineError,
    InputError,
    InvalidVersionError,
    MemoryBudgetError,
    NotRetainedError,
    RefitDisabledError,
    StagedSetDiscardedError,
    StagedSetError,
    StagedSetSupersededError,
    VersionOrderError,
    WeightFileError,
)
from .host_to_device import PinnedPipe
from .inputs import InputSpec, check_inputs
from .manifest import Manifest, TensorSpec, manifest_of, torch_dtype
from .packed import BlockPool, PackedBlock, PackedWeights, PackingIndex, check_packed, non_finite, views
from .probes import Probe, ProbeFailed, check_probe_outputs
from .threads import helpers
from .validation import check_weights, non_finite_error, parallel_checksums
from .weight_set import BufferPool, StagedSet, StagedState, WeightSet
from .weights import WeightsLike, fill_tied, load_weights

# Inputs that arrive through Ray, and shared-mode weights, are read-only arrays, and nothing here
# writes to them. A process-wide filter, not catch_warnings (which is not thread-safe), limited to
# the warnings this module triggers.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning,
                        module=__name__)


@dataclass
class InferResult:
    """Outputs of one call (numpy arrays; bf16 outputs widened to float32) and their version."""

    outputs: list[np.ndarray]
    version: int


@dataclass
class MemoryReport:
    """Bytes held by the engine's weight sets, beyond and including the live set.

    ``previous_bytes`` and ``staged_bytes`` count only buffers the engine allocated; borrowed
    tensors (shared mode) are ``borrowed_bytes``, outside the memory budget."""

    live_bytes: int
    previous_bytes: int
    staged_bytes: int
    pool_bytes: int
    borrowed_bytes: int = 0  # of the sets above, held but lent by the caller (shared mode)

    @property
    def extra_bytes(self) -> int:
        return self.previous_bytes + self.staged_bytes + self.pool_bytes


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def check_version_number(version: object, what: str = "version") -> int:
    """``version`` as an ``int`` if it is an integer in ``[0, 2**63)``, else InvalidVersionError."""
    if isinstance(version, (bool, np.bool_)) or not isinstance(version, numbers.Integral):
        raise InvalidVersionError(f"{what} {version!r} is not an integer ({type(version).__name__})")
    value = int(version)
    if not 0 <= value <= MAX_VERSION:
        raise InvalidVersionError(f"{what} {version!r} is outside [0, 2**63)")
    return value


class Engine:
    """One program, one device, a live weight set and the sets staged to replace it."""

    def __init__(self, backend: Backend, weights: Mapping[str, torch.Tensor],
                 constants: Mapping[str, torch.Tensor], program_json: bytes,
                 config: BuilderConfig, version: int = 0, inputs: list[InputSpec] | None = None,
                 tied: list[list[str]] | None = None, graph_json: str | None = None) -> None:
        self.config = config
        self._graph_json = graph_json
        self._tied = [list(g) for g in tied or []]
        self._tied_names = frozenset(n for g in self._tied for n in g)
        self._inputs = list(inputs) if inputs is not None else None
        self.backend = backend
        # where inputs and weight buffers live: the card for torch, host memory for backends
        # (MagicMind) that take host buffers and manage the device themselves
        self.device = getattr(backend, "tensor_device", config.device)
        self._program_json = program_json
        self._constants = dict(constants)
        self._manifest: Manifest = manifest_of(weights)
        self._packing = PackingIndex(self._manifest)
        self._ids = count(1)
        self._token = object()  # marks the staged sets this engine made
        self._cond = threading.Condition(threading.Lock())
        self._refit_lock = threading.RLock()
        self._writer_waiting = False
        self._pool = BufferPool()
        self._blocks = BlockPool()  # packed blocks of retired sets (engines.packed)
        self.allocated_bytes = 0  # staging buffers allocated because the pool had none to reuse
        self._pipe = (PinnedPipe(self.device) if config.host_to_device == "pinned"
                      and device_kind(str(self.device)) == "cuda" else None)
        self._staged: dict[int, StagedSet] = {}
        self._draining: list[WeightSet] = []  # retired sets that still have readers
        device_tensors = {n: backend.to_device(t.contiguous()) for n, t in weights.items()}
        backend.synchronize()
        self._live = WeightSet(next(self._ids), version, device_tensors, backend.bind(device_tensors))
        self._previous: WeightSet | None = None
        self.last_swap_ns = 0

    # ---------------------------------------------------------------- serving

    @property
    def version(self) -> int:
        """The live set's version."""
        return self._live.version

    def manifest(self) -> dict[str, TensorSpec]:
        """Name -> shape and dtype of every refittable weight."""
        return dict(self._manifest)

    def tied_weights(self) -> list[list[str]]:
        """Groups of names the model ties (one tensor, e.g. GPT-2's ``lm_head.weight`` and
        ``transformer.wte.weight``): a refit giving one name of a group refits them all."""
        return [list(g) for g in self._tied]

    def input_specs(self) -> list[InputSpec]:
        """Each input, in order: name, dtype, and shape (sizes and dynamic dims with their ranges)."""
        return list(self._inputs or [])

    def check_inputs(self, *inputs: Any) -> None:
        """Raise the ``InputError`` naming the first input that does not fit ``input_specs()``."""
        if self._inputs is not None:
            check_inputs(self._inputs, inputs)

    def infer(self, *inputs: Any) -> InferResult:
        """Run the program on the live set. Inputs: numpy arrays or tensors (or one list of them),
        checked against ``input_specs()`` first: ``InputError`` names the one that does not fit."""
        if len(inputs) == 1 and isinstance(inputs[0], (list, tuple)):
            inputs = tuple(inputs[0])
        self.check_inputs(*inputs)
        device = self.device
        args = [self._to_input(x, device) for x in inputs]
        ws, version = self._acquire()
        try:
            with torch.inference_mode():
                outs = ws.program(args)
                outputs = [self._to_numpy(o, ws) for o in outs]
        finally:
            self._release(ws)
        return InferResult(outputs, version)

    @staticmethod
    def _to_input(x: Any, device: str) -> torch.Tensor:
        t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
        return t if device == "cpu" else t.to(device, non_blocking=True)

    @staticmethod
    def _to_numpy(o: torch.Tensor, ws: WeightSet) -> np.ndarray:
        if o.dtype in (torch.bfloat16,):
            o = o.float()
        o = o.detach().cpu()
        arr = o.numpy()
        if o.untyped_storage().data_ptr() in ws.storage_ptrs:
            arr = arr.copy()  # an output aliasing a weight must not outlive the reader count
        return arr

    def _acquire(self) -> tuple[WeightSet, int]:
        with self._cond:
            while self._writer_waiting:
                self._cond.wait()
            ws = self._live
            ws.readers += 1
            return ws, ws.version

    def _release(self, ws: WeightSet) -> None:
        with self._cond:
            ws.readers -= 1
            if ws.readers == 0:
                if ws.retired:
                    self._draining.remove(ws)
                    self._reclaim_locked(ws)
                if self._writer_waiting:
                    self._cond.notify_all()

    # ---------------------------------------------------------------- staging

    def _check_refittable(self) -> None:
        if not self.config.enable_refit:
            raise RefitDisabledError(
                "this engine was built without enable_refit=True; its weights cannot be refit"
            )

    def stage(self, weights: WeightsLike, version: int, *, strip_prefix: str | None = None,
              add_prefix: str | None = None, mapping: Mapping[str, str] | None = None,
              borrow: bool = False, values_checked: bool = False,
              checksums: Mapping[str, str] | None = None, verified: Collection[str] = (),
              adopt: Collection[str] = (), packed: Sequence[PackedWeights] = ()) -> StagedSet:
        """Validate ``weights`` (a subset is fine) and copy them into spare buffers as ``version``.

        ``borrow=True`` says the tensors will never change: in ``shared`` mode the set then holds
        them instead of copies (other modes copy regardless). ``values_checked=True`` says these
        exact bytes were already refused if non-finite (the fleet's caller checks them, and
        ``checksums`` proves they are the bytes it checked): names, shapes and dtypes are still
        checked here. With ``checksums`` every staged tensor must match its entry (xxh3,
        ``engines.checksum``), checked as it is copied (one pass over the bytes); a tensor without
        one raises ``ChecksumMissing`` and a mismatch ``ChecksumMismatch``, and nothing is staged.
        ``verified`` names tensors the caller has already matched to their ``checksums`` entries
        (hashed where it holds them): they are copied without hashing again. ``adopt`` names
        tensors that are buffers ``prestage`` gave out (swap mode): they are staged as they are,
        without a copy, and belong to this engine from the call on, whatever it raises.
        ``packed`` (``engines.packed``): more weights, lying in one host buffer each (names not in
        ``weights``; ``strip_prefix``, ``add_prefix`` and ``mapping`` do not apply to them); in
        ``swap`` mode on the CPU each buffer is staged with one copy."""
        try:
            self._check_refittable()
            version = check_version_number(version)
            self._check_version(version, self._live)  # again under the lock; this one spares a read
            tensors = load_weights(weights, strip_prefix=strip_prefix, add_prefix=add_prefix,
                                   mapping=mapping, expect=self._manifest)
            packed = self._check_packed(packed, tensors)
            tensors = fill_tied(tensors, self._tied)
            policy = NonFinitePolicy.ALLOW if values_checked else self.config.non_finite
            check_weights(tensors, self._manifest, policy)
            if policy is NonFinitePolicy.REJECT:
                self._check_packed_values(packed)
            if checksums is not None:
                if missing := [n for n in [*tensors, *(n for p in packed for n in p.offsets)]
                               if n not in checksums]:
                    raise ChecksumMissing(missing[0], f"staging version {version}")
                for p in packed:  # hashed where they lie: the caller's buffer does not change
                    raw = memoryview(p.buffer.numpy())
                    for name, (start, nbytes) in p.offsets.items():
                        if name not in verified:
                            _check(name, checksums, bytes_checksum(raw[start:start + nbytes]), version)
                checksums = {n: c for n, c in checksums.items() if n in tensors and n not in verified}
            if adopt and self.config.memory_mode is not MemoryMode.SWAP:
                raise EngineError(f"only a swap-mode engine adopts prestaged buffers, this one is "
                                  f"{self.config.memory_mode.value}")
        except BaseException:
            if adopt and isinstance(weights, Mapping):
                self.release_prestaged({n: weights[n] for n in adopt if n in weights})
            raise
        return self._stage_tensors(tensors, version, borrow, checksums, frozenset(adopt), packed)

    def _check_packed(self, packed: Sequence[PackedWeights],
                      tensors: dict[str, torch.Tensor]) -> list[PackedWeights]:
        """Check every packed entry against the manifest (``engines.packed.check_packed``) and
        that no weight is given twice. Returns the buffers to stage as blocks; where this engine
        stages none (another mode, a card, a memory budget, a tied weight among them), their views
        go into ``tensors`` instead, as ordinary weights (borrowed, in shared mode)."""
        if not packed:
            return []
        given = set(tensors)
        for p in packed:
            check_packed(p, self._packing)
            if twice := sorted(given.intersection(p.offsets)):
                raise WeightFileError(f"weight {twice[0]!r} is given twice", name=twice[0])
            given.update(p.offsets)
        as_blocks = (self.config.memory_mode is MemoryMode.SWAP and self.device == "cpu"
                     and self.config.memory_budget_bytes is None
                     and all(self._tied_names.isdisjoint(p.offsets) for p in packed))
        if as_blocks:
            return list(packed)
        for p in packed:
            tensors.update(views(p.buffer, p.offsets, self._manifest))
        return []

    def _check_packed_values(self, packed: Sequence[PackedWeights]) -> None:
        """``NonFiniteWeightError`` naming the first packed weight holding a NaN or an infinity."""
        def dtype_of(name: str) -> torch.dtype:
            return torch_dtype(self._manifest[name].dtype)

        for p in packed:
            if bad := non_finite(p.buffer, p.offsets, dtype_of):
                first = next(n for n in p.offsets if n in bad)
                tensor = views(p.buffer, {first: p.offsets[first]}, self._manifest)[first]
                raise non_finite_error(first, tensor)

    def prestage(self, tensors: Mapping[str, torch.Tensor], *,
                 checksum: bool) -> dict[str, tuple[torch.Tensor, str | None]] | None:
        """Copies of ``tensors`` (names, shapes and dtypes checked against the manifest) in spare
        buffers, for a later ``stage(..., adopt=...)``: ``name -> (buffer, checksum)``, each buffer
        hashed as it is copied when ``checksum`` (else None). None where this engine does not
        prestage: ``copy`` and ``shared`` mode, or a ``memory_budget_bytes`` (buffers handed out
        are outside the budget's count). Raises the engine's errors naming the tensor."""
        if self.config.memory_mode is not MemoryMode.SWAP or self.config.memory_budget_bytes is not None:
            return None
        self._check_refittable()
        check_weights(dict(tensors), self._manifest, NonFinitePolicy.ALLOW)
        return self._copies(tensors, tensors.keys() if checksum else ())

    def _copies(self, tensors: Mapping[str, torch.Tensor],
                hashed: Collection[str]) -> dict[str, tuple[torch.Tensor, str | None]]:
        """Each tensor copied into a spare buffer (a pooled one, else a new one): ``name ->
        (buffer, checksum)``, the checksum taken as it is copied for the names in ``hashed`` (on a
        card, of the host copy before it goes), else None. Large CPU tensors are copied on the
        helper threads, at their priority below the serving threads'. On any error every buffer
        filled goes back to the pool."""
        out: dict[str, tuple[torch.Tensor, str | None]] = {}
        jobs: list[tuple[str, torch.Tensor, Future[str | None]]] = []
        try:
            for name, src in tensors.items():
                buf = self._pool.take(tuple(src.shape), src.dtype, self.device)
                if buf is None:
                    buf = torch.empty(src.shape, dtype=src.dtype, device=self.device)
                    self.allocated_bytes += _nbytes(buf)
                if buf.device.type == "cpu" and _nbytes(src) >= _PARALLEL_BYTES:  # at the helpers' priority
                    copy = copy_and_checksum if name in hashed else _copy_only
                    jobs.append((name, buf, helpers().submit(copy, buf, src)))
                elif name in hashed and buf.device.type == "cpu":
                    out[name] = (buf, copy_and_checksum(buf, src))
                else:
                    got = tensor_checksum(src) if name in hashed else None
                    if self._through_pipe(buf, src):
                        self._pipe.copy(buf, src)  # type: ignore[union-attr]
                    else:
                        buf.copy_(src, non_blocking=src.is_pinned())
                    out[name] = (buf, got)
            for name, buf, job in jobs:
                out[name] = (buf, job.result())
            jobs = []
            self.backend.synchronize()
        except BaseException:
            wait([job for _, _, job in jobs])  # no buffer goes back to the pool while a copy writes it
            self.release_prestaged({n: b for n, (b, _) in out.items()}
                                   | {n: b for n, b, _ in jobs if n not in out})
            raise
        return out

    def _through_pipe(self, buf: torch.Tensor, src: torch.Tensor) -> bool:
        """Whether a copy onto the card goes through the pinned pipe: a large, contiguous tensor
        in pageable host memory (``engines.host_to_device``)."""
        return (self._pipe is not None and buf.device.type != "cpu" and src.device.type == "cpu"
                and not src.is_pinned() and src.is_contiguous() and _nbytes(src) >= _PARALLEL_BYTES)

    def release_prestaged(self, buffers: Mapping[str, torch.Tensor]) -> None:
        """Give back buffers ``prestage`` handed out and no ``stage`` adopted (to the pool)."""
        for buf in buffers.values():
            self._pool.put(buf)

    def check_probes(self, staged: StagedSet, probes: Sequence[Probe]) -> None:
        """Run each probe on ``staged`` (never on the live set; a ``max_drift`` probe also on the
        live set, for comparison) and raise ``ProbeFailed`` naming the first that fails, its output
        index, the max |diff| and the tolerance (``engines.probes``). Needs a staged set of
        ``swap`` or ``shared`` mode (``copy`` mode stages in host memory, where nothing runs)."""
        ws = staged.weight_set
        if ws is None or staged.owner is not self._token:
            raise EngineError("probes run on a staged set of this engine in memory_mode swap or shared "
                              "(copy mode stages in host memory, where the program cannot run)")
        for probe in probes:
            try:
                self.check_inputs(*probe.inputs)
            except InputError as exc:
                raise ProbeFailed(probe.name, f"probe {probe.name!r}: {exc}") from None
            args = [self._to_input(x, self.device) for x in probe.inputs]
            with torch.inference_mode():
                outputs = [np.array(self._to_numpy(o, ws)) for o in ws.program(args)]
            live = self.infer(*probe.inputs).outputs if probe.needs_live else None
            if why := check_probe_outputs(probe, outputs, live):
                raise ProbeFailed(probe.name, why)

    def stage_retained(self, from_version: int, version: int) -> StagedSet:
        """Stage ``version`` as the weights of a set still held (live or previous): no copy."""
        self._check_refittable()
        from_version = check_version_number(from_version, "from_version")
        version = check_version_number(version)
        with self._refit_lock:
            base = self._live
            self._check_version(version, base)
            source = next((s for s in (self._live, self._previous)
                           if s is not None and s.version == from_version), None)
            if source is None or self.config.memory_mode is MemoryMode.COPY:
                raise NotRetainedError(f"version {from_version} is not held by this engine "
                                       f"(live {self._live.version}, previous "
                                       f"{self._previous.version if self._previous else None})")
            ws = WeightSet(next(self._ids), version, dict(source.tensors), source.program,
                           source.borrowed, source.blocks)
            staged = StagedSet(version=version, names=(), nbytes=0, base_id=base.set_id, stage_s=0.0,
                               weight_set=ws, base_version=base.version, owner=self._token)
            with self._cond:
                self._staged[id(staged)] = staged
            return staged

    def retained_versions(self) -> list[int]:
        """Versions this engine can re-stage without new weights (live, then previous)."""
        return [s.version for s in (self._live, self._previous) if s is not None]

    @staticmethod
    def _check_version(version: int, base: WeightSet) -> None:
        if version <= base.version:
            raise VersionOrderError(f"version {version} is not newer than the live version {base.version}")

    def _stage_tensors(self, tensors: Mapping[str, torch.Tensor], version: int,
                       borrow: bool = False, checksums: Mapping[str, str] | None = None,
                       adopt: frozenset[str] = frozenset(),
                       packed: Sequence[PackedWeights] = ()) -> StagedSet:
        t0 = time.perf_counter()
        with self._refit_lock:
            base = self._live
            try:
                self._check_version(version, base)
            except BaseException:
                self.release_prestaged({n: tensors[n] for n in adopt if n in tensors})
                raise
            need = sum(_nbytes(t) for t in tensors.values()) + sum(p.buffer.numel() for p in packed)
            if self.config.memory_mode is MemoryMode.COPY:
                staged = self._stage_copy(tensors, version, base, need, checksums)
            elif borrow and self.config.memory_mode is MemoryMode.SHARED:
                staged = self._stage_borrowed(tensors, version, base, checksums)
            else:
                staged = self._stage_swap(tensors, version, base, need, checksums, adopt, packed)
            staged.stage_s = time.perf_counter() - t0
            with self._cond:
                self._staged[id(staged)] = staged
            return staged

    def _stage_swap(self, tensors: Mapping[str, torch.Tensor], version: int, base: WeightSet,
                    need: int, checksums: Mapping[str, str] | None,
                    adopt: frozenset[str] = frozenset(),
                    packed: Sequence[PackedWeights] = ()) -> StagedSet:
        new_tensors = dict(base.tensors)
        for name in adopt:  # owned by the set from here: pooled below if staging fails
            new_tensors[name] = tensors[name]
        blocks: list[PackedBlock] = []
        try:
            self._make_room(lambda: need - self._pool.reusable_bytes(tensors.values(), self.device))
            for name in adopt:
                if checksums is not None and name in checksums:  # prestaged without a hash
                    _check(name, checksums, tensor_checksum(tensors[name]), version)
            copies = self._copies({n: t for n, t in tensors.items() if n not in adopt}, checksums or ())
            for name, (buf, _) in copies.items():
                new_tensors[name] = buf
            for name, (_, got) in copies.items():
                if got is not None:
                    _check(name, checksums or {}, got, version)
            for p in packed:
                blocks.append(block := self._block_for(p))
                if p.buffer.numel() >= _PARALLEL_BYTES:  # at the helpers' priority, as a large tensor
                    helpers().submit(_copy_only, block.data, p.buffer).result()
                else:
                    block.data.copy_(p.buffer)
                new_tensors.update(block.views)
            program = self.backend.bind(new_tensors)
        except BaseException:  # the copies made are pooled already if _copies raised
            for name in tensors:
                if new_tensors[name] is not base.tensors[name]:
                    self._pool.put(new_tensors[name])
            for block in blocks:
                self._blocks.put(block)
            raise
        kept = tuple(b for b in base.blocks if any(new_tensors[n] is v for n, v in b.views.items()))
        names = (*tensors, *(n for p in packed for n in p.offsets))
        ws = WeightSet(next(self._ids), version, new_tensors, program, base.borrowed - set(names),
                       kept + tuple(blocks))
        return StagedSet(version=version, names=names, nbytes=need, base_id=base.set_id,
                         stage_s=0.0, weight_set=ws, base_version=base.version, owner=self._token)

    def _block_for(self, packed: PackedWeights) -> PackedBlock:
        """A pooled block of ``packed``'s layout, else a new one (its views made once, here)."""
        layout = packed.layout()
        block = self._blocks.take(layout)
        if block is None:
            data = torch.empty(packed.buffer.numel(), dtype=torch.uint8, device=self.device)
            self.allocated_bytes += data.numel()
            block = PackedBlock(layout, data, views(data, packed.offsets, self._manifest))
        return block

    def _stage_borrowed(self, tensors: Mapping[str, torch.Tensor], version: int,
                        base: WeightSet, checksums: Mapping[str, str] | None) -> StagedSet:
        new_tensors = dict(base.tensors)
        if checksums:  # nothing is copied here: hash the large tensors on the helper threads
            got = parallel_checksums({n: t for n, t in tensors.items() if n in checksums})
            for name in tensors:
                if name in got:
                    _check(name, checksums, got[name], version)
        for name, src in tensors.items():
            new_tensors[name] = src if src.is_contiguous() else src.contiguous()
        program = self.backend.bind(new_tensors)
        ws = WeightSet(next(self._ids), version, new_tensors, program, base.borrowed | set(tensors))
        return StagedSet(version=version, names=tuple(tensors), nbytes=0, base_id=base.set_id,
                         stage_s=0.0, weight_set=ws, base_version=base.version, owner=self._token)

    def _stage_copy(self, tensors: Mapping[str, torch.Tensor], version: int, base: WeightSet,
                    need: int, checksums: Mapping[str, str] | None) -> StagedSet:
        self._make_room(lambda: need)
        pin = pinned_memory_available(self.device)
        host = {}
        for name, src in tensors.items():
            buf = torch.empty(src.shape, dtype=src.dtype, device="cpu", pin_memory=pin)
            if checksums is None or name not in checksums:
                buf.copy_(src)
            else:
                _check(name, checksums, copy_and_checksum(buf, src), version)
            host[name] = buf
        return StagedSet(version=version, names=tuple(tensors), nbytes=need, base_id=base.set_id,
                         stage_s=0.0, host=host, base_version=base.version, owner=self._token)

    def _make_room(self, new_bytes: Callable[[], int]) -> None:
        """Keep extra memory (previous + staged + pool + what this stage allocates) within the
        budget: first drop the pool, then the previous set; else refuse before allocating.
        ``new_bytes()`` is what the stage would allocate given the pool as it is now."""
        budget = self.config.memory_budget_bytes
        if budget is None:
            return
        if self.memory().extra_bytes + new_bytes() > budget:
            self._pool.clear()
        if self.memory().extra_bytes + new_bytes() > budget and self._previous is not None:
            self._retire(self._previous)
            self._previous = None
        extra, need = self.memory().extra_bytes, new_bytes()
        if extra + need > budget:
            raise MemoryBudgetError(
                f"staging needs {need} new bytes; {extra} already held beyond the live set; "
                f"budget {budget} bytes (memory_budget_bytes)"
            )

    # ---------------------------------------------------------------- commit / discard

    def commit(self, staged: StagedSet) -> int:
        """Make ``staged`` live; returns its version. Committing it twice returns the version again."""
        self._check_owned(staged)
        with self._refit_lock:
            if staged.state is StagedState.COMMITTED:
                return staged.version
            if staged.state is StagedState.DISCARDED:
                raise StagedSetDiscardedError(f"staged set of version {staged.version} was discarded")
            live = self._live
            if staged.base_id != live.set_id or staged.base_version != live.version:
                self._drop(staged)
                raise StagedSetSupersededError(
                    f"staged set of version {staged.version} was staged against version "
                    f"{staged.base_version}, but version {live.version} is live now; it was discarded"
                )
            if self.config.memory_mode is MemoryMode.COPY:
                self._commit_copy(staged, live)
            else:
                self._commit_swap(staged, live)
            staged.state = StagedState.COMMITTED
            with self._cond:
                self._staged.pop(id(staged), None)
            return staged.version

    def _commit_swap(self, staged: StagedSet, live: WeightSet) -> None:
        assert staged.weight_set is not None
        # One critical section for the swap and the bookkeeping: a set that stopped being live or
        # previous must be retired before any reader's release can reclaim another set, or that
        # reclaim would not see the set's tensors as held and would pool them under its readers.
        with self._cond:
            t0 = time.perf_counter_ns()
            self._live = staged.weight_set
            self.last_swap_ns = time.perf_counter_ns() - t0
            old_previous = self._previous
            if self.config.keep_previous:
                self._previous = live
            else:
                self._retire_locked(live)
            if old_previous is not None and old_previous is not self._previous:
                self._retire_locked(old_previous)

    def _commit_copy(self, staged: StagedSet, live: WeightSet) -> None:
        with self._cond:
            self._writer_waiting = True
            try:
                while live.readers > 0:
                    self._cond.wait()
                t0 = time.perf_counter_ns()
                for name, host in staged.host.items():
                    live.tensors[name].copy_(host, non_blocking=host.is_pinned())
                self.backend.synchronize()
                live.version = staged.version
                self.last_swap_ns = time.perf_counter_ns() - t0
            finally:
                self._writer_waiting = False
                self._cond.notify_all()
        staged.host = {}

    def discard(self, staged: StagedSet) -> None:
        """Free a staged set. Discarding twice is a no-op; a committed set cannot be discarded."""
        self._check_owned(staged)
        with self._refit_lock:
            if staged.state is StagedState.COMMITTED:
                raise StagedSetSupersededError(
                    f"staged set of version {staged.version} is committed; it cannot be discarded"
                )
            self._drop(staged)

    def _check_owned(self, staged: object) -> None:
        if not isinstance(staged, StagedSet):
            raise StagedSetError(
                f"expected a StagedSet from this engine's stage(), got {type(staged).__name__}")
        if staged.owner is not self._token:
            raise StagedSetError(f"staged set of version {staged.version} was not staged by this engine")

    def _drop(self, staged: StagedSet) -> None:
        if staged.state is StagedState.DISCARDED:
            return
        staged.state = StagedState.DISCARDED
        with self._cond:
            self._staged.pop(id(staged), None)
            if staged.weight_set is not None:
                self._retire_locked(staged.weight_set)
        staged.host = {}
        staged.weight_set = None

    def _retire(self, ws: WeightSet) -> None:
        with self._cond:
            self._retire_locked(ws)

    def _retire_locked(self, ws: WeightSet) -> None:
        ws.retired = True
        if ws.readers == 0:
            self._reclaim_locked(ws)
        else:
            self._draining.append(ws)

    def _reclaim_locked(self, ws: WeightSet) -> None:
        """Pool the buffers of a retired set that no other set shares: not the live, previous or
        staged sets, nor a retired set some reader still holds. Caller holds ``_cond``."""
        held = [self._live, self._previous, *self._draining]
        held += [s.weight_set for s in self._staged.values()]
        others = [s for s in held if s is not None and s is not ws]
        if self.config.memory_mode is not MemoryMode.SHARED:
            referenced = {id(t) for s in others for t in s.tensors.values()}
            in_blocks = {id(v) for b in ws.blocks for v in b.views.values()}
            for t in ws.tensors.values():
                if id(t) not in referenced and id(t) not in in_blocks:
                    self._pool.put(t)
            for block in ws.blocks:  # a block goes back whole, once no set holds a view of it
                if all(id(v) not in referenced for v in block.views.values()):
                    self._blocks.put(block)
        ws.tensors = {}
        ws.blocks = ()
        if all(s.program is not ws.program for s in others):  # stage_retained shares programs
            self.backend.recycle(ws.program)

    def drop_previous(self) -> None:
        """Release the previous set (for memory); instant rollback to it is then gone."""
        with self._refit_lock:
            if self._previous is not None:
                self._retire(self._previous)
                self._previous = None

    # ---------------------------------------------------------------- standalone refit

    def create_refitter(self) -> Refitter:
        """A MagicMind-style refitter: set named weights one by one, then ``refit()``."""
        self._check_refittable()
        return Refitter(self)

    def refit_now(self, weights: WeightsLike, **name_mapping: Any) -> int:
        """Stage and commit ``weights`` as the next version; returns it."""
        with self._refit_lock:
            staged = self.stage(weights, version=self._live.version + 1, **name_mapping)
            return self.commit(staged)

    # ---------------------------------------------------------------- inspection and files

    def weights(self, version: int | None = None) -> dict[str, torch.Tensor]:
        """The tensors of the live set (or of the retained set of ``version``), not copied."""
        if version is not None:
            version = check_version_number(version)
        with self._cond:
            for s in (self._live, self._previous):
                if s is not None and (version is None or s.version == version):
                    return dict(s.tensors)
        raise NotRetainedError(f"version {version} is not held by this engine")

    def prefill_pool(self, sets: int) -> int:
        """Allocate and touch ``sets`` spare copies of the live set's buffers into the reuse pool;
        returns the bytes added. Swap mode only (0 in copy mode).

        Why: the first refits after a load otherwise stage into freshly allocated memory, whose
        first touch ran at ~0.4 GB/s on this project's VMs (a 1 GiB stage took 1.8 s instead of
        0.2 s). With ``keep_previous`` the steady state holds live + previous + staged sets, so two
        spare sets cost no more memory than the third refit would take anyway. Stops early, without
        error, where ``memory_budget_bytes`` would be exceeded.
        """
        if self.config.memory_mode is not MemoryMode.SWAP or sets <= 0:
            return 0
        budget = self.config.memory_budget_bytes
        added = 0
        programs = []  # a program ready for each spare set, recycled once all are built
        with self._refit_lock:
            try:
                for _ in range(sets):
                    spare: dict[str, torch.Tensor] = {}
                    for name, t in self._live.tensors.items():
                        if budget is not None and self.memory().extra_bytes + _nbytes(t) > budget:
                            return added
                        spare[name] = torch.zeros_like(t)  # zeros: every page is touched now
                        self._pool.put(spare[name])
                        added += _nbytes(t)
                    programs.append(self.backend.bind(spare))
            finally:
                for program in programs:
                    self.backend.recycle(program)
                self.backend.synchronize()
        return added

    def memory(self) -> MemoryReport:
        """Bytes held: live set, previous set's own buffers, staged sets' own buffers, pool."""
        with self._cond:
            live_ids = {id(t) for t in self._live.tensors.values()}
            live = sum(_nbytes(t) for t in self._live.tensors.values())
            prev = 0
            sets = [self._live, self._previous, *(s.weight_set for s in self._staged.values())]
            borrowed = {id(t): _nbytes(t) for ws in sets if ws is not None
                        for n, t in ws.tensors.items() if n in ws.borrowed}
            if self._previous is not None:
                prev = sum(_nbytes(t) for t in self._previous.tensors.values()
                           if id(t) not in live_ids and id(t) not in borrowed)
            staged = sum(s.nbytes for s in self._staged.values())
            return MemoryReport(live, prev, staged, self._pool.nbytes + self._blocks.nbytes,
                                sum(borrowed.values()))

    def save(self, path: str | Path) -> None:
        """Write the program, manifest and live weights to one engine file (atomically).

        The live set is held as a reader, so the file holds exactly one version: in swap mode its
        buffers cannot be reused while held; in copy mode (commit writes in place) the weights are
        copied out under the hold and written after it, so commits wait only for the copy.
        """
        ws, version = self._acquire()
        try:
            tensors = dict(ws.tensors)
            if self.config.memory_mode is MemoryMode.COPY:
                tensors = {n: t.detach().to("cpu", copy=True) for n, t in tensors.items()}
                self._release(ws)
                ws = None
            write_engine_file(path, EngineFile(
                program_json=self._program_json,
                weights=tensors,
                constants=self._constants,
                version=version,
                builder_config=self.config.model_dump(mode="json"),
                backend=self.backend.name,
                inputs=None if self._inputs is None else [s.model_dump(mode="json") for s in self._inputs],
                tied=self._tied,
                graph_json=self._graph_json,
            ))
        finally:
            if ws is not None:
                self._release(ws)


class Refitter:
    """Collects named weights, each checked against the manifest as it is set, then refits.

    Mirrors MagicMind's ``IRefitter``: ``get_all_names``, ``set_named_weights``,
    ``get_missing_names`` (weights not set yet; a subset refit is allowed) and ``refit``, which
    stages and commits the collected weights as the engine's next version and returns it.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._pending: dict[str, torch.Tensor] = {}

    def get_all_names(self) -> list[str]:
        return list(self._engine.manifest())

    def set_named_weights(self, name: str, value: Any) -> None:
        tensors = load_weights({name: value}, expect=self._engine.manifest())
        check_weights(tensors, self._engine.manifest(), self._engine.config.non_finite)
        self._pending[name] = tensors[name]

    def get_missing_names(self) -> list[str]:
        return [n for n in self._engine.manifest() if n not in self._pending]

    def refit(self) -> int:
        version = self._engine.refit_now(self._pending)
        self._pending = {}
        return version


_PARALLEL_BYTES = 4 << 20  # CPU tensors from this size are copied (and verified) on the helper threads


def _copy_only(dst: torch.Tensor, src: torch.Tensor) -> None:
    dst.copy_(src)


def _check(name: str, checksums: Mapping[str, str], got: str, version: int) -> None:
    if got != checksums[name]:
        raise ChecksumMismatch(name, checksums[name], got, f"staging version {version}")
