"""The engine layer: a refittable inference engine on one device (no Ray here)."""

from .builder import build_engine, load_engine
from .config import BuilderConfig, MemoryMode, NonFinitePolicy
from .engine import Engine, InferResult, MemoryReport, Refitter
from .errors import (
    BackendUnavailableError,
    DtypeMismatchError,
    EngineError,
    EngineFileError,
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
from .manifest import TensorSpec
from .weight_set import StagedSet, StagedState
from .weights import load_weights

__all__ = [
    "BackendUnavailableError", "BuilderConfig", "DtypeMismatchError", "Engine", "EngineError",
    "EngineFileError", "InferResult", "InvalidVersionError", "MemoryBudgetError", "MemoryMode",
    "MemoryReport", "MissingWeightsError",
    "NonFinitePolicy", "NonFiniteWeightError", "NotRetainedError", "RefitDisabledError", "RefitError",
    "Refitter", "ShapeMismatchError", "StagedSet", "StagedSetDiscardedError", "StagedSetError",
    "StagedSetSupersededError", "StagedState", "TensorSpec", "UnknownWeightError", "VersionOrderError",
    "WeightError", "WeightFileError", "build_engine", "load_engine", "load_weights",
]
