"""What replicas answer the coordinator, as typed values (plain dataclasses: they are pickled by Ray
on every protocol call, so no validation cost on the way).

A call that did not produce an answer (timeout, dead or restarting actor, an exception inside the
method) is a ``Failed`` with its ``kind``; the coordinator never inspects exceptions itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

__all__ = ["Ack", "Failed", "FailureKind", "LeaseReply", "PrepareReply", "error_reason"]


@dataclass(frozen=True)
class PrepareReply:
    """A vote: YES (the set is verified and staged) or NO with the reason."""

    replica: str
    txn: str
    yes: bool
    reason: str
    version: int  # the version the replica serves
    timings: dict[str, float] = field(default_factory=dict)
    node: str = ""  # the Ray node the replica runs on (one verifier per node in shared mode)


@dataclass(frozen=True)
class Ack:
    """COMMIT, ACTIVATE, ABORT or a catch-up took effect; ``version`` is what the replica serves."""

    replica: str
    txn: str | None
    version: int
    state: str = ""
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class LeaseReply:
    """Answer to a lease renewal. ``accepted`` is False for a renewal older than the replica's
    membership generation. ``state`` is the replica's lifecycle state; ``error`` says why a
    replica in state ``failed`` cannot serve; ``prepared`` lets the coordinator resend a decision
    whose message was lost."""

    replica: str
    accepted: bool
    version: int
    state: str
    error: str = ""
    prepared: tuple[str, ...] = ()  # transactions holding a staged set and still waiting for a decision
    node: str = ""  # the Ray node it runs on (where peers catch up from: ``actors.catch_up``)


class FailureKind(str, Enum):
    """Why a call produced no answer."""

    TIMEOUT = "timeout"          # no answer within the call's timeout (the call was cancelled)
    UNAVAILABLE = "unavailable"  # the actor is restarting; a later call may succeed
    DEAD = "dead"                # the actor is gone
    ERROR = "error"              # the method raised
    UNKNOWN = "unknown"          # no such replica handle


@dataclass(frozen=True)
class Failed:
    """A call that produced no answer; ``reason`` is one line naming the replica and the cause."""

    kind: FailureKind
    reason: str

    @property
    def retryable(self) -> bool:
        return self.kind in (FailureKind.TIMEOUT, FailureKind.UNAVAILABLE, FailureKind.ERROR)


def error_reason(exc: BaseException) -> str:
    """What a ``Failed`` of kind ``ERROR`` says of the error a method raised: its type and the first
    line of its message (the same through Ray and over the control channel)."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"
