"""The coordinator's side of the two-phase commit, as plain Python (no Ray).

``CoordinatorTxn`` is one transaction's state machine; ``tally`` turns votes into a decision under
the commit policy. The coordinator actor logs each decision before it acts on it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class Phase(str, Enum):
    """Coordinator-side phases of one transaction."""

    BEGUN = "begun"            # BEGIN logged, PREPARE being sent
    COMMITTING = "committing"  # COMMIT logged (the commit point), COMMIT being sent
    ACTIVATING = "activating"  # every member acked COMMIT, ACTIVATE being sent
    DONE = "done"              # every member activated
    ABORTED = "aborted"        # ABORT logged


PHASE_TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.BEGUN: frozenset({Phase.COMMITTING, Phase.ABORTED}),
    Phase.COMMITTING: frozenset({Phase.ACTIVATING}),
    Phase.ACTIVATING: frozenset({Phase.DONE}),
    Phase.DONE: frozenset(),
    Phase.ABORTED: frozenset(),
}


class PhaseError(Exception):
    """A phase change the transition table does not allow."""


@dataclass
class Vote:
    """One member's answer to PREPARE: YES, or NO with a reason (a timeout is a NO)."""

    replica: str
    yes: bool
    reason: str = ""
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class Decision:
    """What a tally decided: commit among ``members`` (evicting ``evicted``), or abort."""

    commit: bool
    members: list[str]
    evicted: list[str]
    reason: str


def tally(votes: dict[str, Vote], *, policy: str, max_evict: int) -> Decision:
    """Decide a transaction. ``strict``: any NO aborts. ``evict``: up to ``max_evict`` NO voters
    are fenced out and the rest commit, provided at least one member voted YES."""
    yes = sorted(r for r, v in votes.items() if v.yes)
    no = sorted(r for r, v in votes.items() if not v.yes)
    if not votes:
        return Decision(False, [], [], "no members to prepare")
    if not no:
        return Decision(True, yes, [], "all members voted YES")
    reasons = "; ".join(f"{r}: {votes[r].reason}" for r in no)
    if policy == "evict" and len(no) <= max_evict and yes:
        return Decision(True, yes, no, f"evicting {len(no)} member(s): {reasons}")
    return Decision(False, yes, [], f"{len(no)} NO vote(s): {reasons}")


@dataclass
class CoordinatorTxn:
    """One transaction as the coordinator drives it."""

    txn: str
    epoch: int
    version: int
    key: str | None
    members: list[str]
    phase: Phase = Phase.BEGUN
    votes: dict[str, Vote] = field(default_factory=dict)
    acked: set[str] = field(default_factory=set)
    activated: set[str] = field(default_factory=set)
    reason: str = ""
    progress: dict[str, Any] = field(default_factory=dict)  # replica -> prepare answer, as they come
    started: float = field(default_factory=time.monotonic)

    def move(self, new: Phase) -> None:
        if new not in PHASE_TRANSITIONS[self.phase]:
            raise PhaseError(f"txn {self.txn}: {self.phase.value} -> {new.value} not allowed")
        self.phase = new


def default_rollback_target(active: int, origins: dict[int, int], committed: list[int]) -> int | None:
    """The newest committed version older than the active version's origin.

    A version's origin is itself for a refit and its target's origin for a rollback, so repeated
    rollbacks walk back through history instead of bouncing between two versions.
    """
    origin = origins.get(active, active)
    older = [v for v in committed if v < origin]
    return max(older) if older else None
