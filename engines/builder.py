"""Building an engine from a PyTorch module, and loading one from its file."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .backends import make_backend
from .config import BuilderConfig
from .engine import Engine
from .engine_file import deserialize_program, read_engine_file, serialize_program


def _example(x: Any) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))


def build_engine(module: torch.nn.Module, example_inputs: Sequence[Any],
                 config: BuilderConfig | None = None) -> Engine:
    """Export ``module`` with ``torch.export`` and build an engine on ``config.device``.

    The refittable weights are the exported program's parameters and persistent buffers; other
    tensors the program holds are constants. The program is serialized once here, so a model that
    cannot be saved fails at build time, not at ``save``.
    """
    config = config or BuilderConfig()
    program = torch.export.export(module.eval(), tuple(_example(x) for x in example_inputs))
    program_json = serialize_program(program)
    weights = {n: t.detach() for n, t in program.state_dict.items()}
    constants = {n: t for n, t in program.constants.items() if isinstance(t, torch.Tensor)}
    backend = make_backend(config, program)
    return Engine(backend, weights, constants, program_json, config)


def load_engine(path: str | os.PathLike, device: str | None = None, **overrides: Any) -> Engine:
    """Load an engine file onto ``device`` (default: the device it was built for).

    ``overrides`` replace fields of the saved ``BuilderConfig`` (e.g. ``memory_mode="copy"``).
    Nothing is unpickled: the program is JSON and the weights are raw safetensors bytes. Anything
    wrong with the file is an ``EngineFileError`` naming it; a bad override is pydantic's
    ``ValidationError`` (a ``ValueError``), as for ``BuilderConfig`` itself.
    """
    ef = read_engine_file(path)
    fields = dict(ef.builder_config)
    if device is not None:
        fields["device"] = device
    fields.update(overrides)
    config = BuilderConfig(**fields)
    program = deserialize_program(ef.program_json, ef.weights, ef.constants, source=str(path))
    backend = make_backend(config, program)
    return Engine(backend, ef.weights, ef.constants, ef.program_json, config, version=ef.version)
