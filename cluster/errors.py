"""Errors the driver API raises."""

from __future__ import annotations

from typing import Any

from actors.errors import KeyReused

__all__ = [
    "EngineNotRefittable", "FleetConfigMismatch", "FleetError", "FleetNotFound", "InferenceFailed",
    "KeyReused", "NoRayCluster", "NoReplicaAvailable", "ObjectStoreTooSmall", "Overloaded",
    "RefitAborted", "RemoteError",
]


class FleetError(RuntimeError):
    """Base class of the driver API's own errors."""


class RefitAborted(FleetError):
    """A refit or rollback aborted; the fleet stays on its version.

    ``reason`` says why (the first NO votes, a timeout, a failed persist); ``votes`` maps each
    replica to ``"YES"`` or ``"NO: <reason>"``; ``txn`` is the transaction id (None if none began).
    """

    def __init__(self, reason: str, votes: dict[str, str] | None = None, txn: str | None = None) -> None:
        super().__init__(f"refit aborted: {reason}")
        self.reason = reason
        self.votes = dict(votes or {})
        self.txn = txn

    def __reduce__(self) -> tuple[Any, ...]:
        return (RefitAborted, (self.reason, self.votes, self.txn))


class Overloaded(FleetError):
    """Every healthy replica already holds ``max_queue_per_replica`` outstanding requests."""


class NoReplicaAvailable(FleetError):
    """No live member could serve the request (all failed, timed out, or answered stale)."""


class FleetNotFound(FleetError):
    """``Fleet.connect`` found no coordinator of that name in the namespace."""


class ObjectStoreTooSmall(FleetError):
    """A version larger than the object store can hold; refused before it is put."""


class EngineNotRefittable(FleetError, ValueError):
    """The fleet's engine file was built without ``enable_refit``."""


class BatchingUnsupported(FleetError, ValueError):
    """``batching`` was asked of an engine whose inputs do not share a dynamic batch dim 0 (the
    input is named), or of more samples than that dim allows."""


class NoRayCluster(FleetError, ConnectionError):
    """No Ray cluster answers at the address a driver was to join (or none is running here)."""


class FleetConfigMismatch(FleetError, ValueError):
    """A launch of a fleet that is running with a different config; ``fields`` lists what differs."""

    def __init__(self, message: str, fields: list[str] | None = None) -> None:
        super().__init__(message)
        self.fields = list(fields or [])

    def __reduce__(self) -> tuple[Any, ...]:
        return (FleetConfigMismatch, (str(self), self.fields))


class InferenceFailed(FleetError):
    """A replica could not run an inference request (the replica's own error, message first)."""


class RemoteError(FleetError):
    """An error raised inside the coordinator or a replica that is not one of the project's own
    types; the message is the remote error's own, first line first."""
