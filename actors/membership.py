"""Who is in the fleet, as the coordinator counts it: one state per replica (plain Python, no Ray).

A replica is a ``MEMBER`` (serves under leases the coordinator renews, takes part in refits),
``EXCLUDED`` (taken out after a failure: no renewals; it serves again only once the repair loop
has caught it up and re-admitted it) or ``LEAVING`` (being drained and stopped). One word for
being taken out: *exclude* (epoch *fencing* is another idea: refusing an older coordinator).

Every admission and exclusion bumps the replica's membership ``generation``. Renewals and
exclusions carry it, and a replica ignores any that is older than the newest it has seen, so a
renewal that was sent before an exclusion and lands after it cannot re-admit the replica.
Transitions follow ``MEMBER_TRANSITIONS``; anything else raises ``MembershipError``.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from enum import Enum

__all__ = ["MEMBER_TRANSITIONS", "MemberState", "Membership", "MembershipError", "Seat"]


class MemberState(str, Enum):
    MEMBER = "member"
    EXCLUDED = "excluded"
    LEAVING = "leaving"


MEMBER_TRANSITIONS: dict[MemberState | None, frozenset[MemberState]] = {
    None: frozenset({MemberState.MEMBER, MemberState.EXCLUDED}),
    MemberState.MEMBER: frozenset({MemberState.EXCLUDED, MemberState.LEAVING}),
    MemberState.EXCLUDED: frozenset({MemberState.MEMBER, MemberState.LEAVING}),
    MemberState.LEAVING: frozenset(),
}


class MembershipError(Exception):
    """A membership change the transition table does not allow."""


@dataclass
class Seat:
    """One replica's place in the fleet."""

    rid: str
    state: MemberState
    generation: int
    renewed_at: float = 0.0  # monotonic time of the last renewal sent to it; 0: never
    reason: str = ""  # why it was excluded


class Membership:
    """Thread-safe container of every replica's ``Seat``; see the module docstring."""

    def __init__(self) -> None:
        self._seats: dict[str, Seat] = {}
        self._lock = threading.Lock()

    def _move(self, rid: str, new: MemberState, reason: str = "") -> Seat:
        seat = self._seats.get(rid)
        old = seat.state if seat else None
        if new not in MEMBER_TRANSITIONS[old]:
            raise MembershipError(f"replica {rid}: {old.value if old else 'unknown'} -> {new.value} "
                                  "not allowed")
        if seat is None:
            seat = self._seats[rid] = Seat(rid, new, 0)
        seat.state = new
        seat.generation += 1
        seat.reason = reason
        return seat

    def admit(self, rid: str) -> int:
        """Make ``rid`` a member (new, or re-admitted); returns its new generation."""
        with self._lock:
            seat = self._seats.get(rid)
            if seat is not None and seat.state is MemberState.MEMBER:
                return seat.generation
            return self._move(rid, MemberState.MEMBER).generation

    def exclude(self, rid: str, reason: str) -> int | None:
        """Fence a member out; returns its new generation, None if it was not a member."""
        with self._lock:
            seat = self._seats.get(rid)
            if seat is None:
                return self._move(rid, MemberState.EXCLUDED, reason).generation
            if seat.state is not MemberState.MEMBER:
                return None
            return self._move(rid, MemberState.EXCLUDED, reason).generation

    def leave(self, rid: str) -> bool:
        """Start removing ``rid``; False if it is unknown or already leaving."""
        with self._lock:
            seat = self._seats.get(rid)
            if seat is None or seat.state is MemberState.LEAVING:
                return False
            self._move(rid, MemberState.LEAVING)
            return True

    def forget(self, rid: str) -> None:
        with self._lock:
            self._seats.pop(rid, None)

    def renewed(self, rid: str, generation: int, at: float | None = None) -> bool:
        """Record a renewal sent at ``at`` under ``generation``; False (nothing recorded) if the
        replica's seat moved on meanwhile."""
        with self._lock:
            seat = self._seats.get(rid)
            if seat is None or seat.state is not MemberState.MEMBER or seat.generation != generation:
                return False
            seat.renewed_at = time.monotonic() if at is None else at
            return True

    # -- queries

    def get(self, rid: str) -> Seat | None:
        with self._lock:
            seat = self._seats.get(rid)
            return None if seat is None else Seat(**vars(seat))

    def in_state(self, state: MemberState) -> list[str]:
        with self._lock:
            return sorted(r for r, s in self._seats.items() if s.state is state)

    def members(self) -> list[str]:
        return self.in_state(MemberState.MEMBER)

    def excluded(self) -> list[str]:
        return self.in_state(MemberState.EXCLUDED)

    def is_member(self, rid: str) -> bool:
        with self._lock:
            seat = self._seats.get(rid)
            return seat is not None and seat.state is MemberState.MEMBER

    def renewal_targets(self) -> list[tuple[str, int]]:
        """``(rid, generation)`` of every member, as of now."""
        with self._lock:
            return [(r, s.generation) for r, s in sorted(self._seats.items())
                    if s.state is MemberState.MEMBER]

    def seats(self) -> list[Seat]:
        with self._lock:
            return [Seat(**vars(s)) for _, s in sorted(self._seats.items())]
