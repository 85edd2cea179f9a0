"""The default backend: a ``torch.export`` program run by PyTorch on cpu, cuda or mlu."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

import torch
from torch.utils import _pytree as pytree

from ..devices import device_kind, ensure_device, synchronize
from .base import Backend, BoundProgram


class TorchBackend(Backend):
    """Runs an ``ExportedProgram``; each weight set gets its own module instance.

    A bound program is a ``GraphModule`` from ``ExportedProgram.module()`` whose parameter and
    buffer slots point at the set's tensors. Sets in use never share a module object, so
    concurrent calls on different sets cannot tear each other's reads (``functional_call`` would:
    it swaps tensors on one shared module), and a call costs what calling the module costs.

    Building a module (unlift + codegen) holds the GIL for milliseconds (3.5 ms for the 8-tensor
    benchmark model, more for bigger graphs) and so stalls every serving thread of the process
    while a refit stages. The engine therefore hands back the program of a retired set that no
    reader and no other set holds (``recycle``), and ``bind`` re-points that module's slots
    (microseconds) instead of building one.
    """

    MAX_SPARE_MODULES = 4

    name = "torch"

    def __init__(self, program: torch.export.ExportedProgram, device: str) -> None:
        super().__init__(device)
        ensure_device(device)
        if device_kind(device) != "cpu":
            from torch.export.passes import move_to_device_pass

            program = move_to_device_pass(program, torch.device(device))
        _drop_program_weights(program)
        self.program = program
        self._spare: list[tuple[torch.nn.Module, dict[str, tuple[dict, str]]]] = []
        self._spare_lock = threading.Lock()

    def recycle(self, program: BoundProgram) -> None:
        """Keep the module of a retired set for the next ``bind``, its weight slots emptied: a
        spare must not keep the retired tensors alive (shared mode frees them at once)."""
        module = getattr(program, "module", None)
        slots = getattr(program, "slots", None)
        if module is None or slots is None:
            return
        for table, leaf in slots.values():
            table[leaf] = None
        with self._spare_lock:
            if len(self._spare) < self.MAX_SPARE_MODULES and all(m is not module for m, _ in self._spare):
                self._spare.append((module, slots))

    def bind(self, tensors: Mapping[str, torch.Tensor]) -> BoundProgram:
        with self._spare_lock:
            module, slots = self._spare.pop() if self._spare else (None, None)
        if module is None or slots is None or slots.keys() != tensors.keys():
            module = self.program.module()
            slots = {name: _slot(module, name) for name in tensors}
        for name, tensor in tensors.items():
            table, leaf = slots[name]
            table[leaf] = tensor

        def run(inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
            return pytree.tree_leaves(module(*inputs))

        run.module = module  # type: ignore[attr-defined]
        run.slots = slots  # type: ignore[attr-defined]
        return run

    def synchronize(self) -> None:
        synchronize(self.device)


def _drop_program_weights(program: torch.export.ExportedProgram) -> None:
    """Replace the program's own copy of the weights by meta tensors of the same specs.

    ``bind`` points every weight slot of a module at a weight set's tensors, so the copy the
    program was rebuilt with is never read again; kept, it would hold a version 0 beside the
    engine's sets for the engine's whole life (a whole model per replica)."""
    state = program.state_dict
    for name, tensor in list(state.items()):
        meta = torch.empty_like(tensor, device="meta")
        state[name] = torch.nn.Parameter(meta, requires_grad=False) \
            if isinstance(tensor, torch.nn.Parameter) else meta


def _slot(module: torch.nn.Module, name: str) -> tuple[dict, str]:
    """The table (``_parameters`` or ``_buffers`` of the owning submodule) holding weight ``name``."""
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if leaf in owner._parameters:
        return owner._parameters, leaf
    if leaf in owner._buffers:
        return owner._buffers, leaf
    raise KeyError(f"weight {name!r} has no slot in the exported program")
