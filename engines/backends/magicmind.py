"""The ``magicmind`` backend: a ``torch.export`` program compiled by Cambricon MagicMind for an MLU card.

UNTESTED ON HARDWARE. Written against MagicMind's Python API (``magicmind.python.runtime``) as its
public samples use it; every SDK call is marked below with whether public sample code confirms it.

Import-guarded: importing this module never needs the SDK. Constructing ``MagicMindBackend``
without it raises ``BackendUnavailableError`` naming what is missing (the ``magicmind`` package,
an MLU card, or the ``onnx``/``onnxscript`` packages the ONNX export needs).

How a program runs:

- Build: the ``ExportedProgram`` is exported once to ONNX (``torch.onnx.export``, dynamo exporter,
  no graph optimisation so every weight stays a named initializer). The exporter names each
  initializer after its state-dict name, so the manifest name usually *is* the initializer name;
  ``name_map`` records manifest name -> initializer name. The weight data is then dropped from the
  in-memory template: every bound set supplies all of it.
- ``bind(tensors)`` (off the serving path; may take seconds): MagicMind bakes weights into the
  model at build time and its Python API has no refitter, so each weight set gets its own engine:

  * default, the *shadow engine*: write the template with the set's tensors as initializers to a
    temp file, parse it (``mm.parser.Parser(mm.ModelKind.kOnnx)``), build a model with
    ``{"enable_refit": true}``, create an engine, a context and a queue on the card;
  * where the optional C++ extension ``engines.backends._magicmind_refitter`` (built from
    ``magicmind_refitter.cpp`` on a machine with the SDK headers) imports, one refit-enabled model
    is built from the first set, every later set gets a fresh engine from that model
    (``IModel::CreateIEngine``) and ``IRefitter::SetNamedWeights`` for each tensor that differs
    from the build set, then ``RefitEngine``. Refitting the one serving engine in place would make
    a staged set visible before its commit, which the weight-set contract forbids; a new engine per
    set keeps staged sets invisible until the engine swaps references at commit. Set
    ``WEIGHT_REFIT_MM_REFITTER=0`` to force the shadow path.

- A bound program owns one context, its queue and its input tensors, guarded by a lock (MagicMind
  does not document contexts as thread-safe; Cambricon's refit sample gives every worker thread its
  own context). A call copies the inputs to the host, then host -> device, enqueues, syncs the
  queue and returns the outputs as CPU torch tensors.
- Weights stay host tensors (``to_device`` copies on the CPU): MagicMind takes them as host buffers
  at build/refit time. ``synchronize`` has nothing to wait for.
- The engine's ``copy`` memory mode commits by copying into the live tensors in place without a new
  ``bind``; a bound program notices (torch's in-place version counters) and rebuilds its engine on
  the next call, under its lock. That call pays a build; prefer ``swap`` mode with this backend.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import tempfile
import threading
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..devices import device_kind
from ..errors import BackendUnavailableError, EngineError
from .base import Backend, BoundProgram

SDK_PACKAGE = "magicmind"
SDK_MODULE = "magicmind.python.runtime"
REFITTER_EXTENSION = "engines.backends._magicmind_refitter"
REFITTER_ENV = "WEIGHT_REFIT_MM_REFITTER"

# Default MagicMind build config. "enable_refit" is confirmed by Cambricon's refit samples
# (C++ ``ParseFromString(R"({"enable_refit": true})")``); "graph_shape_mutable" and
# "precision_config.precision_mode" appear in Cambricon's Python gen_model samples.
DEFAULT_BUILD_CONFIG: dict[str, Any] = {
    "enable_refit": True,
    "graph_shape_mutable": False,
    "precision_config": {"precision_mode": "force_float32"},
}

_ONNX_ORIGINAL_NAME_KEY = "pkg.torch.onnx.original_node_name"  # set by torch's dynamo exporter

# torch dtype -> ONNX TensorProto.DataType name (the enum value is looked up on ``onnx.TensorProto``)
_ONNX_DTYPES = {
    torch.float32: "FLOAT", torch.float16: "FLOAT16", torch.bfloat16: "BFLOAT16",
    torch.float64: "DOUBLE", torch.int8: "INT8", torch.uint8: "UINT8", torch.int16: "INT16",
    torch.int32: "INT32", torch.int64: "INT64", torch.bool: "BOOL",
}

# ONNX's protobuf limit: bigger models go to an external data file beside the .onnx
_ONNX_INLINE_LIMIT = 1_800_000_000


# --------------------------------------------------------------------------------------- guards


def _module_available(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def import_sdk() -> Any:
    """``magicmind.python.runtime`` (with its ``parser`` submodule), or BackendUnavailableError."""
    if not _module_available(SDK_PACKAGE):
        raise BackendUnavailableError(
            "magicmind backend: magicmind Python package not installed (Cambricon MagicMind SDK; "
            "it needs an MLU card and Cambricon's SDK image). Use backend='torch' instead."
        )
    try:
        mm = importlib.import_module(SDK_MODULE)
        importlib.import_module(SDK_MODULE + ".parser")  # registers mm.parser (as the samples do)
    except ImportError as exc:
        raise BackendUnavailableError(f"magicmind backend: {SDK_MODULE} failed to import: {exc}") from exc
    return mm


def require_onnx() -> Any:
    """The ``onnx`` module, or BackendUnavailableError naming the missing export dependencies."""
    missing = [m for m in ("onnx", "onnxscript") if not _module_available(m)]
    if missing:
        raise BackendUnavailableError(
            f"magicmind backend: exporting the program to ONNX needs {' and '.join(missing)} "
            f"(pip install {' '.join(missing)})"
        )
    return importlib.import_module("onnx")


def load_refitter_extension() -> Any | None:
    """The optional pybind11 ``IRefitter`` binding, or None (not built here, or disabled by env)."""
    if os.environ.get(REFITTER_ENV, "1") == "0":
        return None
    try:
        return importlib.import_module(REFITTER_EXTENSION)
    except ImportError:
        return None


def _check(status: Any, what: str) -> None:
    """MagicMind calls return a Status with ``ok()`` (confirmed in samples: ``.ok()``); None is fine."""
    ok = getattr(status, "ok", None)
    if callable(ok) and not ok():
        raise EngineError(f"magicmind: {what} failed: {status}")


def _device_index(device: str) -> int:
    return int(device.split(":", 1)[1]) if ":" in device else 0


# ----------------------------------------------------------------------------- ONNX (no SDK needed)


def input_specs(program: torch.export.ExportedProgram) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """Shape and dtype of each user input, from the exported graph's placeholder metadata."""
    user_inputs = list(program.graph_signature.user_inputs)
    nodes = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    specs = []
    for name in user_inputs:
        val = nodes[name].meta.get("val") if name in nodes else None
        if not isinstance(val, torch.Tensor):
            raise EngineError(
                f"magicmind backend: input {name!r} is not a tensor; only tensor inputs are supported"
            )
        try:
            shape = tuple(int(s) for s in val.shape)
        except (TypeError, ValueError) as exc:
            raise EngineError(
                f"magicmind backend: input {name!r} has a dynamic shape {tuple(val.shape)}; "
                "this backend builds fixed-shape engines"
            ) from exc
        specs.append((shape, val.dtype))
    return specs


