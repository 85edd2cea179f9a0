"""The engine file: one ``.safetensors`` file holding the program, the manifest and the weights.

Layout: tensors are the refittable weights under their names and the program's non-refittable
constants under ``__const__.<name>``; the header's string metadata holds ``format``, the
``torch.export`` program serialized as JSON (no pickle), the refittable names, the weight version
and the build configuration, and (``graph``, for most programs) the program's flat graph as JSON,
which a CPU engine loads without ``torch.export``'s deserializer (``engines.program_graph``).
Loading parses JSON and reads raw tensor bytes: nothing is unpickled and the model's Python class
is not needed.

Reading refuses, with an ``EngineFileError`` naming the file and what is wrong (never a raw
``JSONDecodeError``/``KeyError``/``TypeError``): a path that is not a regular file (checked with
``os.stat`` before anything opens it), a truncated file or a lying safetensors header, missing
metadata keys, metadata of the wrong JSON shape or type (``refittable`` a list of names,
``version`` a decimal integer in ``[0, 2**63)``, ``builder_config`` an object ``BuilderConfig``
accepts, ``program`` a JSON object), tensors the ``refittable`` list does not account for, and
(in ``deserialize_program``) a program that cannot be rebuilt or whose weights' names, shapes or
dtypes are not the ones its graph was exported with.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import EngineError, EngineFileError
from .paths import check_regular_file

if TYPE_CHECKING:
    import torch

FORMAT = "weight-refit-engine"
FORMAT_VERSION = "1"
_CONST_PREFIX = "__const__."
_KEYS = ("format", "format_version", "backend", "program", "refittable", "version", "builder_config")
_VERSION_RE = re.compile(r"^(0|[1-9][0-9]{0,18})$")
MAX_VERSION = 2**63 - 1


@dataclass
class EngineFile:
    """The parts of an engine file, in memory."""

    program_json: bytes
    weights: dict[str, torch.Tensor]
    constants: dict[str, torch.Tensor]
    version: int
    builder_config: dict
    backend: str
    inputs: list[dict] | None = None  # the input specs (``engines.inputs.InputSpec`` as JSON)
    tied: list[list[str]] = field(default_factory=list)  # names of one tensor (``tied_groups``)
    graph_json: str | None = None  # the program's flat graph (``engines.program_graph``), where it has one


def serialize_program(program: torch.export.ExportedProgram) -> bytes:
    """The program as JSON bytes, without its weights, constants or example inputs."""
    from torch._export.serde.serialize import serialize

    art = serialize(program, serialize_state_dict=False, serialize_constants=False,
                    serialize_example_inputs=False)
    return art.exported_program


def deserialize_program(program_json: bytes, weights: dict[str, torch.Tensor],
                        constants: dict[str, torch.Tensor], *,
                        source: str = "<memory>") -> torch.export.ExportedProgram:
    """Rebuild the program from JSON and tensors already in memory (no ``torch.load``).

    EngineFileError naming ``source`` (the engine file) when the JSON is not a program, or when
    ``weights``/``constants`` are not exactly the tensors its graph takes (names, shapes, dtypes).
    """
    import torch
    from torch._export.serde.serialize import SerializedArtifact, deserialize

    from .program_graph import check_slots, slot_specs

    where = f"engine file {source!r}"
    try:
        params = set(_parameter_targets(json.loads(program_json)))
    except Exception as exc:
        raise EngineFileError(f"{where}: program is not a serialized torch.export program: "
                              f"{type(exc).__name__}: {exc}") from exc
    state = {n: (torch.nn.Parameter(t, requires_grad=False) if n in params else t)
             for n, t in weights.items()}
    try:
        program = deserialize(SerializedArtifact(program_json, state, dict(constants), b""))
    except Exception as exc:  # torch's deserializer raises whatever a malformed graph trips on
        raise EngineFileError(f"{where}: program cannot be rebuilt: {type(exc).__name__}: {exc}") from exc
    check_slots(slot_specs(program), weights, constants, where)
    return program


def _parameter_targets(program: Any) -> list[str]:
    """Names the program's signature declares as parameters (the rest are buffers)."""
    out = []
    for spec in program["graph_module"]["signature"]["input_specs"]:
        if "parameter" in spec:
            out.append(str(spec["parameter"]["parameter_name"]))
    return out


