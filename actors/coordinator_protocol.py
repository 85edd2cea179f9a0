"""The coordinator's side of the two-phase commit, as plain Python (no Ray).

``CoordinatorTxn`` is the one record of one transaction as the coordinator drives it: its phase
(moved only through ``move``, checked against ``PHASE_TRANSITIONS``), its votes, acks and
activations as they arrive. ``tally`` turns votes into a decision under the commit policy.
``default_rollback_target`` and ``retained_versions`` are the pure rules behind rollback and the
checkpoint store's retention.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

__all__ = [
    "PHASE_TRANSITIONS",
    "CoordinatorTxn",
    "Decision",
    "Phase",
    "PhaseError",
    "Vote",
    "default_rollback_target",
    "retained_versions",
    "tally",
]


class Phase(str, Enum):
    """Coordinator-side phases of one transaction; each is entered when its work starts."""

    BEGUN = "begun"            # BEGIN being logged, the checkpoint write starting
    PREPARING = "preparing"    # PREPARE sent; votes (and the checkpoint write) coming in
    COMMITTING = "committing"  # COMMIT logged (the commit point)
    ACTIVATING = "activating"  # COMMIT+ACTIVATE sent to every member; acks coming in
    DONE = "done"              # every member serves the version; ACTIVATED logged
    ABORTED = "aborted"        # the transaction will not commit; ABORT logged (or presumed)


PHASE_TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.BEGUN: frozenset({Phase.PREPARING, Phase.ABORTED}),
    Phase.PREPARING: frozenset({Phase.COMMITTING, Phase.ABORTED}),
    Phase.COMMITTING: frozenset({Phase.ACTIVATING}),
    Phase.ACTIVATING: frozenset({Phase.DONE}),
    Phase.DONE: frozenset(),
    Phase.ABORTED: frozenset(),
}

COMMITTED_PHASES = frozenset({Phase.COMMITTING, Phase.ACTIVATING, Phase.DONE})


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
    """What a tally decided: commit (without the ``excluded`` NO voters), or abort, and why."""

    commit: bool
    excluded: list[str]
    reason: str


def tally(votes: dict[str, Vote], *, policy: str, max_exclude: int) -> Decision:
    """Decide a transaction. ``strict``: any NO aborts. ``exclude``: up to ``max_exclude`` NO
    voters are excluded and the rest commit, provided at least one member voted YES."""
    yes = sorted(r for r, v in votes.items() if v.yes)
    no = sorted(r for r, v in votes.items() if not v.yes)
    if not votes:
        return Decision(False, [], "no members to prepare")
    if not no:
        return Decision(True, [], "all members voted YES")
    reasons = "; ".join(f"{r}: {votes[r].reason}" for r in no)
    if policy == "exclude" and len(no) <= max_exclude and yes:
        return Decision(True, no, f"excluding {len(no)} member(s): {reasons}")
    return Decision(False, [], f"{len(no)} NO vote(s): {reasons}")


@dataclass
class CoordinatorTxn:
    """One transaction as the coordinator drives it (the record ``progress`` and ``outcome`` read)."""

    txn: str
    epoch: int
    version: int
    key: str | None
    members: list[str]
    phase: Phase = Phase.BEGUN
    origin_version: int | None = None
    votes: dict[str, Vote] = field(default_factory=dict)  # as they arrive
    commit_acks: set[str] = field(default_factory=set)
    activated: set[str] = field(default_factory=set)
    excluded: list[str] = field(default_factory=list)  # by the tally, or after COMMIT
    timings: dict[str, float] = field(default_factory=dict)  # prepare_s, and the checkpoint write's
    started: float = field(default_factory=time.monotonic)
    laps: dict[str, float] = field(default_factory=dict)  # seconds per step, in the order taken
    persist_job: Any = None  # replicated: the checkpoint write, until it is handed to the tracker
    canary: bool = False  # committed on a canary cohort only: no ACTIVATED until promoted
    logged_as: str | None = None  # the log's transaction id, when it differs (a canary's promote)
    _lap_mark: float = field(default_factory=time.perf_counter, repr=False)

    def lap(self, step: str) -> None:
        """Record the seconds since the previous lap (or since this record was made) as ``step``."""
        now = time.perf_counter()
        self.laps[step] = self.laps.get(step, 0.0) + now - self._lap_mark
        self._lap_mark = now

    def move(self, new: Phase) -> None:
        if new not in PHASE_TRANSITIONS[self.phase]:
            raise PhaseError(f"txn {self.txn}: {self.phase.value} -> {new.value} not allowed")
        self.phase = new

    @property
    def committed(self) -> bool:
        return self.phase in COMMITTED_PHASES

    def progress(self) -> dict[str, Any]:
        """A snapshot for ``progress()`` callers (copies: the driving thread keeps writing)."""
        return {"txn": self.txn, "version": self.version, "phase": self.phase.value,
                "members": list(self.members),
                "votes": {r: ("YES" if v.yes else "NO") for r, v in list(self.votes.items())},
                "committed": sorted(self.commit_acks), "activated": sorted(self.activated),
                "elapsed_s": time.monotonic() - self.started}


def default_rollback_target(active: int, origins: dict[int, int], committed: Iterable[int]) -> int | None:
    """The newest committed version older than the active version's origin.

    A version's origin is itself for a refit and its target's origin for a rollback, so repeated
    rollbacks walk back through history instead of bouncing between two versions.
    """
    origin = origins.get(active, active)
    older = [v for v in committed if v < origin]
    return max(older) if older else None


def retained_versions(*, active: int, committed: Iterable[int], origins: dict[int, int],
                      retain: int, in_flight: int | None, last_assigned: int) -> set[int]:
    """The checkpoint versions to keep: the base (0), the active and the previous one, the newest
    ``retain`` committed ones, the one in flight, the default rollback target, and every number
    above the active one (a transaction may be writing it)."""
    ordered = sorted(set(committed) | {0})
    keep = {0, active, *[v for v in ordered if v < active][-1:], *ordered[-retain:]}
    if in_flight is not None:
        keep.add(in_flight)
    target = default_rollback_target(active, origins, ordered)
    if target is not None:
        keep.add(target)
    keep.update(range(active + 1, last_assigned + 1))
    return keep
