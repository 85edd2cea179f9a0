"""The engine file: one ``.safetensors`` file holding the program, the manifest and the weights.

Layout: tensors are the refittable weights under their names and the program's non-refittable
constants under ``__const__.<name>``; the header's string metadata holds ``format``, the
``torch.export`` program serialized as JSON (no pickle), the refittable names, the weight version
and the build configuration. Loading parses JSON and reads raw tensor bytes: nothing is unpickled
and the model's Python class is not needed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import EngineFileError

FORMAT = "weight-refit-engine"
FORMAT_VERSION = "1"
_CONST_PREFIX = "__const__."


@dataclass
class EngineFile:
    """The parts of an engine file, in memory."""

    program_json: bytes
    weights: dict[str, torch.Tensor]
    constants: dict[str, torch.Tensor]
    version: int
    builder_config: dict
    backend: str


def serialize_program(program: torch.export.ExportedProgram) -> bytes:
    """The program as JSON bytes, without its weights, constants or example inputs."""
    from torch._export.serde.serialize import serialize

    art = serialize(program, serialize_state_dict=False, serialize_constants=False,
                    serialize_example_inputs=False)
    return art.exported_program


def deserialize_program(program_json: bytes, weights: dict[str, torch.Tensor],
                        constants: dict[str, torch.Tensor]) -> torch.export.ExportedProgram:
    """Rebuild the program from JSON and tensors already in memory (no ``torch.load``)."""
    from torch._export.serde.serialize import SerializedArtifact, deserialize

    params = set(_parameter_targets(json.loads(program_json)))
    state = {n: (torch.nn.Parameter(t, requires_grad=False) if n in params else t)
             for n, t in weights.items()}
    return deserialize(SerializedArtifact(program_json, state, dict(constants), b""))


def _parameter_targets(program: dict) -> list[str]:
    """Names the program's signature declares as parameters (the rest are buffers)."""
    out = []
    for spec in program["graph_module"]["signature"]["input_specs"]:
        if "parameter" in spec:
            out.append(spec["parameter"]["parameter_name"])
    return out


def write_engine_file(path: str | os.PathLike, ef: EngineFile) -> None:
    """Write atomically: a temp file beside ``path``, fsync'd, then renamed over it."""
    from safetensors.torch import save_file

    tensors = {name: t.detach().cpu().contiguous() for name, t in ef.weights.items()}
    for name, t in ef.constants.items():
        tensors[_CONST_PREFIX + name] = t.detach().cpu().contiguous()
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "backend": ef.backend,
        "program": ef.program_json.decode("utf-8"),
        "refittable": json.dumps(sorted(ef.weights)),
        "version": str(ef.version),
        "builder_config": json.dumps(ef.builder_config),
    }
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_engine_file(path: str | os.PathLike) -> EngineFile:
    """Read an engine file; EngineFileError naming the file for anything wrong with it."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise EngineFileError(f"engine file {str(p)!r} does not exist")
    try:
        with safe_open(str(p), framework="pt", device="cpu") as fh:
            meta = fh.metadata() or {}
            if meta.get("format") != FORMAT:
                raise EngineFileError(f"engine file {str(p)!r} is not a weight-refit engine (no format tag)")
            if meta.get("format_version") != FORMAT_VERSION:
                raise EngineFileError(
                    f"engine file {str(p)!r}: format version {meta.get('format_version')!r} "
                    f"is not supported (expected {FORMAT_VERSION})"
                )
            names = json.loads(meta["refittable"])
            weights: dict[str, torch.Tensor] = {}
            constants: dict[str, torch.Tensor] = {}
            for key in fh.keys():  # noqa: SIM118  (safe_open is not a Mapping)
                if key.startswith(_CONST_PREFIX):
                    constants[key[len(_CONST_PREFIX):]] = fh.get_tensor(key)
                else:
                    weights[key] = fh.get_tensor(key)
    except EngineFileError:
        raise
    except Exception as exc:
        raise EngineFileError(f"engine file {str(p)!r} is truncated or malformed: {exc}") from exc
    missing = set(names) - set(weights)
    if missing:
        raise EngineFileError(f"engine file {str(p)!r} lacks weights {sorted(missing)}")
    return EngineFile(
        program_json=meta["program"].encode("utf-8"),
        weights=weights,
        constants=constants,
        version=int(meta.get("version", "0")),
        builder_config=json.loads(meta.get("builder_config", "{}")),
        backend=meta.get("backend", "torch"),
    )
