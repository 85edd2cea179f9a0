"""The driver side: fleet configs, placement, and the ``Fleet`` API."""

from actors.canary import Canary, CanaryJudge
from actors.errors import CanaryRefused, NoCanary
from engines.probes import Probe, load_probes, save_probes

from .config import ConfigError, FleetConfig
from .errors import (
    BatchingUnsupported,
    FleetConfigMismatch,
    FleetError,
    FleetNotFound,
    InferenceFailed,
    KeyReused,
    NoRayCluster,
    NoReplicaAvailable,
    Overloaded,
    RefitAborted,
    RemoteError,
)
from .fleet import Fleet, RefitResult
from .ray_session import ensure_ray
from .router import InferResponse

__all__ = [
    "BatchingUnsupported", "Canary", "CanaryJudge", "CanaryRefused", "ConfigError", "Fleet", "FleetConfig",
    "FleetConfigMismatch", "FleetError", "FleetNotFound", "InferResponse", "InferenceFailed", "KeyReused",
    "NoCanary", "NoRayCluster", "NoReplicaAvailable", "Overloaded", "Probe", "RefitAborted", "RefitResult",
    "RemoteError", "ensure_ray", "load_probes", "save_probes",
]
