"""The driver side: fleet configs, placement, and the ``Fleet`` API."""

from .config import ConfigError, FleetConfig
from .errors import FleetError, FleetNotFound, NoReplicaAvailable, Overloaded, RefitAborted
from .fleet import Fleet, RefitResult, ensure_ray
from .router import InferResponse

__all__ = [
    "ConfigError", "Fleet", "FleetConfig", "FleetError", "FleetNotFound", "InferResponse",
    "NoReplicaAvailable", "Overloaded", "RefitAborted", "RefitResult", "ensure_ray",
]
