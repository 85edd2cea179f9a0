"""Serving leases and the repair of excluded replicas: two background loops of the coordinator.

``LeaseKeeper`` renews every member's lease every third of a lease, each renewal carrying the
member's membership generation (a replica ignores renewals older than its newest generation, so
one sent before an exclusion cannot re-admit it). It records when each renewal was sent, so that
``wait_out`` can sleep until an excluded member's last lease has lapsed. A member that answers a
renewal in state ``failed`` (it cannot load its weights) is reported through ``on_failed``; one
that still holds the staged set of a transaction the coordinator aborted (every ABORT sent to it
was lost) is sent the ABORT again.

``Repairer`` catches excluded replicas up to the version each should serve (the active version; a
canary cohort's member: the canary's), in parallel and without holding the refit lock, then
re-admits those that reached it while no refit was running and their version did not move
meanwhile; a re-admission grants a lease at once and records it.

Both loops survive any exception of one round (logged, then the next round runs).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from .membership import Membership
from .replica_client import ReplicaClient
from .replies import Ack, Failed, LeaseReply

logger = logging.getLogger("weight_refit.coordinator")

__all__ = ["LeaseKeeper", "Repairer", "run_loop"]


def run_loop(name: str, period_s: Callable[[], float], body: Callable[[], None],
             stop: threading.Event) -> threading.Thread:
    """Run ``body`` every ``period_s()`` seconds in a daemon thread until ``stop`` is set."""

    def loop() -> None:
        while not stop.wait(period_s()):
            try:
                body()
            except Exception:  # noqa: BLE001  (one bad round must not end the loop)
                logger.exception("%s round failed; the next one runs as usual", name)

    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    return thread


class LeaseKeeper:
    def __init__(self, client: ReplicaClient, membership: Membership, *, epoch: int, lease_s: float,
                 on_failed: Callable[[str, str], None],
                 aborted: Callable[[str], str | None] = lambda txn: None,
                 cohort_of: Callable[[str], str] = lambda rid: "main") -> None:
        self._client = client
        self._membership = membership
        self.epoch = epoch
        self.lease_s = lease_s
        self._on_failed = on_failed
        self._aborted = aborted
        self._cohort_of = cohort_of
        self._replies = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lease-replies")

    def grant(self, rid: str, generation: int) -> None:
        """Send ``rid`` a lease under ``generation`` and record when."""
        sent = time.monotonic()
        self._client.renew(rid, self.epoch, self.lease_s, generation, self._on_reply,
                           cohort=self._cohort_of(rid))
        self._membership.renewed(rid, generation, sent)

    def settle(self) -> None:
        """Wait until every answer received so far has been acted on."""
        self._replies.submit(lambda: None).result()

    def renew_all(self) -> None:
        for rid, generation in self._membership.renewal_targets():
            self.grant(rid, generation)

    def _on_reply(self, rid: str, reply: LeaseReply | Failed) -> None:
        """Runs on the thread that delivered the answer: hand it off, never block that thread."""
        if isinstance(reply, LeaseReply) and ((reply.accepted and reply.state == "failed") or reply.prepared):
            self._replies.submit(self._act_on, rid, reply)

    def _act_on(self, rid: str, reply: LeaseReply) -> None:
        if reply.accepted and reply.state == "failed":
            self._on_failed(rid, reply.error or "the replica reports state failed")
        for txn in reply.prepared:  # its ABORT was lost: say it again, so the set is freed now
            reason = self._aborted(txn)
            if reason is not None:
                logger.info("replica %s still holds aborted txn %s: sending ABORT again", rid, txn)
                self._client.abort([rid], self.lease_s, self.epoch, txn, reason)

    def wait_out(self, rids: list[str]) -> None:
        """Return once the last lease granted to each of ``rids`` has lapsed."""
        for rid in rids:
            seat = self._membership.get(rid)
            if seat is None:
                continue
            left = seat.renewed_at + self.lease_s - time.monotonic()
            if left > 0:
                time.sleep(left)


class Repairer:
    def __init__(self, client: ReplicaClient, membership: Membership, leases: LeaseKeeper, *,
                 active_version: Callable[[], int], admit: Callable[[str, int], bool],
                 refit_lock: threading.Lock, catch_up_s: float,
                 version_for: Callable[[str], int] | None = None) -> None:
        self._client = client
        self._membership = membership
        self._leases = leases
        self._active_version = active_version
        self._admit = admit
        self._refit_lock = refit_lock
        self._catch_up_s = catch_up_s
        self._version_for = version_for or (lambda rid: self._active_version())

    def repair(self) -> list[str]:
        """One round; returns the re-admitted replicas."""
        excluded = self._membership.excluded()
        if not excluded:
            return []
        alive = [rid for rid, st in self._client.status(excluded, 2.0).items() if isinstance(st, dict)]
        if not alive:
            return []
        targets = {rid: self._version_for(rid) for rid in alive}
        results: dict[str, Ack | Failed] = {}
        for version in sorted(set(targets.values())):
            results.update(self._client.catch_up([r for r in alive if targets[r] == version], version,
                                                 self._catch_up_s))
        ready = [rid for rid, r in results.items() if isinstance(r, Ack) and r.version == targets[rid]]
        for rid, r in results.items():
            if rid not in ready:
                logger.info("excluded replica %s not caught up to v%s yet: %s", rid, targets[rid],
                            r.reason if isinstance(r, Failed) else f"at v{r.version}")
        if not ready or not self._refit_lock.acquire(blocking=False):
            return []  # a refit is running: its outcome may move the active version; next round
        try:
            return [rid for rid in ready
                    if self._version_for(rid) == targets[rid] and self._admit(rid, targets[rid])]
        finally:
            self._refit_lock.release()