def write_engine_file(path: str | os.PathLike, ef: EngineFile) -> None:
    """Write atomically: a temp file beside ``path``, fsync'd, then renamed over it."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, t in ef.weights.items():  # safetensors refuses tensors that share memory
        t = t.detach().cpu().contiguous()
        where = (t.untyped_storage().data_ptr(), t.storage_offset())
        tensors[name] = t.clone() if where in seen and t.numel() else t
        seen.add(where)
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
    if ef.inputs is not None:
        metadata["inputs"] = json.dumps(ef.inputs)
    if ef.tied:
        metadata["tied"] = json.dumps(ef.tied)
    if ef.graph_json is not None:
        metadata["graph"] = ef.graph_json
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


@dataclass
class EngineMetadata:
    """An engine file's header: what ``read_engine_metadata`` checked, without reading tensors."""

    refittable: list[str]
    version: int
    builder_config: dict
    backend: str
    inputs: list[dict] | None = None  # None: a file written before inputs were recorded
    tied: list[list[str]] = field(default_factory=list)


def read_engine_metadata(path: str | os.PathLike) -> EngineMetadata:
    """The header of an engine file (format, names, version, build configuration), checked as
    ``read_engine_file`` checks it, without reading any tensor (nor importing torch)."""
    from safetensors import safe_open

    p = Path(path)
    where = f"engine file {str(p)!r}"
    check_regular_file(p, "engine file", EngineFileError)
    try:
        with safe_open(str(p), framework="numpy") as fh:
            meta = _checked_metadata(fh.metadata() or {}, where)
            _check_keys(list(fh.keys()), meta.refittable, where)
    except EngineError:
        raise
    except Exception as exc:
        raise EngineFileError(f"{where} is truncated or malformed: {exc}") from exc
    return meta


@dataclass(frozen=True)
class RawTensor:
    """A tensor as its bytes: shape, the manifest's dtype name, and the raw little-endian data."""

    shape: tuple[int, ...]
    dtype: str
    data: memoryview


def read_engine_weight_bytes(path: str | os.PathLike) -> dict[str, RawTensor]:
    """The refittable weights of an engine file as they lie in it (the file mapped read-only; no
    tensor library), after the checks of ``read_engine_metadata``; EngineFileError naming the
    file when its header does not describe them."""
    import mmap
    import struct

    meta = read_engine_metadata(path)
    where = f"engine file {str(path)!r}"
    with open(path, "rb") as fh:
        mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return raw_safetensors(memoryview(mapped), meta.refittable)
    except (KeyError, ValueError, TypeError, struct.error) as exc:
        raise EngineFileError(f"{where}: the weights do not match its header: {exc}") from None


def raw_safetensors(raw: memoryview, names: Iterable[str] | None = None) -> dict[str, RawTensor]:
    """The tensors ``names`` (every tensor, without) of a safetensors buffer as they lie in it, no
    tensor library; KeyError, ValueError, TypeError or ``struct.error`` when the header does not
    describe them (a name it lacks, a dtype or offsets that do not fit, a truncated buffer)."""
    import struct

    from .manifest import ITEMSIZE, SAFETENSORS_CODE

    name_of = {code: name for name, code in SAFETENSORS_CODE.items()}
    (hlen,) = struct.unpack_from("<Q", raw, 0)
    if 8 + hlen > len(raw):
        raise ValueError(f"its header of {hlen} bytes runs past the end ({len(raw)} bytes)")
    header = json.loads(bytes(raw[8:8 + hlen]))
    if not isinstance(header, dict):
        raise TypeError("its header is not a JSON object")
    base = 8 + hlen
    out = {}
    for name in (n for n in header if n != "__metadata__") if names is None else names:
        info = header[name]
        dtype = name_of[info["dtype"]]
        shape = tuple(int(d) for d in info["shape"])
        start, stop = (int(x) for x in info["data_offsets"])
        numel = 1
        for d in shape:
            numel *= d
        if not 0 <= start <= stop or stop - start != numel * ITEMSIZE[dtype] or base + stop > len(raw):
            raise ValueError(f"tensor {name!r}: its offsets do not fit its shape and dtype")
        out[name] = RawTensor(shape, dtype, raw[base + start:base + stop])
    return out


def _checked_metadata(meta: dict[str, str], where: str) -> EngineMetadata:
    if meta.get("format") != FORMAT:
        raise EngineFileError(f"{where} is not a weight-refit engine (no format tag)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise EngineFileError(
            f"{where}: format version {meta.get('format_version')!r} "
            f"is not supported (expected {FORMAT_VERSION})"
        )
    missing = [k for k in _KEYS if k not in meta]
    if missing:
        raise EngineFileError(f"{where}: metadata lacks {missing}")
    names = _refittable(meta["refittable"], where)
    version = _version(meta["version"], where)
    builder_config = _builder_config(meta["builder_config"], where)
    _program_object(meta["program"], where)
    return EngineMetadata(names, version, builder_config, meta["backend"], _inputs(meta.get("inputs"), where),
                          _tied(meta.get("tied"), names, where))


