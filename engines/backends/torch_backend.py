"""The default backend: a ``torch.export`` program run by PyTorch on cpu, cuda or mlu."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch.utils import _pytree as pytree

from ..devices import device_kind, ensure_device, synchronize
from ..program_graph import FlatProgram, flat_program_of
from .base import Backend, BoundProgram


class TorchBackend(Backend):
    """Runs a program's flat graph (``engines.program_graph``): a weight set's tensors are the
    graph's leading arguments, so every set shares the one graph, binding a set builds nothing,
    and calls on different sets cannot read each other's weights.

    ``program`` is an ``ExportedProgram`` (moved to ``device`` first when that is not the CPU) or
    a ``FlatProgram`` already on ``device`` (``engines.program_graph.decode_graph``). Neither
    keeps a copy of the weights the program was built or loaded with, and a retired set's program
    holds none of its tensors (``recycle``).
    """

    name = "torch"

    def __init__(self, program: torch.export.ExportedProgram | FlatProgram, device: str) -> None:
        super().__init__(device)
        ensure_device(device)
        if not isinstance(program, FlatProgram):
            if device_kind(device) != "cpu":
                from torch.export.passes import move_to_device_pass

                program = move_to_device_pass(program, torch.device(device))
            program = flat_program_of(program)
        self.program = program

    def bind(self, tensors: Mapping[str, torch.Tensor]) -> BoundProgram:
        module = self.program.module
        leading = self.program.arguments(tensors)

        def run(inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
            return pytree.tree_leaves(module(*leading, *inputs))

        run.leading = leading  # type: ignore[attr-defined]
        return run

    def recycle(self, program: BoundProgram) -> None:
        """A retired set's program lets go of its tensors at once, wherever the set itself is
        still referenced (``shared`` mode then frees the object-store copy)."""
        leading = getattr(program, "leading", None)
        if leading is not None:
            leading.clear()

    def synchronize(self) -> None:
        synchronize(self.device)
