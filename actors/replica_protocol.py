"""The replica's side of the two-phase commit, as plain Python (no Ray, no engine).

A ``ReplicaParticipant`` decides, for every protocol message, whether it is allowed; the actor
does the work (fetch, verify, stage, swap) and reports back. Rules:

- Epoch fencing: a message from an epoch older than the highest seen is refused (``StaleEpoch``).
  Seeing a newer epoch drops every undecided (PREPARING/PREPARED) transaction of older epochs:
  their staged sets must be discarded (``on_new_epoch`` returns them).
- Transitions follow ``TRANSITIONS``; anything else raises ``ProtocolViolation``.
- COMMIT, ABORT and ACTIVATE are idempotent: repeating one that already took effect is a no-op.
- A decided transaction id is remembered, so a PREPARE arriving after its ABORT is refused and
  stages nothing.
- A transaction's record holds its staged set (``TxnRecord.staged``): every move that frees it
  (ABORTED, SUPERSEDED, ACTIVE) is where the actor discards or commits it, so the two never drift.
- A catch-up (``sync_to``) supersedes every transaction still holding or building a staged set.
- The coordinator runs one transaction at a time per epoch, so a PREPARE of a newer version
  implies every older undecided transaction of the same epoch was aborted (a commit would have
  reached this replica or caught it up first): ``drop_older_undecided`` frees their sets even
  when their ABORT was lost.

``ReplicaLifecycle`` is the replica's own state (loading, catching up, serving, failed, draining),
moved only along ``LIFECYCLE_TRANSITIONS``: draining is final, so a catch-up cannot turn a
draining replica back into a serving one.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum
from typing import Any

from .errors import ProtocolViolation, StaleEpoch

__all__ = [
    "DECIDED", "FORGETTABLE", "HOLDING", "LIFECYCLE_TRANSITIONS", "TRANSITIONS", "UNDECIDED", "Lifecycle",
    "NodeDuty", "ProtocolViolation", "ReplicaLifecycle", "ReplicaParticipant", "StaleEpoch", "TxnRecord",
    "TxnState",
]


@dataclass(frozen=True)
class NodeDuty:
    """What one member does with its node's object-store copy of a published version in PREPARE.

    ``verifiers`` (node -> replica) names the one member per node that checks the node's copy
    (``designated``: the behaviour probes run there); without it, or for a node it does not
    name, every member checks its own. The designated member hashes the copy (``hash``) unless the
    caller took the checksums of that very copy (``hashed_on``, the caller's node). A replica named
    for a node it is not on (it moved) must vote NO (``refused``), so no node's copy goes unchecked.
    """

    designated: bool
    hash: bool
    refused: str = ""

    @classmethod
    def of(cls, verifiers: dict[str, str] | None, hashed_on: str | None, node: str,
           replica_id: str) -> NodeDuty:
        elsewhere = sorted(n for n, rid in (verifiers or {}).items() if rid == replica_id and n != node)
        if elsewhere:
            return cls(False, False, f"replica {replica_id} was named the verifier of node {elsewhere[0]} "
                                     f"but runs on {node}")
        designated = (verifiers or {}).get(node, replica_id) == replica_id
        return cls(designated, designated and node != hashed_on)


class TxnState(str, Enum):
    """State of one transaction on one replica."""

    PREPARING = "preparing"  # PREPARE accepted, fetching/verifying/staging
    PREPARED = "prepared"    # voted YES, staged set held
    REFUSED = "refused"      # voted NO; nothing held
    COMMITTED = "committed"  # COMMIT received: staged set pinned, old version still served
    ACTIVE = "active"        # ACTIVATE done: the new version serves
    ABORTED = "aborted"      # ABORT received or dropped after an epoch change; staged set freed
    SUPERSEDED = "superseded"  # a catch-up moved the replica past it; staged set freed


TRANSITIONS: dict[TxnState | None, frozenset[TxnState]] = {
    None: frozenset({TxnState.PREPARING, TxnState.ABORTED}),
    TxnState.PREPARING: frozenset({TxnState.PREPARED, TxnState.REFUSED, TxnState.ABORTED,
                                   TxnState.SUPERSEDED}),
    TxnState.PREPARED: frozenset({TxnState.COMMITTED, TxnState.ABORTED, TxnState.SUPERSEDED}),
    TxnState.REFUSED: frozenset({TxnState.ABORTED}),
    TxnState.COMMITTED: frozenset({TxnState.ACTIVE, TxnState.SUPERSEDED}),
    TxnState.ACTIVE: frozenset(),
    TxnState.ABORTED: frozenset(),
    TxnState.SUPERSEDED: frozenset(),
}

DECIDED = frozenset({TxnState.COMMITTED, TxnState.ACTIVE, TxnState.ABORTED, TxnState.SUPERSEDED})
UNDECIDED = frozenset({TxnState.PREPARING, TxnState.PREPARED, TxnState.REFUSED})
FORGETTABLE = frozenset({TxnState.ACTIVE, TxnState.ABORTED, TxnState.SUPERSEDED})  # hold no staged set
HOLDING = frozenset({TxnState.PREPARING, TxnState.PREPARED, TxnState.COMMITTED})  # may hold one


@dataclass
class TxnRecord:
    """What a replica knows of one transaction."""

    txn: str
    epoch: int
    version: int
    state: TxnState
    reason: str = ""
    staged: Any = None  # the engine's staged set while PREPARED or COMMITTED

    def take_staged(self) -> Any:
        """Hand over the staged set (to discard or commit it) and forget it here."""
        staged, self.staged = self.staged, None
        return staged


class ReplicaParticipant:
    """Per-replica transaction bookkeeping; see the module docstring for its rules."""

    def __init__(self, remember: int = 1024) -> None:
        self.epoch = 0
        self._txns: OrderedDict[str, TxnRecord] = OrderedDict()
        self._remember = remember

    # -- queries
    def get(self, txn: str) -> TxnRecord | None:
        return self._txns.get(txn)

    def pending(self) -> list[TxnRecord]:
        """Transactions holding a staged set (PREPARED or COMMITTED)."""
        return [r for r in self._txns.values() if r.state in (TxnState.PREPARED, TxnState.COMMITTED)]

    def committed_at_least(self, version: int) -> TxnRecord | None:
        """The committed-not-active transaction of the highest version >= ``version``, if any."""
        best = None
        for r in self._txns.values():
            if r.state is TxnState.COMMITTED and r.version >= version and (
                    best is None or r.version > best.version):
                best = r
        return best

    # -- fencing
    def check_epoch(self, epoch: int, keep: str | None = None) -> list[TxnRecord]:
        """Refuse older epochs; on a newer one, drop and return undecided older transactions
        (except ``keep``: the transaction a recovering coordinator is finishing)."""
        if epoch < self.epoch:
            raise StaleEpoch(epoch, self.epoch)
        dropped: list[TxnRecord] = []
        if epoch > self.epoch:
            self.epoch = epoch
            for r in self._txns.values():
                if r.epoch < epoch and r.txn != keep and r.state in UNDECIDED:
                    r.state = TxnState.ABORTED
                    r.reason = f"dropped: undecided when epoch {epoch} began"
                    dropped.append(r)
        return dropped

    # -- transitions
    def _move(self, rec: TxnRecord | None, txn: str, new: TxnState) -> None:
        old = rec.state if rec else None
        if new not in TRANSITIONS[old]:
            was = old.value if old else "unknown"
            raise ProtocolViolation(f"txn {txn}: {was} -> {new.value} not allowed")

    def begin_prepare(self, epoch: int, txn: str, version: int) -> list[TxnRecord]:
        """Accept a PREPARE (returns older-epoch transactions to drop) or raise why not."""
        dropped = self.check_epoch(epoch)
        rec = self._txns.get(txn)
        if rec is not None:
            raise ProtocolViolation(f"txn {txn}: PREPARE refused, already {rec.state.value}")
        self._move(None, txn, TxnState.PREPARING)
        self._txns[txn] = TxnRecord(txn, epoch, version, TxnState.PREPARING)
        self._trim()
        return dropped

    def finish_prepare(self, txn: str, ok: bool, reason: str = "", staged: Any = None) -> bool:
        """Record the vote (and, for YES, the staged set). Returns False if the txn was aborted or
        superseded meanwhile (discard what was staged)."""
        rec = self._txns.get(txn)
        if rec is None or rec.state in (TxnState.ABORTED, TxnState.SUPERSEDED):
            return False
        new = TxnState.PREPARED if ok else TxnState.REFUSED
        self._move(rec, txn, new)
        rec.state, rec.reason = new, reason
        if ok:
            rec.staged = staged
        return ok

    def drop_older_undecided(self, epoch: int, version: int) -> list[TxnRecord]:
        """Abort (and return) every undecided transaction of ``epoch`` older than ``version``."""
        dropped = []
        for r in self._txns.values():
            if r.epoch == epoch and r.version < version and r.state in UNDECIDED:
                r.state = TxnState.ABORTED
                r.reason = f"dropped: the transaction of v{version} began"
                dropped.append(r)
        return dropped

    def supersede(self, txn: str, reason: str) -> tuple[TxnRecord, bool]:
        """A catch-up moved past ``txn``: (record, changed). Idempotent."""
        rec = self._txns.get(txn)
        if rec is None:
            raise ProtocolViolation(f"txn {txn}: nothing to supersede")
        if rec.state is TxnState.SUPERSEDED:
            return rec, False
        self._move(rec, txn, TxnState.SUPERSEDED)
        rec.state, rec.reason = TxnState.SUPERSEDED, reason
        return rec, True

    def supersede_all(self, reason: str) -> list[TxnRecord]:
        """Supersede every transaction that holds or is building a staged set; return them."""
        return [self.supersede(r.txn, reason)[0] for r in list(self._txns.values()) if r.state in HOLDING]

    def commit(self, epoch: int, txn: str) -> tuple[TxnRecord, bool]:
        """COMMIT: (record, changed). Idempotent; refused for an unknown or aborted txn."""
        self.check_epoch(epoch, keep=txn)
        rec = self._txns.get(txn)
        if rec is None:
            raise ProtocolViolation(f"txn {txn}: COMMIT for a transaction this replica never prepared")
        if rec.state in (TxnState.COMMITTED, TxnState.ACTIVE):
            return rec, False
        self._move(rec, txn, TxnState.COMMITTED)
        rec.state = TxnState.COMMITTED
        return rec, True

    def activate(self, epoch: int | None, txn: str) -> tuple[TxnRecord, bool]:
        """ACTIVATE (epoch None: a local early activation for a client's min_version)."""
        if epoch is not None:
            self.check_epoch(epoch, keep=txn)
        rec = self._txns.get(txn)
        if rec is None:
            raise ProtocolViolation(f"txn {txn}: ACTIVATE for a transaction this replica never prepared")
        if rec.state is TxnState.ACTIVE:
            return rec, False
        self._move(rec, txn, TxnState.ACTIVE)
        rec.state = TxnState.ACTIVE
        return rec, True

    def abort(self, epoch: int, txn: str, reason: str = "") -> tuple[TxnRecord, bool]:
        """ABORT: (record, changed). Remembers unknown txns so a late PREPARE is refused."""
        self.check_epoch(epoch)
        rec = self._txns.get(txn)
        if rec is None:
            rec = TxnRecord(txn, epoch, -1, TxnState.ABORTED, reason)
            self._txns[txn] = rec
            self._trim()
            return rec, False
        if rec.state is TxnState.ABORTED:
            return rec, False
        self._move(rec, txn, TxnState.ABORTED)
        rec.state, rec.reason = TxnState.ABORTED, reason
        return rec, True

    def _trim(self) -> None:
        """Forget the oldest finished (ACTIVE/ABORTED) transactions beyond ``remember``; never one
        that still holds or may hold a staged set."""
        excess = len(self._txns) - self._remember
        if excess <= 0:
            return
        for txn in [t for t, r in self._txns.items() if r.state in FORGETTABLE][:excess]:
            del self._txns[txn]


class Lifecycle(str, Enum):
    """The replica's own state."""

    LOADING = "loading"          # loading its engine file
    CATCHING_UP = "catching_up"  # loading the active version; answers stale meanwhile
    SERVING = "serving"
    FAILED = "failed"            # could not load its weights; answers stale, says why in status
    DRAINING = "draining"        # leaving the fleet: refuses new requests, finishes the others


LIFECYCLE_TRANSITIONS: dict[Lifecycle, frozenset[Lifecycle]] = {
    Lifecycle.LOADING: frozenset({Lifecycle.CATCHING_UP, Lifecycle.SERVING, Lifecycle.FAILED,
                                  Lifecycle.DRAINING}),
    Lifecycle.CATCHING_UP: frozenset({Lifecycle.SERVING, Lifecycle.FAILED, Lifecycle.DRAINING}),
    Lifecycle.SERVING: frozenset({Lifecycle.CATCHING_UP, Lifecycle.DRAINING}),
    Lifecycle.FAILED: frozenset({Lifecycle.CATCHING_UP, Lifecycle.DRAINING}),
    Lifecycle.DRAINING: frozenset(),
}


class ReplicaLifecycle:
    """The replica's state, moved only along ``LIFECYCLE_TRANSITIONS`` (thread-safe)."""

    def __init__(self) -> None:
        self.state = Lifecycle.LOADING
        self.error = ""
        self._lock = threading.Lock()

    def move(self, new: Lifecycle, error: str = "") -> bool:
        """Move to ``new`` if the table allows it from the current state; False (unchanged) if not."""
        with self._lock:
            if new is self.state:
                self.error = error or self.error
                return True
            if new not in LIFECYCLE_TRANSITIONS[self.state]:
                return False
            self.state = new
            self.error = error if new is Lifecycle.FAILED else ""
            return True
