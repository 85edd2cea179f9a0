"""The contract between the engine (weight sets, staging, commit) and what executes a program."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence

import torch

BoundProgram = Callable[[Sequence[torch.Tensor]], list[torch.Tensor]]


class Backend(ABC):
    """Executes one exported program on one device.

    ``bind(tensors)`` returns a callable that runs the program with exactly those weight tensors
    (a complete set, already on ``device``) and nothing else; it must not copy or keep references
    to other sets, so that two bound programs never read each other's weights. Calling a bound
    program from several threads at once must be safe. ``bind`` may be slow (a new module instance,
    or for backends without in-place refit a rebuilt engine); it runs off the serving path.
    """

    name: str = "base"

    def __init__(self, device: str) -> None:
        self.device = device

    @abstractmethod
    def bind(self, tensors: Mapping[str, torch.Tensor]) -> BoundProgram:
        """A callable running the program over ``tensors``."""

    def recycle(self, program: BoundProgram) -> None:
        """``program``'s weight set is retired and no reader or other set holds it: the backend may
        reuse what ``bind`` built for it (default: nothing to reuse)."""
        return None

    def to_device(self, host: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Copy a host tensor onto the device (into ``out`` when given)."""
        if out is None:
            out = torch.empty(host.shape, dtype=host.dtype, device=self.device)
        out.copy_(host, non_blocking=host.is_pinned())
        return out

    def synchronize(self) -> None:
        """Wait for copies queued on the device to finish (nothing to wait for on the CPU)."""
        return None
