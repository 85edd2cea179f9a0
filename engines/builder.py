"""Building an engine from a PyTorch module, and loading one from its file."""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .backends import make_backend
from .config import BuilderConfig
from .devices import device_kind
from .engine import Engine
from .engine_file import deserialize_program, read_engine_file, serialize_program, tied_groups
from .inputs import InputSpec, dim_names_of, input_specs_of
from .program_graph import FlatProgram, decode_graph, encode_graph


def _example(x: Any) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))


def build_engine(module: torch.nn.Module, example_inputs: Sequence[Any],
                 config: BuilderConfig | None = None, *, dynamic_shapes: Any = None) -> Engine:
    """Export ``module`` with ``torch.export`` and build an engine on ``config.device``.

    The refittable weights are the exported program's parameters and persistent buffers; other
    tensors the program holds are constants. The program is serialized once here, so a model that
    cannot be saved fails at build time, not at ``save``.

    ``dynamic_shapes`` is ``torch.export``'s own spec (``torch.export.Dim("batch", min=1,
    max=64)`` on the dims that vary); ``config.dynamic_batch=(lo, hi)`` is the shorthand for a
    batch dim 0 shared by every input. A dynamic dim whose example size is 0 or 1 is traced with
    the example repeated to size 2 (``torch.export`` would otherwise take the 1 for a constant).
    The engine records each input's spec (``Engine.input_specs()``) and checks requests against it,
    and the weights the module ties (one tensor under several names, ``Engine.tied_weights()``).
    """
    config = config or BuilderConfig()
    examples = tuple(_example(x) for x in example_inputs)
    if dynamic_shapes is None and config.dynamic_batch is not None:
        lo, hi = config.dynamic_batch
        batch = torch.export.Dim("batch", min=lo, max=hi)
        dynamic_shapes = tuple({0: batch} if x.dim() > 0 else None for x in examples)
    dim_names = dim_names_of(dynamic_shapes, _arg_names(module, len(examples)))
    program = torch.export.export(module.eval(), _widened(examples, dim_names),
                                  dynamic_shapes=dynamic_shapes)
    program_json = serialize_program(program)
    weights = {n: t.detach() for n, t in program.state_dict.items()}
    constants = {n: t for n, t in program.constants.items() if isinstance(t, torch.Tensor)}
    inputs = input_specs_of(program, dim_names)
    backend = make_backend(config, program)
    return Engine(backend, weights, constants, program_json, config, inputs=inputs, tied=tied_groups(weights),
                  graph_json=encode_graph(program, program_json))


def _arg_names(module: torch.nn.Module, n: int) -> list[str]:
    params = [p for p in inspect.signature(module.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return [p.name for p in params[:n]]


def _widened(examples: tuple[torch.Tensor, ...],
             dynamic: dict[tuple[int, int], str]) -> tuple[torch.Tensor, ...]:
    """The examples with every dynamic dim of size 0 or 1 repeated to size 2."""
    out = list(examples)
    for (i, d), _ in sorted(dynamic.items()):
        x = out[i]
        if d < x.dim() and x.shape[d] < 2:
            shape = list(x.shape)
            shape[d] = 2
            out[i] = x.new_zeros(shape) if x.shape[d] == 0 else torch.cat([x, x], dim=d)
    return tuple(out)


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
    graph_json = ef.graph_json
    if graph_json is not None and ef.inputs is not None and config.backend == "torch" \
            and device_kind(config.device) == "cpu":  # the graph alone: no torch.export deserializer
        program: torch.export.ExportedProgram | FlatProgram = decode_graph(
            graph_json, ef.program_json, ef.weights, ef.constants, source=str(path))
    else:
        program = deserialize_program(ef.program_json, ef.weights, ef.constants, source=str(path))
        if graph_json is None:  # a file from before graphs were written: saved again, it has one
            graph_json = encode_graph(program, ef.program_json)
    inputs = [InputSpec.model_validate(s) for s in ef.inputs] if ef.inputs is not None \
        else input_specs_of(program)  # a file from before inputs were recorded: read the program
    backend = make_backend(config, program)
    return Engine(backend, ef.weights, ef.constants, ef.program_json, config, version=ef.version,
                  inputs=inputs, tied=ef.tied, graph_json=graph_json)
