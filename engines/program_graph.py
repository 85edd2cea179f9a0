"""The flat program a torch backend runs, and its graph as plain JSON in the engine file.

``FlatProgram`` is an exported program's graph called as a function: its tensors first (the
weight set's weights and the program's constants, in ``slots`` order), then the user's inputs. A
weight set is a list of arguments, not a module of its own, so any number of sets share one
graph and binding a set builds nothing.

``encode_graph`` writes an exported program's graph as JSON, or returns None for a graph outside
what ``decode_graph`` rebuilds: nodes other than placeholders, registered torch operators
(``torch.ops``) and ``operator`` functions on sizes, or arguments other than nodes, numbers,
strings, None, dtypes, devices, layouts, memory formats and lists of these. ``decode_graph``
rebuilds the graph with ``torch.fx`` alone: a process that loads an engine this way never imports
``torch.export``'s deserializer, which imports ``torch._dynamo`` (most of a replica's start).
Nothing in the JSON is executed: targets are looked up by name among registered operators and
the functions listed in ``_OPERATORS``; anything else, or JSON of the wrong shape, is an
``EngineFileError`` naming the file.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import xxhash

from .errors import EngineError, EngineFileError

_OPERATORS = {f.__name__: f for f in (operator.getitem, operator.add, operator.sub, operator.mul,
                                      operator.floordiv, operator.truediv, operator.mod, operator.neg,
                                      operator.eq, operator.ne, operator.lt, operator.le, operator.gt,
                                      operator.ge)}
_ENUMS = {"dtype": torch.dtype, "layout": torch.layout, "memory_format": torch.memory_format}
_WEIGHT, _CONSTANT = "weight", "constant"


@dataclass(frozen=True)
class FlatProgram:
    """A graph taking ``slots`` (``(kind, name)``: a ``weight`` of the set or a ``constant`` of the
    program), then the user inputs; it returns the user outputs, flat."""

    module: torch.fx.GraphModule
    slots: tuple[tuple[str, str], ...]
    constants: dict[str, torch.Tensor] = field(default_factory=dict)

    def arguments(self, weights: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """The graph's leading arguments for a weight set (every weight the graph takes)."""
        return [weights[name] if kind == _WEIGHT else self.constants[name] for kind, name in self.slots]


def flat_program_of(program: torch.export.ExportedProgram) -> FlatProgram:
    """``program`` as a flat program. An ``EngineError`` names an input or output the engine cannot
    serve: one that is not a weight, a constant or a user tensor (an effect token, a script
    object), a weight that follows a user input, or an output that writes back into a buffer or
    an input (an engine's weights do not change while it serves)."""
    slots = []
    user_seen = False
    for spec in program.graph_signature.input_specs:
        kind = spec.kind.name
        if kind == "USER_INPUT":
            user_seen = True
            continue
        if _slot_kind(spec) is None or user_seen:
            raise EngineError(f"program input {spec.arg.name!r} ({kind}) is not a weight, constant or user "
                              "tensor the engine can pass")
        slots.append((_slot_kind(spec), str(spec.target)))
    for out in program.graph_signature.output_specs:
        if out.kind.name != "USER_OUTPUT":
            raise EngineError(f"program output {getattr(out.arg, 'name', out.arg)!r} writes {out.target!r} "
                              f"({out.kind.name}): an engine's weights and inputs do not change as it serves")
    constants = {n: t for n, t in program.constants.items() if isinstance(t, torch.Tensor)}
    return FlatProgram(program.graph_module, tuple(slots), constants)


def encode_graph(program: torch.export.ExportedProgram, program_json: bytes) -> str | None:
    """JSON of ``program``'s flat graph with the specs of its tensors and the checksum of
    ``program_json`` (the same program serialized), or None where the graph is outside what
    ``decode_graph`` rebuilds (or ``flat_program_of`` refuses it)."""
    try:
        flat_program_of(program)
        nodes = [_node(n) for n in program.graph.nodes]
    except (EngineError, _Unsupported):
        return None
    return json.dumps({"program": xxhash.xxh3_64_hexdigest(program_json), "slots": slot_specs(program),
                       "nodes": nodes}, separators=(",", ":"))