def _normalise(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z]", "_", name)


def onnx_name_map(program: torch.export.ExportedProgram, model: Any) -> dict[str, str]:
    """Manifest (state-dict) name -> ONNX initializer name, for every weight in ``program.state_dict``.

    Exact name first (torch's dynamo exporter names initializers after the state-dict name), then
    the exporter's record of the placeholder it came from, then the name with punctuation folded
    to ``_``. A weight the graph never reads (e.g. BatchNorm's ``num_batches_tracked`` in eval) has
    no initializer and no effect; it is left out. Any other weight without an initializer is an
    error: this backend could not refit it.
    """
    inits = [init.name for init in model.graph.initializer]
    exact = set(inits)
    by_origin: dict[str, str] = {}
    for init in model.graph.initializer:
        for prop in getattr(init, "metadata_props", ()):
            if prop.key == _ONNX_ORIGINAL_NAME_KEY:
                by_origin[prop.value] = init.name
    by_norm: dict[str, str] = {}
    for name in inits:
        by_norm.setdefault(_normalise(name), name)
    sig = program.graph_signature
    placeholder_of = {fqn: ph for ph, fqn in {**sig.inputs_to_parameters, **sig.inputs_to_buffers}.items()}
    unread = {n.name for n in program.graph.nodes if n.op == "placeholder" and not n.users}

    mapping: dict[str, str] = {}
    for name in program.state_dict:
        if name in exact:
            mapping[name] = name
        elif placeholder_of.get(name) in by_origin:
            mapping[name] = by_origin[placeholder_of[name]]
        elif _normalise(name) in by_norm:
            mapping[name] = by_norm[_normalise(name)]
        elif placeholder_of.get(name) in unread:
            continue
        else:
            raise EngineError(
                f"magicmind backend: weight {name!r} has no ONNX initializer after export "
                f"(initializers: {sorted(inits)[:20]}); it could not be refit"
            )
    return mapping


