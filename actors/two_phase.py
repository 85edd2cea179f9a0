"""The two-phase commit of one transaction, one method per phase (plain Python: Ray only behind the
``ReplicaClient`` and ``Persister`` it is given, so tests drive it with fakes).

``run`` (a refit or rollback; the caller holds the refit lock):
1. ``_begin``: assign the next version, log BEGIN, start the checkpoint write. A BEGIN that cannot
   be logged refuses the refit; nothing was sent, nothing changed.
2. ``_prepare``: PREPARE to every member at once; each answer is recorded as it arrives.
3. ``_decide``: wait for the checkpoint write, tally the votes under the commit policy, and log
   the exclusions the tally made (fsync'd).
4. ``_log_commit``: the COMMIT record, fsync'd: the commit point.
   Any failure before this point (a NO, a timeout, a failed write, an exception of our own) aborts:
   ABORT is logged, every member is told to discard its staged set, the version's files go.
5. ``finish`` (also used by recovery for logged-committed transactions): one message to every
   member that COMMITs and ACTIVATEs (each member swaps as soon as it gets it: no member can
   serve the version before its COMMIT record, and every member already holds it verified); a
   lost message is retried once (it is idempotent); members still without the version are caught
   up from the store in parallel, and those that cannot be are excluded; then ACTIVATED is logged
   and retention scheduled. Under ``replicated`` the checkpoint write is then handed to the
   ``PersistTracker``.

Canaries (``actors.canary``): a refit with ``canary`` runs the same phases among its cohort only,
writes its checkpoint before COMMIT whatever the durability (a canary replica that restarts, and
the promote, load it from the store), and logs no ACTIVATED: the rest of the fleet stays on the
active version. ``promote`` PREPAREs the canary's version (from the store) on the rest of the
fleet, logs CANARY promote (fsync'd: its one commit point) once the tally allows, then COMMITs and
ACTIVATEs it there and logs ACTIVATED; a NO vote leaves the canary running. Aborting a canary is
a rollback-like transaction (``run``) to the pre-canary version across the whole fleet.

The transaction's phase moves when each phase's work starts, so ``progress()`` and ``outcome()``
(which read ``current`` once) always describe what is really happening.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from .coordinator_protocol import CoordinatorTxn, Decision, Phase, Vote, tally
from .failpoints import Failpoints
from .leases import LeaseKeeper
from .ledger import Ledger, describe_log_error
from .log import (
    ActivatedRecord,
    BeginRecord,
    CanaryRecord,
    CanarySpec,
    CanaryState,
    CommitRecord,
    LostRecord,
    MemberRecord,
)
from .membership import Membership
from .payload import is_inline
from .persist import PersistJob
from .replica_client import ReplicaClient
from .replies import Ack, Failed, PrepareReply
from .settings import CoordinatorSettings
from .telemetry import count_prepare_failure, observe_refit, phase_log, reason_class

logger = logging.getLogger("weight_refit.coordinator")

__all__ = ["RefitRequest", "TwoPhaseCommit", "TxnResult"]


@dataclass(frozen=True)
class RefitRequest:
    """What to commit: published refs (a refit) or a stored version to re-install (a rollback)."""

    refs: list[Any] | None
    specs: dict[str, Any]
    checksums: dict[str, str]  # of the tensors the refs carry (a rollback: the source version's)
    full: dict[str, str]  # of the version's full weight set
    key: str | None
    origin: int | None = None
    base_version: int | None = None  # the active version a subset refit builds on
    from_version: int | None = None
    probes: list[Any] | None = None  # engines.Probe: run on the staged set in PREPARE
    canary: CanarySpec | None = None  # commit on this cohort only
    hashed_on: str | None = None  # the node whose object-store copy the caller hashed (its own)


def _in_object_store(refs: list[Any] | None) -> bool:
    """Whether a version's buckets are object-store copies, one per node (not a stored version
    each member loads, nor buckets travelling inside the calls: a copy per member)."""
    return refs is not None and not any(is_inline(b) for b in refs)


def _hashed_on(req: RefitRequest) -> str | None:
    """The node whose object-store copy of the buckets the caller took the checksums of."""
    return req.hashed_on if _in_object_store(req.refs) else None


@dataclass
class TxnResult:
    """What ``Coordinator.refit``/``rollback``/``outcome`` answer the driver."""

    status: str  # committed | aborted | in_doubt | noop | unknown
    txn: str | None
    version: int | None
    key: str | None = None
    reason: str = ""
    votes: dict[str, str] = field(default_factory=dict)
    activated: bool = False
    duplicate: bool = False
    phase: str | None = None
    duration_s: float = 0.0
    prepare_s: float = 0.0
    persist: dict[str, float] = field(default_factory=dict)
    excluded: list[str] = field(default_factory=list)
    replicas: dict[str, dict[str, float]] = field(default_factory=dict)
    persisted: bool = True  # the version's checkpoint was durable when this was answered
    unpersisted: list[int] | None = None  # versions not yet checkpointed when answered (None: unknown)
    phases: dict[str, float] = field(default_factory=dict)  # seconds in each step, in order
    canary: dict[str, Any] | None = None  # a canary refit: its cohort and traffic share


class PersisterLike(Protocol):
    def ensure(self) -> None: ...
    def start(self, job: PersistJob) -> Any: ...
    def wait(self, pending: Any, deadline: float) -> tuple[dict[str, float], str]: ...


class PersistTrackerLike(Protocol):
    def track(self, txn: str, version: int, pending: Any) -> None: ...
    def start(self, txn: str, version: int, job: PersistJob) -> None: ...
    def discard(self, version: int, pending: Any) -> None: ...
    def wait(self, version: int, timeout: float, *, unless_failing: bool = False) -> bool: ...


class RetentionLike(Protocol):
    def schedule(self, keep: set[int], below: int) -> None: ...
    def later(self, work: Callable[[], Any]) -> None: ...
    def drop(self, version: int) -> None: ...


def _vote(rid: str, reply: PrepareReply | Failed) -> Vote:
    if isinstance(reply, PrepareReply):
        return Vote(rid, reply.yes, reply.reason, dict(reply.timings))
    return Vote(rid, False, reply.reason)


def _why(exc: BaseException) -> str:
    return describe_log_error(exc)


class TwoPhaseCommit:
    """See the module docstring."""

    def __init__(self, settings: CoordinatorSettings, ledger: Ledger, client: ReplicaClient,
                 persister: PersisterLike, membership: Membership, leases: LeaseKeeper,
                 retention: RetentionLike, fp: Failpoints,
                 retained: Callable[[int | None], set[int]]) -> None:
        self._s = settings
        self._t = settings.timeouts
        self._ledger = ledger
        self._client = client
        self._persister = persister
        self._membership = membership
        self._leases = leases
        self._retention = retention
        self._fp = fp
        self._retained = retained
        self._replicated = settings.durability == "replicated"
        self.tracker: PersistTrackerLike | None = None
        self.current: CoordinatorTxn | None = None
        self._nodes: dict[str, str] = {}  # rid -> the Ray node its last vote came from

    @property
    def epoch(self) -> int:
        return self._ledger.epoch

    # ------------------------------------------------------------------ the whole transaction

    def run(self, req: RefitRequest) -> TxnResult:
        t0 = time.perf_counter()
        members = self._membership.members()
        if req.canary is not None:
            members = [r for r in members if r in req.canary.cohort]
        txn = CoordinatorTxn(txn=uuid.uuid4().hex[:16], epoch=self.epoch,
                             version=self._ledger.state.last_version + 1, key=req.key,
                             members=members, origin_version=req.origin, canary=req.canary is not None)
        self.current = txn
        lap = txn.lap
        replicated = self._replicated and req.canary is None
        try:
            try:
                self._begin(txn, req)
                lap("begin_log_s")
            except Exception as exc:  # noqa: BLE001  (nothing was logged or sent)
                return self._refuse(txn, _why(exc), t0)
            write: list[tuple[Any, float]] = []  # the checkpoint write COMMIT waits for (disk)
            try:
                if not replicated:  # under replicated it follows the refit (_start_tracked_write)
                    write.append(self._start_persist(txn, req))
                    lap("persist_start_s")
                self._prepare(txn, req)
                lap("prepare_s")
                decision = self._decide(txn, write[0] if write else None)
                lap("decide_s")
                if not decision.commit:
                    return self._abort(txn, decision.reason, t0, write)
                self._log_commit(txn)
                lap("commit_log_s")
            except Exception as exc:  # noqa: BLE001  (anything before the commit point aborts)
                logger.exception("txn %s failed before its commit point", txn.txn)
                return self._abort(txn, _why(exc), t0, write)
            if replicated and self.tracker is not None:
                txn.persist_job = self._persist_job(txn, req)
            replies = self.finish(txn, t0)
            self._start_tracked_write(txn)  # once the members serve it: off the refit's path
            self._leases.wait_out(txn.excluded)
            lap("after_s")
            return self._committed(txn, replies, t0)
        finally:
            self.current = None

    # ------------------------------------------------------------------ phases

    def _begin(self, txn: CoordinatorTxn, req: RefitRequest) -> None:
        durability = "disk" if req.canary is not None else self._s.durability
        self._ledger.append(BeginRecord(epoch=self.epoch, txn=txn.txn, version=txn.version, key=txn.key,
                                        checksums=req.full, origin_version=req.origin,
                                        durability=durability, canary=req.canary))
        phase_log("coordinator", "begin", txn.txn, txn.version, 0.0, members=txn.members, key=txn.key)
        self._fp.hit("coordinator.after_begin")

    def _persist_job(self, txn: CoordinatorTxn, req: RefitRequest) -> PersistJob:
        return PersistJob(state_dir=self._s.state_dir, version=txn.version, refs=req.refs,
                          specs=req.specs, checksums=req.checksums, base_version=req.base_version,
                          from_version=req.from_version, fsync=self._s.persist_fsync,
                          state_options=self._s.state_options,
                          hashed_on=_hashed_on(req))

    def _start_persist(self, txn: CoordinatorTxn, req: RefitRequest) -> tuple[Any, float]:
        self._persister.ensure()
        return self._persister.start(self._persist_job(txn, req)), time.monotonic() + self._t.persist_s

    def _prepare(self, txn: CoordinatorTxn, req: RefitRequest) -> None:
        txn.move(Phase.PREPARING)
        t = time.perf_counter()
        source = {"from_version": req.from_version} if req.from_version is not None else None

        def record(rid: str, reply: PrepareReply | Failed) -> None:
            txn.votes[rid] = _vote(rid, reply)
            if isinstance(reply, PrepareReply) and reply.node:
                self._nodes[rid] = reply.node

        self._client.prepare(txn.members, self._t.prepare_s, self.epoch, txn.txn, txn.version,
                             req.refs, req.specs, req.checksums, source, req.base_version,
                             on_reply=record, verifiers=self._verifiers(txn.members, req), probes=req.probes,
                             hashed_on=_hashed_on(req))
        for rid in txn.members:
            txn.votes.setdefault(rid, Vote(rid, False, "no answer to prepare"))
        txn.timings["prepare_s"] = time.perf_counter() - t
        for vote in txn.votes.values():
            if not vote.yes:
                count_prepare_failure(self._s.fleet, reason_class(vote.reason))
        phase_log("coordinator", "prepare", txn.txn, txn.version, txn.timings["prepare_s"],
                  yes=sorted(r for r, v in txn.votes.items() if v.yes),
                  no={r: v.reason for r, v in txn.votes.items() if not v.yes})

    def _verifiers(self, members: list[str], req: RefitRequest) -> dict[str, str] | None:
        return self.verifiers_for(members, req.refs)

    def verifiers_for(self, members: list[str], refs: list[Any] | None) -> dict[str, str] | None:
        """The members of one node read one object-store copy of a published version, so one of
        them (the first, by id, whose node a vote named) checks it (hashes it, unless the caller
        hashed that copy: ``NodeDuty``); the others stage it without hashing. A member whose node
        is not known yet checks its own."""
        if not _in_object_store(refs):
            return None  # each member reads its own copy: a stored version, or one inside the call
        out: dict[str, str] = {}
        for rid in sorted(members):
            node = self._nodes.get(rid)
            if node is not None:
                out.setdefault(node, rid)
        return out or None

    def _decide(self, txn: CoordinatorTxn, pending: tuple[Any, float] | None) -> Decision:
        """The tally; under ``disk`` durability the checkpoint write must have landed too."""
        decision = tally(txn.votes, policy=self._s.commit_policy, max_exclude=self._s.max_exclude)
        if pending is not None:
            persisted, persist_error = self._persister.wait(*pending)
            txn.timings.update({f"persist_{k}": v for k, v in persisted.items()})
            if persist_error:
                return Decision(False, [], persist_error)
        for rid in decision.excluded:
            self.exclude(rid, f"excluded from v{txn.version}: {txn.votes[rid].reason}",
                         deferrable=False, txn=txn)
        return decision

    def _log_commit(self, txn: CoordinatorTxn) -> None:
        self._ledger.append(CommitRecord(epoch=self.epoch, txn=txn.txn, version=txn.version))
        txn.move(Phase.COMMITTING)
        phase_log("coordinator", "commit_logged", txn.txn, txn.version, time.monotonic() - txn.started)
        self._fp.hit("coordinator.after_decision_logged")

    def finish_logged(self, txn: str, version: int, key: str | None, origin: int | None) -> None:
        """Recovery: finish a transaction whose COMMIT an earlier incarnation logged (visible to
        ``progress`` and ``outcome`` like any other)."""
        record = CoordinatorTxn(txn=txn, epoch=self.epoch, version=version, key=key,
                                members=self._membership.members(), phase=Phase.COMMITTING,
                                origin_version=origin)
        self.current = record
        try:
            self.finish(record, time.perf_counter())
        finally:
            self.current = None

    def finish(self, txn: CoordinatorTxn, t0: float) -> dict[str, Ack | Failed]:
        """COMMIT and ACTIVATE a transaction whose COMMIT is logged, in one message per member
        (see the module docstring)."""
        members = [r for r in txn.members if self._membership.is_member(r)]
        txn.move(Phase.ACTIVATING)
        first: list[str] = []

        def on_reply(rid: str, reply: Ack | Failed) -> None:
            if isinstance(reply, Ack):
                txn.commit_acks.add(rid)
                if reply.version == txn.version:
                    txn.activated.add(rid)
            if not first:
                first.append(rid)
                self._fp.hit("coordinator.mid_activate")

        replies: dict[str, Ack | Failed] = dict(self._send_twice(
            self._client.commit, members, self._t.commit_s + self._t.activate_s, txn.txn,
            on_reply=on_reply, activate=True))
        txn.activated.update(r for r, a in replies.items()
                             if isinstance(a, Ack) and a.version == txn.version)
        txn.lap("commit_activate_s")
        lost = [r for r in members if r not in txn.activated]
        if lost:
            if self._start_tracked_write(txn):  # they catch up from the store: it must be there
                assert self.tracker is not None
                self.tracker.wait(txn.version, min(self._t.persist_s, self._t.launch_s), unless_failing=True)
            caught = self._client.catch_up(lost, txn.version, self._t.launch_s)
            for rid, reply in caught.items():
                if isinstance(reply, Ack) and reply.version == txn.version:
                    txn.activated.add(rid)
                    replies[rid] = reply
                else:
                    why = reply.reason if isinstance(reply, Failed) else f"at v{reply.version}"
                    logger.warning("member %s could not catch up to v%s: %s", rid, txn.version, why)
                    self.exclude(rid, f"could not catch up to v{txn.version}: {why}", txn=txn)
        self._fp.hit("coordinator.before_activated_logged")
        if not txn.canary:
            self._ledger.append(ActivatedRecord(epoch=self.epoch, txn=txn.logged_as or txn.txn,
                                                version=txn.version, duration_s=time.perf_counter() - t0),
                                deferrable=True)
        txn.move(Phase.DONE)
        keep = self._retained(None)
        self._retention.schedule(keep, below=self._ledger.state.last_version + 1)
        self.compact_if_due(keep)
        txn.lap("activated_log_s")
        return replies

    def compact_if_due(self, keep: set[int] | None = None) -> None:
        """Compact the log in the background once it holds more than the history window (plus
        10%): after each refit, and after each checkpoint lands (unpersisted versions are kept)."""
        window = self._s.history_window
        if self._ledger.state.transactions > window + max(10, window // 10):
            keep = self._retained(None) if keep is None else keep  # the active version included
            self._retention.later(lambda: self._ledger.compact(window, keep))

    def _start_tracked_write(self, txn: CoordinatorTxn) -> bool:
        """Hand the version's checkpoint write to the tracker (replicated), once; True if it did."""
        job, txn.persist_job = txn.persist_job, None
        if job is None or self.tracker is None:
            return False
        self.tracker.start(txn.txn, txn.version, job)
        return True

    def _send_twice(self, send: Callable[..., dict[str, Ack | Failed]], rids: list[str], timeout: float,
                    txn: str, **kw: Any) -> dict[str, Ack | Failed]:
        """Send an idempotent message; retry once to those that gave no answer (a lost message)."""
        out = send(rids, timeout, self.epoch, txn, **kw)
        again = [r for r, a in out.items() if isinstance(a, Failed) and a.retryable]
        if again:
            out.update(send(again, timeout, self.epoch, txn, **kw))
        return out

    def outcome(self, key_or_txn: str) -> TxnResult | None:
        """The transaction in flight if ``key_or_txn`` names it (read once: the driving thread
        clears it when it ends), else what the log says; None if neither knows it."""
        current = self.current
        if current is not None and key_or_txn in (current.txn, current.key):
            return TxnResult(status="committed" if current.committed else "in_doubt", txn=current.txn,
                             version=current.version, key=current.key, phase=current.phase.value,
                             reason="in progress")
        o = self._ledger.outcome(key_or_txn)
        if o is None:
            return None
        return TxnResult(status=o.status, txn=o.txn, version=o.version, key=o.key, reason=o.reason or "",
                         votes=dict(o.votes), activated=o.activated, persisted=o.persisted)

    # ------------------------------------------------------------------ unpersisted versions

    def reinstall(self, lost_txn: str, lost_version: int, why: str, source: int,
                  source_checksums: dict[str, str]) -> TxnResult:
        """Every holder of committed ``lost_version`` was lost before it was persisted: commit a
        new version carrying stored version ``source``'s weights (versions never go back), and
        log what was lost. Members catch up to it from the store. The caller holds the refit lock."""
        t0 = time.perf_counter()
        txn = CoordinatorTxn(txn=uuid.uuid4().hex[:16], epoch=self.epoch,
                             version=self._ledger.state.last_version + 1, key=None,
                             members=self._membership.members(), origin_version=source)
        self.current = txn
        try:
            self._ledger.append(BeginRecord(epoch=self.epoch, txn=txn.txn, version=txn.version,
                                            checksums=source_checksums, origin_version=source,
                                            durability="disk"))
            job = PersistJob(state_dir=self._s.state_dir, version=txn.version, refs=None, specs={},
                             checksums=source_checksums, base_version=None, from_version=source,
                             fsync=self._s.persist_fsync, state_options=self._s.state_options)
            _, error = self._persister.wait(self._persister.start(job), time.monotonic() + self._t.persist_s)
            txn.move(Phase.PREPARING)
            if error:
                return self._abort(txn, f"re-installing v{source} after losing v{lost_version}: {error}", t0)
            self._log_commit(txn)
            self._ledger.append(LostRecord(epoch=self.epoch, txn=lost_txn, version=lost_version, reason=why,
                                           replaced_by=txn.version), deferrable=True)
            logger.error("v%s was lost before it was persisted (%s): the fleet moves to v%s, carrying "
                         "v%s's weights", lost_version, why, txn.version, source)
            replies = self.finish(txn, t0)
            return self._committed(txn, replies, t0)
        finally:
            self.current = None

    # ------------------------------------------------------------------ canaries

    def promote(self, canary: CanaryState, req: RefitRequest, reason: str) -> TxnResult:
        """Activate a canary's version on the rest of the fleet (see the module docstring); the
        caller holds the refit lock. An abort here leaves the canary running, its files kept."""
        t0 = time.perf_counter()
        rest = [r for r in self._membership.members() if r not in canary.cohort]
        txn = CoordinatorTxn(txn=f"{canary.txn}.p{uuid.uuid4().hex[:6]}", epoch=self.epoch,
                             version=canary.version, key=req.key, members=rest, logged_as=canary.txn)
        self.current = txn
        try:
            if rest:
                self._prepare(txn, req)
                decision = self._decide(txn, None)
                txn.lap("prepare_s")
                if not decision.commit:
                    votes = {rid: ("YES" if v.yes else f"NO: {v.reason}") for rid, v in txn.votes.items()}
                    txn.move(Phase.ABORTED)
                    self._send_twice(self._client.abort, rest, self._t.commit_s, txn.txn,
                                     reason=decision.reason)
                    return TxnResult(status="aborted", txn=canary.txn, version=None, key=req.key,
                                     reason=f"promote of v{canary.version} refused, the canary goes on: "
                                            f"{decision.reason}", votes=votes,
                                     duration_s=time.perf_counter() - t0)
            else:
                txn.move(Phase.PREPARING)
            self._ledger.append(CanaryRecord(epoch=self.epoch, txn=canary.txn, version=canary.version,
                                             decision="promote", reason=reason))
            txn.move(Phase.COMMITTING)
            self._fp.hit("coordinator.after_promote_logged")
            replies = self.finish(txn, t0)
            return self._committed(txn, replies, t0)
        finally:
            self.current = None

    def decide_abort(self, canary: CanaryState, reason: str) -> None:
        """Log that ``canary`` is aborted (fsync'd); the rollback-like transaction follows."""
        if canary.decision != "abort":
            self._ledger.append(CanaryRecord(epoch=self.epoch, txn=canary.txn, version=canary.version,
                                             decision="abort", reason=reason))

    def aborted_reason(self, txn: str) -> str | None:
        """Why ``txn`` aborted, if it did and is not the one in flight; else None."""
        current = self.current
        if current is not None and current.txn == txn:
            return None
        o = self._ledger.outcome(txn)
        return (o.reason or "aborted") if o is not None and o.status == "aborted" else None

    # ------------------------------------------------------------------ endings

    def _refuse(self, txn: CoordinatorTxn, reason: str, t0: float) -> TxnResult:
        txn.move(Phase.ABORTED)
        self._ledger.refuse(txn.txn, txn.version, txn.key, reason, txn.origin_version)
        observe_refit(self._s.fleet, "aborted", time.perf_counter() - t0)
        phase_log("coordinator", "refused", txn.txn, txn.version, time.perf_counter() - t0, reason=reason)
        return TxnResult(status="aborted", txn=txn.txn, version=None, key=txn.key,
                         reason=f"refused before it began: {reason}",
                         duration_s=time.perf_counter() - t0)

    def _abort(self, txn: CoordinatorTxn, reason: str, t0: float,
               write: list[tuple[Any, float]] | None = None) -> TxnResult:
        votes = {rid: ("YES" if v.yes else f"NO: {v.reason}") for rid, v in txn.votes.items()}
        txn.move(Phase.ABORTED)
        unlogged = self._ledger.append(self._ledger.abort_record(txn.txn, reason, votes), deferrable=True)
        observe_refit(self._s.fleet, "aborted", time.perf_counter() - t0)
        phase_log("coordinator", "abort", txn.txn, txn.version, time.perf_counter() - t0, reason=reason)
        self._send_twice(self._client.abort, txn.members, self._t.commit_s, txn.txn, reason=reason)
        if write and self._replicated and not txn.canary and self.tracker is not None:  # may still run
            self.tracker.discard(txn.version, write[0][0])
        else:
            self._retention.drop(txn.version)
        shown = f"{reason} (the ABORT record is not logged yet: {unlogged})" if unlogged else reason
        return TxnResult(status="aborted", txn=txn.txn, version=None, key=txn.key, reason=shown,
                         votes=votes, duration_s=time.perf_counter() - t0)

    def _committed(self, txn: CoordinatorTxn, replies: dict[str, Ack | Failed], t0: float) -> TxnResult:
        duration = time.perf_counter() - t0
        observe_refit(self._s.fleet, "committed", duration)
        phase_log("coordinator", "activated", txn.txn, txn.version, duration, excluded=txn.excluded)
        per_replica: dict[str, dict[str, float]] = {}
        for rid, vote in txn.votes.items():
            per_replica[rid] = dict(vote.timings)
            reply = replies.get(rid)
            if isinstance(reply, Ack):
                per_replica[rid].update(reply.timings)
        persist = {k[len("persist_"):]: v for k, v in txn.timings.items() if k.startswith("persist_")}
        return TxnResult(status="committed", txn=txn.logged_as or txn.txn, version=txn.version, key=txn.key,
                         activated=True, duration_s=duration, prepare_s=txn.timings.get("prepare_s", 0.0),
                         persist=persist, excluded=list(txn.excluded), replicas=per_replica,
                         persisted=self._ledger.state.is_persisted(txn.version), phases=dict(txn.laps),
                         unpersisted=[v for _, v in self._ledger.state.unpersisted])

    def exclude(self, rid: str, reason: str, *, deferrable: bool = True,
                txn: CoordinatorTxn | None = None) -> bool:
        """Fence a member out: logged (fsync'd) first, then no more renewals, then told."""
        if not self._membership.is_member(rid):
            return False
        self._ledger.append(MemberRecord(epoch=self.epoch, replica_id=rid, event="exclude"),
                            deferrable=deferrable)
        generation = self._membership.exclude(rid, reason)
        if generation is None:
            return False
        self._client.exclude(rid, self.epoch, generation)
        if txn is not None:
            txn.excluded.append(rid)
        logger.warning("replica %s excluded: %s", rid, reason)
        return True
