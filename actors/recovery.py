"""A coordinator incarnation's recovery, retried until it succeeds.

Recovery opens the log, bumps the epoch (fsync'd) before anything is sent, replays the log,
appends ABORT for every transaction it does not show as committed (presumed abort), finishes every
logged COMMIT (COMMIT and ACTIVATE, members caught up from the store), writes every committed
version whose checkpoint was not written yet from a replica that holds it (or, when none does,
moves the fleet to a new version re-installing the newest stored weights), and catches members up
to the active version. Any failure (a corrupted log, a full disk, an unreadable checkpoint) is
recorded with its cause and the whole attempt is retried after ``retry_s``; every step is
idempotent. Until an attempt succeeds, refits are refused with the cause, and ``status`` shows it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from enum import Enum
from typing import Any

from .ledger import Ledger, describe_log_error
from .log import AbortRecord, LostRecord, PersistedRecord
from .membership import Membership
from .replica_client import ReplicaClient
from .replies import Ack
from .two_phase import TwoPhaseCommit

logger = logging.getLogger("weight_refit.coordinator")

__all__ = ["Recovery", "RecoveryState", "finish_the_log", "persist_the_log", "restore_membership",
           "sync_members"]


def restore_membership(members: dict[str, str], client: ReplicaClient, membership: Membership) -> None:
    """Seat every replica the log names (last event: join -> member, exclude -> excluded) that is
    still running."""
    for rid, event in members.items():
        if event == "leave" or not client.attach(rid):
            if event != "leave":
                logger.warning("member %s named by the log is not running", rid)
            continue
        if event == "join":
            membership.admit(rid)
        else:
            membership.exclude(rid, "excluded before the coordinator restarted")


def finish_the_log(ledger: Ledger, txns: TwoPhaseCommit) -> None:
    """Presumed abort for every undecided transaction; finish every logged COMMIT, in order."""
    for txn in list(ledger.state.undecided):
        ledger.append(AbortRecord(epoch=ledger.epoch, txn=txn,
                                  reason="presumed abort: coordinator restarted before COMMIT"),
                      deferrable=True)
    for txn in list(ledger.state.committed_not_activated):
        o = ledger.state.outcomes[txn]
        assert o.version is not None
        info = ledger.state.versions.get(o.version)
        txns.finish_logged(txn, o.version, o.key, info.origin_version if info else None)


def persist_the_log(ledger: Ledger, txns: TwoPhaseCommit, persister: Any, *, persist_s: float,
                    export: Callable[[int], tuple[Any, bool]],
                    newest_stored: Callable[[int], tuple[int, dict[str, str]]]) -> None:
    """Write every committed-but-unpersisted version from a live holder; a version nobody holds
    any more is lost: the newest is replaced by a new version re-installing the newest stored
    weights (``newest_stored(below)``), an older one is only recorded. Raises (recovery retries)
    while who holds a version cannot be told yet, or a write fails."""
    for txn, version in ledger.state.unpersisted:
        job, nobody_holds = export(version)
        if job is not None:
            _, error = persister.wait(persister.start(job), time.monotonic() + persist_s)
            if error:
                raise RuntimeError(f"re-persisting committed v{version} from a replica failed: {error}")
            ledger.append(PersistedRecord(epoch=ledger.epoch, txn=txn, version=version), deferrable=True)
            continue
        if not nobody_holds:
            raise RuntimeError(f"committed v{version} is not persisted and its holders do not all answer yet")
        why = "every replica holding it and the coordinator were lost before its checkpoint was written"
        if version == max(ledger.state.versions, default=0):
            source, sums = newest_stored(version)
            result = txns.reinstall(txn, version, why, source, sums)
            if result.status != "committed":
                raise RuntimeError(result.reason)
        else:
            ledger.append(LostRecord(epoch=ledger.epoch, txn=txn, version=version, reason=why),
                          deferrable=True)


def sync_members(ledger: Ledger, txns: TwoPhaseCommit, client: ReplicaClient, membership: Membership, *,
                 request_s: float, catch_up_s: float) -> None:
    """Catch every member up to its version (the active one; a canary cohort's member: the
    canary's), in parallel; exclude those that cannot."""
    state = ledger.state
    members = membership.members()
    target = {rid: state.version_for(rid) for rid in members}
    behind = [rid for rid, st in client.status(members, request_s).items()
              if not (isinstance(st, dict) and st.get("version") == target[rid]
                      and st.get("state") == "serving")]
    for version in sorted({target[r] for r in behind}):
        group = [r for r in behind if target[r] == version]
        for rid, reply in client.catch_up(group, version, catch_up_s).items():
            if not (isinstance(reply, Ack) and reply.version == version):
                txns.exclude(rid, f"could not catch up to v{version} after a restart: "
                                  f"{getattr(reply, 'reason', reply)}")


class RecoveryState(str, Enum):
    RECOVERING = "recovering"
    FAILED = "failed"  # the last attempt failed; another one follows
    READY = "ready"


class Recovery:
    def __init__(self, attempt: Callable[[], None], *, retry_s: float, stop: threading.Event) -> None:
        self._attempt = attempt
        self._retry_s = retry_s
        self._stop = stop
        self.state = RecoveryState.RECOVERING
        self.error = ""
        self.attempts = 0
        self._tried = threading.Event()  # set after the first attempt, whatever its result
        self._ready = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._run, name="recovery", daemon=True).start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.attempts += 1
            try:
                self._attempt()
            except Exception as exc:  # noqa: BLE001  (recorded, shown, retried)
                self.error = describe_log_error(exc)
                self.state = RecoveryState.FAILED
                logger.exception("recovery attempt %d failed; retrying in %gs", self.attempts, self._retry_s)
                self._tried.set()
                self._stop.wait(self._retry_s)
                continue
            self.error = ""
            self.state = RecoveryState.READY
            self._ready.set()
            self._tried.set()
            return

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def wait(self, timeout: float) -> str:
        """Wait for recovery (at most ``timeout``, and no longer than its first attempt once that
        failed); "" when ready, else why refits are refused now."""
        if self._ready.is_set():
            return ""
        self._tried.wait(timeout)
        if self._ready.wait(0 if self.state is RecoveryState.FAILED else timeout):
            return ""
        if self.state is RecoveryState.FAILED:
            return (f"the coordinator could not recover (attempt {self.attempts}, retried every "
                    f"{self._retry_s:g}s): {self.error}")
        return "the coordinator is still recovering"

    def summary(self) -> dict[str, object]:
        return {"state": self.state.value, "error": self.error, "attempts": self.attempts}