def tensor_proto(onnx: Any, name: str, tensor: torch.Tensor) -> Any:
    """An ONNX ``TensorProto`` holding ``tensor``'s bytes (bf16 included: raw little-endian data)."""
    t = tensor.detach().to("cpu").contiguous()
    if t.dtype not in _ONNX_DTYPES:
        raise EngineError(
            f"magicmind backend: weight {name!r} has dtype {t.dtype}, which ONNX export does not carry"
        )
    proto = onnx.TensorProto()
    proto.name = name
    proto.data_type = getattr(onnx.TensorProto, _ONNX_DTYPES[t.dtype])
    proto.dims.extend(t.shape)
    proto.raw_data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return proto


class OnnxTemplate:
    """The program as an ONNX graph whose refittable initializers are filled per weight set."""

    def __init__(self, program: torch.export.ExportedProgram) -> None:
        self.onnx = require_onnx()
        self.inputs = input_specs(program)
        args = tuple(torch.zeros(shape, dtype=dtype) for shape, dtype in self.inputs)
        try:
            # The program itself goes to the exporter (used as-is, no second trace; equivalent to
            # exporting ``program.module()``). optimize=False keeps every weight a named initializer.
            onnx_program = torch.onnx.export(program, args, dynamo=True, optimize=False,
                                             external_data=False, verbose=False)
        except Exception as exc:  # the exporter raises many types; the reason is in the message
            raise EngineError(f"magicmind backend: ONNX export of the program failed: {exc}") from exc
        model = onnx_program.model_proto
        self.name_map = onnx_name_map(program, model)
        mapped = set(self.name_map.values())
        for init in model.graph.initializer:  # drop weight bytes: every bind supplies all of them
            if init.name in mapped:
                init.ClearField("raw_data")
                for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                    init.ClearField(field)
        self.model = model

    def materialise(self, tensors: Mapping[str, torch.Tensor]) -> Any:
        """A copy of the template with ``tensors`` as its weight initializers."""
        model = self.onnx.ModelProto()
        model.CopyFrom(self.model)
        by_name = {init.name: init for init in model.graph.initializer}
        for manifest_name, init_name in self.name_map.items():
            by_name[init_name].CopyFrom(tensor_proto(self.onnx, init_name, tensors[manifest_name]))
        return model

    def write(self, tensors: Mapping[str, torch.Tensor], directory: str) -> str:
        """Write the filled graph to ``directory``/model.onnx (external data beside it when large)."""
        model = self.materialise(tensors)
        path = os.path.join(directory, "model.onnx")
        big = model.ByteSize() > _ONNX_INLINE_LIMIT
        self.onnx.save_model(model, path, save_as_external_data=big, all_tensors_to_one_file=True,
                             location="model.onnx.data")
        return path


def _host_array(x: Any) -> np.ndarray:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    t = t.detach().to("cpu")
    if t.dtype is torch.bfloat16:  # numpy has no bf16; MagicMind bf16 inputs are not confirmed either
        t = t.float()
    return np.ascontiguousarray(t.numpy())


def _versions(tensors: Mapping[str, torch.Tensor]) -> dict[str, int]:
    return {n: t._version for n, t in tensors.items()}


# ------------------------------------------------------------------------------------ runners


class _ShadowRunner:
    """One MagicMind model/engine/context/queue built from one weight set. Not thread-safe alone."""

    def __init__(self, backend: MagicMindBackend, tensors: Mapping[str, torch.Tensor]) -> None:
        mm = backend.mm
        self.model = backend.build_model(tensors)
        with backend.engine_lock:  # IModel::CreateIEngine is not thread-safe (Cambricon refit sample)
            _check(backend.dev.active(), "Device.active")
            econfig = mm.Model.EngineConfig()  # confirmed: Cambricon Python samples
            econfig.device_type = "MLU"
            self.engine = self.model.create_i_engine(econfig)
            if self.engine is None:
                raise EngineError("magicmind: Model.create_i_engine returned None")
            self.context = self.engine.create_i_context()
            if self.context is None:
                raise EngineError("magicmind: IEngine.create_i_context returned None")
            self.queue = backend.dev.create_queue()
            if self.queue is None:
                raise EngineError("magicmind: Device.create_queue returned None")
            self.inputs = self.context.create_inputs()
        self.dev = backend.dev

    def run(self, host: Sequence[np.ndarray]) -> list[torch.Tensor]:
        if len(host) != len(self.inputs):
            raise EngineError(f"magicmind: program takes {len(self.inputs)} inputs, got {len(host)}")
        _check(self.dev.active(), "Device.active")  # the device is per thread; serving threads vary
        for mm_tensor, array in zip(self.inputs, host, strict=True):
            _check(mm_tensor.from_numpy(array), "Tensor.from_numpy")
            _check(mm_tensor.to(self.dev), "Tensor.to(device)")  # host -> device
        outputs: list[Any] = []
        _check(self.context.enqueue(self.inputs, outputs, self.queue), "IContext.enqueue")
        _check(self.queue.sync(), "Queue.sync")
        return [torch.from_numpy(np.array(o.asnumpy(), copy=True)) for o in outputs]