def slot_specs(program: torch.export.ExportedProgram) -> list[list[Any]]:
    """``[kind, name]`` of each weight and constant ``program`` takes, in order, with
    ``[shape, dtype]`` appended where the shape is static (what ``check_slots`` checks)."""
    nodes = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    return [[kind, str(spec.target), *_static_spec(nodes[spec.arg.name])]
            for spec in program.graph_signature.input_specs if (kind := _slot_kind(spec)) is not None]


def _slot_kind(spec: Any) -> str | None:
    """``weight``, ``constant``, or None for an input that is neither (a user input, a token)."""
    kind = spec.kind.name
    if kind == "CONSTANT_TENSOR" or (kind == "BUFFER" and spec.persistent is False):
        return _CONSTANT
    return _WEIGHT if kind in ("PARAMETER", "BUFFER") else None


def decode_graph(text: str, program_json: bytes, weights: Mapping[str, torch.Tensor],
                 constants: Mapping[str, torch.Tensor], *, source: str = "<memory>") -> FlatProgram:
    """The flat program ``encode_graph`` wrote, over the file's ``weights`` and ``constants``.

    ``EngineFileError`` naming ``source`` for JSON of the wrong shape, a graph not written from
    ``program_json`` (the file's program), a target that is not a registered operator or a listed
    function, or tensors that are not exactly the ones the graph takes (names, shapes, dtypes)."""
    where = f"engine file {source!r}"
    try:
        data = json.loads(text)
        if data["program"] != xxhash.xxh3_64_hexdigest(program_json):
            raise EngineFileError(f"{where}: metadata 'graph' was not written from its 'program'")
        for slot in data["slots"]:
            _check_slot(slot)
        slots = tuple((str(kind), str(name)) for kind, name, *_ in data["slots"])
        graph = torch.fx.Graph()
        env: dict[str, torch.fx.Node] = {}
        for node in data["nodes"]:
            _rebuild(graph, env, node)
        module = torch.fx.GraphModule(torch.nn.Module(), graph)
    except EngineFileError:
        raise
    except Exception as exc:  # malformed JSON of any shape: name the file, never a raw KeyError
        raise EngineFileError(f"{where}: metadata 'graph' cannot be rebuilt: {type(exc).__name__}: {exc}") \
            from exc
    check_slots(data["slots"], weights, constants, where)
    return FlatProgram(module, slots, {n: t for n, t in constants.items() if (_CONSTANT, n) in slots})


class _Unsupported(Exception):
    """A node or argument outside what ``decode_graph`` rebuilds."""


def _check_slot(slot: Any) -> None:
    """``[kind, name]`` or ``[kind, name, shape, dtype]``."""
    if not isinstance(slot, list) or len(slot) not in (2, 4) or not all(isinstance(s, str) for s in slot[:2]):
        raise ValueError(f"slot {slot!r}")
    if slot[0] not in (_WEIGHT, _CONSTANT):
        raise ValueError(f"slot kind {slot[0]!r}")
    if len(slot) == 4 and not (isinstance(slot[2], list) and all(type(d) is int for d in slot[2])
                               and isinstance(slot[3], str)):
        raise ValueError(f"slot spec {slot[2:]!r}")


def _static_spec(node: torch.fx.Node) -> list[Any]:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or not all(isinstance(d, int) for d in val.shape):
        return []
    return [list(val.shape), str(val.dtype)]


