"""Execution backends: ``torch`` (default) and ``magicmind`` (where Cambricon's SDK is installed)."""

from __future__ import annotations

import torch

from ..config import BuilderConfig
from ..program_graph import FlatProgram
from .base import Backend, BoundProgram


def make_backend(config: BuilderConfig, program: torch.export.ExportedProgram | FlatProgram) -> Backend:
    """The backend ``config.backend`` names, on ``config.device`` (MagicMind builds from an
    ``ExportedProgram`` only)."""
    if config.backend == "magicmind":
        from .magicmind import MagicMindBackend

        return MagicMindBackend(program, config.device)
    from .torch_backend import TorchBackend

    return TorchBackend(program, config.device)


__all__ = ["Backend", "BoundProgram", "make_backend"]