class _RefitRunner:
    """An engine created by the C++ extension from the refit-enabled model, refit to one set."""

    def __init__(self, backend: MagicMindBackend, tensors: Mapping[str, torch.Tensor]) -> None:
        refit = backend.refit_state
        assert refit is not None
        self.engine = refit.model.create_engine()
        changed = refit.changed(tensors)
        for name in changed:
            t = tensors[name].detach().to("cpu").contiguous()
            data = t.reshape(-1).view(torch.uint8).numpy()
            self.engine.set_named_weights(refit.names[name], data, str(t.dtype).removeprefix("torch."),
                                          list(t.shape))
        if changed:
            self.engine.refit()  # IRefitter::RefitEngine; names not set keep the model's values

    def run(self, host: Sequence[np.ndarray]) -> list[torch.Tensor]:
        outputs = self.engine.infer([np.ascontiguousarray(a) for a in host])
        return [torch.from_numpy(np.array(o, copy=True)) for o in outputs]


class _RefitState:
    """The one refit-enabled model (C++ side), the set it was built from, and the name mapping."""

    def __init__(self, model: Any, names: dict[str, str], base: Mapping[str, torch.Tensor]) -> None:
        self.model = model
        self.names = names  # manifest name -> MagicMind refit name
        self.base = dict(base)
        self.base_versions = _versions(base)

    def changed(self, tensors: Mapping[str, torch.Tensor]) -> list[str]:
        """Names whose tensor is not the build set's (or was written in place since the build)."""
        return [n for n, t in tensors.items()
                if t is not self.base.get(n) or t._version != self.base_versions[n]]


# ------------------------------------------------------------------------------------ backend