def _node(node: torch.fx.Node) -> dict[str, Any]:
    if node.op == "placeholder":
        return {"op": "placeholder", "name": node.name}
    if node.op == "output":
        return {"op": "output", "args": _arg(list(node.args))}
    if node.op != "call_function":
        raise _Unsupported(node.op)
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        name = f"ops:{target._schema.name}.{target._overloadname}"
    elif _OPERATORS.get(getattr(target, "__name__", "")) is target:
        name = f"operator:{target.__name__}"
    else:
        raise _Unsupported(repr(target))
    return {"op": "call_function", "name": node.name, "target": name, "args": _arg(list(node.args)),
            "kwargs": {k: _arg(v) for k, v in node.kwargs.items()}}


def _arg(a: Any) -> dict[str, Any]:
    if isinstance(a, torch.fx.Node):
        return {"node": a.name}
    if isinstance(a, list | tuple):
        return {"list" if isinstance(a, list) else "tuple": [_arg(x) for x in a]}
    if a is None or isinstance(a, bool | int | float | str):
        return {"value": a}
    if isinstance(a, torch.device):
        return {"device": str(a)}
    for kind, cls in _ENUMS.items():
        if isinstance(a, cls):
            return {kind: str(a).removeprefix("torch.")}
    raise _Unsupported(type(a).__name__)


def _rebuild(graph: torch.fx.Graph, env: dict[str, torch.fx.Node], node: Mapping[str, Any]) -> None:
    op = node["op"]
    if op == "placeholder":
        env[node["name"]] = graph.placeholder(str(node["name"]))
    elif op == "call_function":
        args = _value(node["args"], env)
        kwargs = {str(k): _value(v, env) for k, v in node["kwargs"].items()}
        env[node["name"]] = graph.call_function(_target(str(node["target"])), tuple(args), kwargs)
    elif op == "output":
        graph.output(_value(node["args"], env)[0])
    else:
        raise ValueError(f"node op {op!r}")


def _value(a: Mapping[str, Any], env: Mapping[str, torch.fx.Node]) -> Any:
    (kind, v), = a.items()
    if kind == "node":
        return env[v]
    if kind in ("list", "tuple"):
        items = [_value(x, env) for x in v]
        return items if kind == "list" else tuple(items)
    if kind == "value":
        if v is not None and not isinstance(v, bool | int | float | str):
            raise ValueError(f"value {v!r}")
        return v
    if kind == "device":
        return torch.device(v)
    if kind in _ENUMS and isinstance(found := getattr(torch, str(v), None), _ENUMS[kind]):
        return found
    raise ValueError(f"argument {kind}={v!r}")


def _target(name: str) -> Any:
    kind, _, qualified = name.partition(":")
    if kind == "operator" and qualified in _OPERATORS:
        return _OPERATORS[qualified]
    if kind == "ops":
        namespace, _, rest = qualified.partition("::")
        op, _, overload = rest.rpartition(".")
        try:
            found = getattr(getattr(getattr(torch.ops, namespace), op), overload)
        except (AttributeError, RuntimeError):
            found = None
        if isinstance(found, torch._ops.OpOverload):
            return found
    raise ValueError(f"target {name!r} is not a registered operator")


def check_slots(slots: Sequence[Sequence[Any]], weights: Mapping[str, torch.Tensor],
                constants: Mapping[str, torch.Tensor], where: str) -> None:
    """``EngineFileError`` naming ``where`` unless ``weights`` and ``constants`` are exactly the
    tensors ``slots`` (``slot_specs``) take: none lacking, none extra, static shapes and dtypes."""
    for kind, name, *spec in slots:
        t = (weights if kind == _WEIGHT else constants).get(name)
        if t is None:
            raise EngineFileError(f"{where} lacks tensor {name!r} that its program takes")
        if spec and (list(t.shape) != spec[0] or str(t.dtype) != spec[1]):
            raise EngineFileError(f"{where}: tensor {name!r} is {tuple(t.shape)} {t.dtype}, but its program "
                                  f"was exported for {tuple(spec[0])} {spec[1]}")
    if extra := sorted(set(weights) - {str(name) for _, name, *_ in slots}):
        raise EngineFileError(f"{where} holds weights its program has no slot for: {extra}")
