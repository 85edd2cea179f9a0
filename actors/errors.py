"""Errors of the fleet protocol shared by the replicas' participant and the coordinator's log."""

from __future__ import annotations

__all__ = ["CanaryRefused", "KeyReused", "NoCanary", "ProtocolViolation", "StaleEpoch"]


class ProtocolViolation(Exception):
    """A message that the transaction's state does not allow (e.g. COMMIT of an aborted txn)."""


class StaleEpoch(ProtocolViolation):
    """A message or log record from a coordinator epoch older than one already seen (``where``:
    a replica, or the transaction log): a newer coordinator incarnation took over."""

    def __init__(self, epoch: int, seen: int, where: str = "this replica") -> None:
        super().__init__(epoch, seen, where)
        self.epoch = epoch
        self.seen = seen
        self.where = where

    def __str__(self) -> str:
        return (f"stale epoch {self.epoch}: {self.where} has seen epoch {self.seen} "
                "(a newer coordinator took over)")


class KeyReused(ValueError):
    """An idempotency key reused for a different request: the first call's outcome stands and
    nothing was done (as idempotent APIs refuse a reused key with different content)."""


class CanaryRefused(ValueError):
    """A canary that cannot be run as asked (a cohort of every member, a fleet of one)."""


class NoCanary(RuntimeError):
    """``promote``/``abort_canary`` with no canary running."""