class MagicMindBackend(Backend):
    """Runs an ``ExportedProgram`` compiled by MagicMind on one MLU card; one engine per weight set."""

    name = "magicmind"
    # Where the engine should keep weight buffers and inputs for this backend: host memory. The
    # backend's ``device`` stays the card ("mlu:N"); torch itself never addresses the card here,
    # so torch_mlu is not needed (engine.py would read this in place of ``config.device``).
    tensor_device = "cpu"

    def __init__(self, program: torch.export.ExportedProgram, device: str,
                 build_config: Mapping[str, Any] | None = None) -> None:
        super().__init__(device)
        self.mm = import_sdk()
        if device_kind(device) != "mlu":
            raise BackendUnavailableError(
                f"magicmind backend: runs on MLU cards only; device must be 'mlu[:N]', got {device!r}"
            )
        self.template = OnnxTemplate(program)  # fails early (export, names) before touching the card
        self.build_config = {**DEFAULT_BUILD_CONFIG, **(build_config or {}), "enable_refit": True}
        self.index = _device_index(device)
        # mm.System(): confirmed as a context manager with device_count() in Cambricon's samples,
        # which run everything inside ``with mm.System():``. Held open for the backend's lifetime
        # (what its exit tears down is not documented publicly); close() releases it.
        self._system = self.mm.System()
        entered = self._system.__enter__()
        system = entered if entered is not None else self._system
        count = int(system.device_count())
        if self.index >= count:
            self.close()
            raise BackendUnavailableError(
                f"magicmind backend: no MLU card at index {self.index} ({count} visible to MagicMind)"
            )
        # mm.Device: ``dev = mm.Device(); dev.id = N; dev.active()`` is what the samples show
        # (a ``set_device`` method could not be confirmed).
        self.dev = self.mm.Device()
        self.dev.id = self.index
        _check(self.dev.active(), "Device.active")
        self.engine_lock = threading.Lock()
        self._builds = 0
        self.extension = load_refitter_extension()
        self.refit_state: _RefitState | None = None
        self._refit_lock = threading.Lock()

    # --------------------------------------------------------------- build

    def build_model(self, tensors: Mapping[str, torch.Tensor]) -> Any:
        """Parse the ONNX graph filled with ``tensors`` and build a MagicMind model (confirmed API:
        ``mm.Network``, ``mm.parser.Parser(mm.ModelKind.kOnnx).parse(network, path)``,
        ``network.get_input(i).set_dimension(mm.Dims(shape))``, ``mm.BuilderConfig().parse_from_string``,
        ``mm.Builder().build_model(name, network, config)``)."""
        mm = self.mm
        with tempfile.TemporaryDirectory(prefix="weight-refit-mm-") as tmp:
            path = self.template.write(tensors, tmp)
            network = mm.Network()
            parser = mm.parser.Parser(mm.ModelKind.kOnnx)
            _check(parser.parse(network, path), f"ONNX parse of {path}")
            for i, (shape, _dtype) in enumerate(self.template.inputs):
                _check(network.get_input(i).set_dimension(mm.Dims(list(shape))), f"input {i} set_dimension")
            config = mm.BuilderConfig()
            _check(config.parse_from_string(json.dumps(self.build_config)), "BuilderConfig.parse_from_string")
            with self.engine_lock:
                self._builds += 1
                model_name = f"weight_refit_{self._builds}"
            model = mm.Builder().build_model(model_name, network, config)
        if model is None:
            raise EngineError("magicmind: Builder.build_model returned None")
        return model

    def _init_refitter(self, tensors: Mapping[str, torch.Tensor]) -> bool:
        """Build the refit-enabled model once from ``tensors`` for the C++ ``IRefitter`` path."""
        if self.extension is None:
            return False
        with self._refit_lock:
            if self.refit_state is not None:
                return True
            try:
                model = self.build_model(tensors)
                with tempfile.TemporaryDirectory(prefix="weight-refit-mm-") as tmp:
                    path = os.path.join(tmp, "model.mm")
                    _check(model.serialize_to_file(path), "Model.serialize_to_file")  # confirmed
                    ext_model = self.extension.RefittableModel(path, self.index)
                refit_names = set(ext_model.all_names())
                names = {}
                for manifest_name, init_name in self.template.name_map.items():
                    hit = next((c for c in (init_name, manifest_name) if c in refit_names), None)
                    if hit is None:  # MagicMind's refit names for ONNX graphs are not documented
                        raise EngineError(f"weight {manifest_name!r} has no MagicMind refit name "
                                          f"(refittable: {sorted(refit_names)[:20]})")
                    names[manifest_name] = hit
            except EngineError as exc:
                warnings.warn(f"magicmind backend: IRefitter path disabled, using shadow engines: {exc}",
                              RuntimeWarning, stacklevel=3)
                self.extension = None
                return False
            self.refit_state = _RefitState(ext_model, names, tensors)
            return True

    def _make_runner(self, tensors: Mapping[str, torch.Tensor]) -> _ShadowRunner | _RefitRunner:
        if self._init_refitter(tensors):
            return _RefitRunner(self, tensors)
        return _ShadowRunner(self, tensors)

    # --------------------------------------------------------------- Backend contract

    def bind(self, tensors: Mapping[str, torch.Tensor]) -> BoundProgram:
        """A callable running a new engine built (or refit) for exactly ``tensors``.

        Per-program state lives in this closure: the set's tensors, their in-place version
        counters at build time, and the runner (model/engine/context/queue). One lock per bound
        program serialises calls on its context.
        """
        tensors = dict(tensors)
        missing = [n for n in self.template.name_map if n not in tensors]
        if missing:
            raise KeyError(f"weights {missing} have no tensor in the set bound to the magicmind backend")
        lock = threading.Lock()
        state = {"runner": self._make_runner(tensors), "versions": _versions(tensors)}

        def run(inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
            host = [_host_array(x) for x in inputs]
            with lock:
                if _versions(tensors) != state["versions"]:  # copy-mode commit wrote in place
                    state["runner"] = self._make_runner(tensors)
                    state["versions"] = _versions(tensors)
                return state["runner"].run(host)

        run.tensors = tensors  # type: ignore[attr-defined]
        run.state = state  # type: ignore[attr-defined]
        return run

    def to_device(self, host: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Weights stay on the host: MagicMind takes them as host buffers when it builds or refits."""
        if out is None:
            out = torch.empty(host.shape, dtype=host.dtype, device="cpu")
        out.copy_(host.detach().to("cpu"))
        return out

    def synchronize(self) -> None:
        """Nothing queued: weight copies are host copies; inference syncs its own queue."""
        return None

    def close(self) -> None:
        """Release the ``mm.System`` held since construction."""
        system, self._system = getattr(self, "_system", None), None
        if system is not None:
            system.__exit__(None, None, None)


__all__ = ["MagicMindBackend", "OnnxTemplate", "import_sdk", "onnx_name_map", "require_onnx"]