def tied_groups(weights: dict[str, torch.Tensor]) -> list[list[str]]:
    """Names that are one tensor (the same memory, shape and strides), in groups of two or more."""
    groups: dict[tuple, list[str]] = {}
    for name, t in weights.items():
        if t.numel():
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            groups.setdefault(key, []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def _tied(text: str | None, names: list[str], where: str) -> list[list[str]]:
    if text is None:
        return []
    groups = _json(text, "tied", where)
    known = set(names)
    if not isinstance(groups, list) or not all(
            isinstance(g, list) and len(g) > 1 and all(isinstance(n, str) and n in known for n in g)
            for g in groups):
        raise EngineFileError(f"{where}: metadata 'tied' is not a list of groups of refittable names")
    return groups


def _inputs(text: str | None, where: str) -> list[dict] | None:
    if text is None:
        return None
    from pydantic import ValidationError

    from .inputs import InputSpec

    specs = _json(text, "inputs", where)
    try:
        if not isinstance(specs, list):
            raise TypeError("not a list")
        return [InputSpec.model_validate(s).model_dump(mode="json") for s in specs]
    except (TypeError, ValidationError) as exc:
        raise EngineFileError(f"{where}: metadata 'inputs' is not a list of input specs: "
                              f"{str(exc).splitlines()[0]}") from None


def _check_keys(keys: list[str], names: list[str], where: str) -> None:
    unlisted = sorted(k for k in keys if not k.startswith(_CONST_PREFIX) and k not in names)
    if unlisted:
        raise EngineFileError(f"{where} holds tensors its refittable list does not name: {unlisted}")
    lacking = sorted(set(names) - set(keys))
    if lacking:
        raise EngineFileError(f"{where} lacks weights {lacking}")


def read_engine_file(path: str | os.PathLike) -> EngineFile:
    """Read an engine file; EngineFileError naming the file for anything wrong with it."""
    from safetensors import safe_open

    p = Path(path)
    where = f"engine file {str(p)!r}"
    check_regular_file(p, "engine file", EngineFileError)
    try:
        with safe_open(str(p), framework="pt", device="cpu") as fh:
            meta = fh.metadata() or {}
            header = _checked_metadata(meta, where)
            version, builder_config = header.version, header.builder_config
            keys = list(fh.keys())
            _check_keys(keys, header.refittable, where)
            weights: dict[str, torch.Tensor] = {}
            constants: dict[str, torch.Tensor] = {}
            for key in keys:
                if key.startswith(_CONST_PREFIX):
                    constants[key[len(_CONST_PREFIX):]] = fh.get_tensor(key)
                else:
                    weights[key] = fh.get_tensor(key)
    except EngineError:
        raise
    except Exception as exc:
        raise EngineFileError(f"{where} is truncated or malformed: {exc}") from exc
    for group in header.tied:  # one tensor again, as the model had it
        first = weights[group[0]]
        for name in group[1:]:
            if weights[name].shape == first.shape and weights[name].dtype == first.dtype:
                weights[name] = first
    return EngineFile(
        program_json=meta["program"].encode("utf-8"),
        weights=weights,
        constants=constants,
        version=version,
        builder_config=builder_config,
        backend=meta["backend"],
        inputs=header.inputs,
        tied=header.tied,
        graph_json=meta.get("graph"),
    )


def _json(text: str, key: str, where: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise EngineFileError(f"{where}: metadata {key!r} is not JSON: {exc}") from None


def _refittable(text: str, where: str) -> list[str]:
    names = _json(text, "refittable", where)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise EngineFileError(f"{where}: metadata 'refittable' must be a JSON list of names, "
                              f"got {text[:80]!r}")
    if len(set(names)) != len(names):
        raise EngineFileError(f"{where}: metadata 'refittable' names a weight twice")
    return names


def _version(text: str, where: str) -> int:
    if not _VERSION_RE.match(text) or int(text) > MAX_VERSION:
        raise EngineFileError(f"{where}: metadata 'version' must be a decimal integer in [0, 2**63), "
                              f"got {text[:80]!r}")
    return int(text)


def _builder_config(text: str, where: str) -> dict:
    from .config import BuilderConfig

    fields = _json(text, "builder_config", where)
    if not isinstance(fields, dict):
        raise EngineFileError(f"{where}: metadata 'builder_config' must be a JSON object, got {text[:80]!r}")
    try:
        BuilderConfig(**fields)
    except ValueError as exc:  # pydantic's ValidationError
        raise EngineFileError(
            f"{where}: metadata 'builder_config' is not a valid BuilderConfig: {exc}") from None
    return fields


def _program_object(text: str, where: str) -> None:
    program = _json(text, "program", where)
    if not isinstance(program, dict) or not isinstance(program.get("graph_module"), dict):
        raise EngineFileError(f"{where}: metadata 'program' is not a serialized torch.export program")
