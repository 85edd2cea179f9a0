"""Errors the driver API raises."""

from __future__ import annotations

from typing import Any


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


class EngineNotRefittable(FleetError):
    """The fleet's engine file was built without ``enable_refit``."""
