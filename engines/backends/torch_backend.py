"""The default backend: a ``torch.export`` program run by PyTorch on cpu, cuda or mlu."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch.utils import _pytree as pytree

from ..devices import device_kind, ensure_device, synchronize
from .base import Backend, BoundProgram


class TorchBackend(Backend):
    """Runs an ``ExportedProgram``; each weight set gets its own module instance.

    A bound program is a fresh ``GraphModule`` from ``ExportedProgram.module()`` whose parameter
    and buffer slots point at the set's tensors. Sets therefore never share a module object, so
    concurrent calls on different sets cannot tear each other's reads (``functional_call`` would:
    it swaps tensors on one shared module), and a call costs what calling the module costs.
    """

    name = "torch"

    def __init__(self, program: torch.export.ExportedProgram, device: str) -> None:
        super().__init__(device)
        ensure_device(device)
        if device_kind(device) != "cpu":
            from torch.export.passes import move_to_device_pass

            program = move_to_device_pass(program, torch.device(device))
        self.program = program

    def bind(self, tensors: Mapping[str, torch.Tensor]) -> BoundProgram:
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
