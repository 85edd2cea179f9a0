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
        self.program = program
        self._spare: list[torch.nn.Module] = []
        self._spare_lock = threading.Lock()

    def recycle(self, program: BoundProgram) -> None:
        module = getattr(program, "module", None)
        if module is None:
            return
        with self._spare_lock:
            if len(self._spare) < self.MAX_SPARE_MODULES and all(m is not module for m in self._spare):
                self._spare.append(module)

    def bind(self, tensors: Mapping[str, torch.Tensor]) -> BoundProgram:
        with self._spare_lock:
            module = self._spare.pop() if self._spare else None
        if module is None:
            module = self.program.module()
        for name, tensor in tensors.items():
            owner_name, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            if leaf in owner._parameters:
                owner._parameters[leaf] = tensor  # type: ignore[assignment]
            elif leaf in owner._buffers:
                owner._buffers[leaf] = tensor
            else:
                raise KeyError(f"weight {name!r} has no slot in the exported program")

        def run(inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
            return pytree.tree_leaves(module(*inputs))

        run.module = module  # type: ignore[attr-defined]
        return run

    def synchronize(self) -> None:
        synchronize(self.device)
