"""The engine layer: a refittable inference engine on one device (no Ray here).

Names are imported on first use (PEP 562), so that a process that needs only the errors, the
checksums of an engine-free part or the manifest's dtype names (the coordinator) does not pay for
importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_WHERE = {
    "build_engine": "builder", "load_engine": "builder",
    "BuilderConfig": "config", "MemoryMode": "config", "NonFinitePolicy": "config",
    "Engine": "engine", "InferResult": "engine", "MemoryReport": "engine", "Refitter": "engine",
    "TensorSpec": "manifest",
    "DimSpec": "inputs", "InputSpec": "inputs",
    "StagedSet": "weight_set", "StagedState": "weight_set",
    "load_weights": "weights",
    "Probe": "probes", "ProbeFailed": "probes", "load_probes": "probes", "save_probes": "probes",
    **{name: "errors" for name in (
        "BackendUnavailableError", "DtypeMismatchError", "EngineError", "EngineFileError",
        "InputError", "InvalidVersionError", "MemoryBudgetError", "MissingWeightsError",
        "NonFiniteWeightError", "NotRetainedError", "RefitDisabledError", "RefitError", "ShapeMismatchError",
        "StagedSetDiscardedError", "StagedSetError", "StagedSetSupersededError", "UnknownWeightError",
        "VersionOrderError", "WeightError", "WeightFileError")},
}

__all__ = ["BackendUnavailableError", "BuilderConfig", "DimSpec", "DtypeMismatchError", "Engine",
    "EngineError", "EngineFileError", "InferResult", "InputError", "InputSpec", "InvalidVersionError",
    "MemoryBudgetError", "MemoryMode", "MemoryReport", "MissingWeightsError", "NonFiniteWeightError",
    "NonFinitePolicy",
    "NotRetainedError", "Probe", "ProbeFailed", "RefitDisabledError", "RefitError", "Refitter",
    "ShapeMismatchError",
    "StagedSet", "StagedSetDiscardedError", "StagedSetError", "StagedSetSupersededError",
    "StagedState", "TensorSpec", "UnknownWeightError", "VersionOrderError", "WeightError",
    "WeightFileError", "build_engine", "load_engine", "load_probes", "load_weights", "save_probes"]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'engines' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))


if TYPE_CHECKING:
    from .builder import build_engine, load_engine
    from .config import BuilderConfig, MemoryMode, NonFinitePolicy
    from .engine import Engine, InferResult, MemoryReport, Refitter
    from .errors import (
        BackendUnavailableError,
        DtypeMismatchError,
        EngineError,
        EngineFileError,
        InputError,
        InvalidVersionError,
        MemoryBudgetError,
        MissingWeightsError,
        NonFiniteWeightError,
        NotRetainedError,
        RefitDisabledError,
        RefitError,
        ShapeMismatchError,
        StagedSetDiscardedError,
        StagedSetError,
        StagedSetSupersededError,
        UnknownWeightError,
        VersionOrderError,
        WeightError,
        WeightFileError,
    )
    from .inputs import DimSpec, InputSpec
    from .manifest import TensorSpec
    from .probes import Probe, ProbeFailed, load_probes, save_probes
    from .weight_set import StagedSet, StagedState
    from .weights import load_weights
