"""The coordinator actor: versions, the two-phase commit, the durable log, membership.

Guarantees, stated the way Ray Serve's controller states its own:

- What survives a crash: everything in ``<state_dir>/txn.log`` (epochs, BEGIN/COMMIT/ABORT/
  ACTIVATED and membership records; EPOCH, COMMIT, ABORT and exclusions fsync'd) and in the
  checkpoint store (every committed version as a full, checksummed set). Nothing else is needed to
  recover (``actors.recovery``).
- The commit point is the fsync'd COMMIT record, written only after every member voted YES (and,
  under ``durability: disk``, the version is persisted; under ``replicated`` the checkpoint
  follows and is logged PERSISTED, ``actors.persistence``) (``actors.two_phase``). Versions only
  grow; aborted transactions leave gaps.
- Every state-changing call is idempotent: ``refit``/``rollback`` with a key return the first
  call's outcome; COMMIT/ABORT/ACTIVATE to replicas may be repeated.
- Refits and rollbacks from any number of drivers are serialised by one lock; status, outcome and
  membership calls run on other threads and never queue behind a refit.
- The coordinator handles object refs, manifests and checksums, never fetches weight bytes (a
  version of at most 64 KiB travels inside its calls, ``actors.payload``).
- The coordinator is the log's only reader as well as its only writer: replicas learn the version
  to serve, its checksums and the peers that serve it from its ``catch_up_plan`` and the plan
  sent with every catch-up (``actors.catch_up``).
- Canaries (``actors.canary_control``): a refit with ``canary`` commits on a cohort only; until
  ``promote`` or ``abort_canary`` ends it, other refits and rollbacks are refused, ``routing``
  names the cohort and its traffic share for drivers' routers, and each replica is told (renewals,
  ``confirm``) the version it should serve.

This class wires the parts together and answers calls; the parts do the work: ``Ledger`` (log and
state), ``TwoPhaseCommit``, ``Recovery``, ``LeaseKeeper``/``Repairer``, ``Membership``,
``Persister``, ``Retention``, and ``RayReplicaClient`` (every Ray call to a replica).
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
from pathlib import Path
from typing import Any

import ray

from .canary_control import CanaryControl
from .catch_up import CatchUpPlan, plan_with_peers
from .durable import StateDirLock
from .failpoints import Failpoints
from .leases import LeaseKeeper, Repairer, run_loop
from .ledger import Ledger
from .log import LOG_NAME, MemberRecord
from .log_mirror import LogMirror
from .membership import Membership
from .object_state import checkpoint_store, is_url, local_dir
from .payload import unseal
from .persist import Persister
from .persistence import PersistTracker, export_job, newest_stored
from .recovery import Recovery, finish_the_log, persist_the_log, restore_membership, sync_members
from .replica_client import RayReplicaClient, coordinator_actor_name, replica_actor_name
from .replies import Ack
from .requests import Requests
from .retention import Retention
from .settings import CoordinatorSettings
from .two_phase import TwoPhaseCommit, TxnResult

logger = logging.getLogger("weight_refit.coordinator")

__all__ = ["Coordinator", "coordinator_actor_name", "replica_actor_name"]


@ray.remote(max_concurrency=64, max_restarts=-1, max_task_retries=0)
class Coordinator:
    """A named, detached, threaded actor driving every refit of one fleet."""

    def __init__(self, settings: CoordinatorSettings) -> None:
        self.settings = settings
        self.t = settings.timeouts
        self.fp = Failpoints(settings.failpoints, owner="coordinator")
        self.client = RayReplicaClient(settings.fleet, settings.namespace, planner=self._plan_with_peers,
                                       control_channel=settings.control_channel)
        self.membership = Membership()
        self.persister = Persister(self.t.launch_s, settings.failpoints)
        self._refit_lock = threading.Lock()
        self._stop = threading.Event()
        self.ledger: Ledger | None = None
        self.txns: TwoPhaseCommit | None = None
        self._state_lock: StateDirLock | None = None
        self.recovery = Recovery(self._recover_once, retry_s=min(5.0, self.t.lease_s), stop=self._stop)
        self.recovery.start()

    # ------------------------------------------------------------------ recovery

    def _open(self) -> None:
        """Own the state dir, open the log (bumping the epoch), the store and the parts on them.
        A URL state: the log is restored from object storage into a local working copy, and
        mirrored back before each durable record counts (``actors.log_mirror``)."""
        s = self.settings
        url = s.state_dir if is_url(s.state_dir) else None
        work = local_dir(s.fleet, url, ray.get_runtime_context().get_node_id()) if url else Path(s.state_dir)
        if self._state_lock is None:
            lock = StateDirLock(work)
            lock.acquire(f"fleet {s.fleet}, pid {os.getpid()} on {socket.gethostname()}, "
                         f"Ray {ray.get_runtime_context().gcs_address}")
            self._state_lock = lock
        mirror = LogMirror(f"{url}/log", s.state_options) if url else None
        restored = mirror.restore(work / LOG_NAME) if mirror is not None else b""
        ledger = Ledger.open(work, self.fp)
        try:
            if mirror is not None:
                ledger.mirror_to(mirror, restored)
            ledger.bump_epoch()
            self.store = checkpoint_store(s.state_dir, s.state_options, fp=self.fp)
        except BaseException:
            ledger.close()
            raise
        self.retention = Retention(self.store)
        self.leases = LeaseKeeper(self.client, self.membership, epoch=ledger.epoch,
                                  lease_s=self.t.lease_s, on_failed=self._exclude_failed,
                                  aborted=lambda txn: self.txns.aborted_reason(txn) if self.txns else None,
                                  cohort_of=lambda rid: self.canaries.cohort_of(rid))
        self.requests = Requests(ledger, self.store, self.settings.retain_versions)
        self.txns = TwoPhaseCommit(self.settings, ledger, self.client, self.persister, self.membership,
                                   self.leases, self.retention, self.fp, self.requests.retained)
        self.tracker = PersistTracker(self.persister, ledger, persist_s=self.t.persist_s,
                                      retry_s=min(5.0, self.t.lease_s),
                                      export=functools.partial(export_job, ledger=ledger, client=self.client,
                                                               membership=self.membership,
                                                               settings=self.settings, timeouts=self.t),
                                      drop=self.retention.drop, on_lost=self._on_lost, stop=self._stop,
                                      on_persisted=lambda: self.txns.compact_if_due() if self.txns else None)
        self.txns.tracker = self.tracker
        self.canaries = CanaryControl(str(work), ledger, self.txns, self.client,
                                      self.membership, self.requests, self.store, refit_lock=self._refit_lock,
                                      stop=self._stop, request_s=self.t.request_s,
                                      wait_stored=self._wait_stored_in(ledger),
                                      url=url, options=s.state_options)
        self.repairer = Repairer(self.client, self.membership, self.leases,
                                 active_version=lambda: ledger.state.active_version,
                                 admit=self._readmit, refit_lock=self._refit_lock,
                                 catch_up_s=self.t.launch_s,
                                 version_for=lambda rid: ledger.state.version_for(rid))
        restore_membership(ledger.state.members, self.client, self.membership)
        self.ledger = ledger

    def _recover_once(self) -> None:
        if self.ledger is None:
            self._open()
        ledger, txns = self.ledger, self.txns
        assert ledger is not None and txns is not None
        with self._refit_lock:
            finish_the_log(ledger, txns)
            persist_the_log(ledger, txns, self.persister, persist_s=self.t.persist_s,
                            export=self.tracker.export, newest_stored=self._newest_stored)
            sync_members(ledger, txns, self.client, self.membership, request_s=self.t.request_s,
                         catch_up_s=self.t.launch_s)
            self.canaries.resume()
        if self.membership.members():  # a restart: the fleet serves already
            self.persister.warm()
        run_loop("leases", lambda: self.t.lease_s / 3, self.leases.renew_all, self._stop)
        run_loop("repair", lambda: min(1.0, self.t.lease_s / 3), self.repairer.repair, self._stop)

    def _newest_stored(self, below: int) -> tuple[int, dict[str, str]]:
        assert self.ledger is not None
        return newest_stored(self.ledger, self.store, below)

    def _on_lost(self, txn: str, version: int, why: str) -> None:
        """Every holder of the newest committed version went before it was written (the
        coordinator lived on): move to a new version re-installing the newest stored weights."""
        def reinstall() -> None:
            assert self.ledger is not None and self.txns is not None
            with self._refit_lock:
                state = self.ledger.state
                if state.is_persisted(version) or version != max(state.versions, default=0):
                    return
                job, nobody_holds = self.tracker.export(version)
                if job is not None:  # a holder came back meanwhile: write it after all
                    self.tracker.given_up.pop(version, None)
                    self.tracker.track(txn, version, self.persister.start(job))
                    return
                if not nobody_holds:
                    return
                source, sums = self._newest_stored(version)
                self.txns.reinstall(txn, version, why, source, sums)

        threading.Thread(target=reinstall, name="reinstall", daemon=True).start()

    def wait_persisted(self, version: int, timeout: float, unless_failing: bool = False) -> bool:
        """Wait until ``version``'s checkpoint is durable; False at the timeout, or (with
        ``unless_failing``) as soon as a checkpoint write is failing."""
        if self._ready(timeout) or self.ledger is None:
            return False
        return self.tracker.wait(version, timeout, unless_failing=unless_failing)

    def _ready(self, timeout: float) -> str:
        return self.recovery.wait(timeout)

    # ------------------------------------------------------------------ membership

    def _exclude_failed(self, rid: str, error: str) -> None:
        if self.txns is not None:
            self.txns.exclude(rid, f"cannot serve: {error}")

    def _readmit(self, rid: str, version: int) -> bool:
        assert self.ledger is not None
        generation = self.membership.admit(rid)
        self.ledger.append(MemberRecord(epoch=self.ledger.epoch, replica_id=rid, event="join"),
                           deferrable=True)
        self.leases.grant(rid, generation)
        logger.info("replica %s re-admitted at version %s", rid, version)
        return True

    def join(self, rid: str) -> dict[str, Any]:
        """Add a running replica (named actor) to the fleet, after it caught up to the active version."""
        if why := self._ready(self.t.launch_s):
            raise RuntimeError(f"cannot add replica {rid}: {why}")
        if not self.client.attach(rid):
            raise ValueError(f"no running replica {replica_actor_name(self.settings.fleet, rid)!r}")
        assert self.ledger is not None
        with self._refit_lock:
            version = self.ledger.state.active_version
            reply = self.client.catch_up([rid], version, self.t.launch_s)[rid]  # from a peer, or the store
            if not (isinstance(reply, Ack) and reply.version == version) and \
                    not self.ledger.state.is_persisted(version):
                self._wait_stored(version)  # no peer gave it: the store, once the checkpoint is written
                reply = self.client.catch_up([rid], version, self.t.launch_s)[rid]
            if not (isinstance(reply, Ack) and reply.version == version):
                raise RuntimeError(f"replica {rid} could not catch up to v{version}: "
                                   f"{getattr(reply, 'reason', reply)}")
            if self.ledger.state.members.get(rid) == "join" and self.membership.is_member(rid):
                self.leases.grant(rid, self.membership.admit(rid))
            else:
                self._readmit(rid, version)
        self.persister.warm()
        return {"replica": rid, "version": version}

    def _wait_stored(self, version: int) -> None:
        """Wait for a committed version's checkpoint still being written (``durability: replicated``)."""
        assert self.ledger is not None
        self._wait_stored_in(self.ledger)(version)

    def _wait_stored_in(self, ledger: Ledger) -> Any:
        def wait(version: int) -> None:
            state = ledger.state
            if version in state.versions and not state.is_persisted(version):
                self.tracker.wait(version, self.t.launch_s)  # a failed write is redone from a member
        return wait

    def leave(self, rid: str, drain_s: float = 30.0) -> dict[str, Any]:
        """Remove a replica: no new refit includes it, it drains its in-flight requests (routers
        retry elsewhere), then it is stopped."""
        assert self.ledger is not None
        with self._refit_lock:
            self.membership.leave(rid)
            self.ledger.append(MemberRecord(epoch=self.ledger.epoch, replica_id=rid, event="leave"),
                               deferrable=True)
        left = self.client.drain(rid, drain_s)
        self.client.kill(rid)
        self.client.forget(rid)
        self.membership.forget(rid)
        return {"replica": rid, "still_running": left if isinstance(left, int) else None}

    def confirm(self, rid: str, version: int) -> dict[str, Any]:
        """A replica whose lease lapsed asks whether it may serve (never queued behind a refit).
        ``member`` is None while the coordinator cannot tell (it is recovering)."""
        ledger = self.ledger
        if ledger is None or not self.recovery.ready:
            return {"member": None, "active_version": None, "epoch": None, "generation": None}
        seat = self.membership.get(rid)
        member = self.membership.is_member(rid)
        if member and seat is not None:
            self.membership.renewed(rid, seat.generation)
        return {"member": member, "active_version": ledger.state.version_for(rid), "epoch": ledger.epoch,
                "generation": seat.generation if seat else 0}

    def catch_up_plan(self, rid: str) -> CatchUpPlan | None:
        """For a replica that starts: the version it must serve, that version's checksums and the
        members that may hold it (``Sightings.holders``; a coordinator that has heard from none
        yet asks the others first, ``catch_up.plan_with_peers``). None while the coordinator
        cannot tell (it is recovering)."""
        ledger = self.ledger
        if ledger is None or not self.recovery.ready:
            return None
        return self._plan_with_peers(ledger.state.version_for(rid), [rid])

    def _plan_with_peers(self, version: int, catching_up: list[str]) -> CatchUpPlan | None:
        """The plan for ``catching_up``; a coordinator that has not heard yet from any other member
        that may hold ``version`` (it has just started) asks them first."""
        return plan_with_peers(lambda: self._plan_for(version), catching_up, self.membership.members(),
                               lambda others: self.client.status(others, min(2.0, self.t.lease_s)))

    def _plan_for(self, version: int) -> CatchUpPlan | None:
        ledger = self.ledger
        if ledger is None:
            return None
        info = ledger.state.versions.get(version)
        return CatchUpPlan(version, dict(info.checksums) if info is not None else {},
                           self.client.sightings.holders(version, self.membership.members()))

    def member_handles(self) -> dict[str, Any]:
        """Handles of the members (for drivers' routers). While recovering: every running replica
        of the fleet, so that routers keep serving."""
        if self.recovery.ready:
            return self.client.handles(self.membership.members())
        return self.client.running()

    def routing(self) -> dict[str, Any]:
        """``handles`` (as ``member_handles``) and ``canary``: the running canary's version, cohort
        and traffic share, or None (for drivers' routers)."""
        c = self.canaries.running if self.ledger is not None else None
        return {"handles": self.member_handles(),
                "canary": None if c is None else {"version": c.version, "cohort": list(c.cohort),
                                                  "traffic": c.traffic}}

    # ------------------------------------------------------------------ refit / rollback

    def _prelude(self, key: str | None, checksums: dict[str, str] | None) -> TxnResult | None:
        if why := self._ready(self.t.launch_s):
            return TxnResult(status="aborted", txn=None, version=None, key=key, reason=why)
        return self.requests.duplicate(self._outcome(key) if key else None, key, checksums)

    def _run(self, make: Any, key: str | None, checksums: dict[str, str] | None, what: str) -> TxnResult:
        if (early := self._prelude(key, checksums)) is not None:
            return early
        assert self.txns is not None
        with self._refit_lock:
            if (prior := self.requests.duplicate(self._outcome(key) if key else None, key, checksums)):
                return prior
            if (busy := self.canaries.refusal(key, what)) is not None:
                return busy
            request = make()
            return request if isinstance(request, TxnResult) else self.txns.run(request)

    def refit(self, refs: list[Any], specs: dict[str, Any], checksums: dict[str, str],
              key: str | None = None, probes: list[Any] | None = None, canary: Any = None,
              hashed_on: str | None = None) -> TxnResult:
        """Two-phase commit of a published version; returns its outcome (never raises for an abort).
        ``probes`` (``engines.Probe``) run on the staged set in PREPARE: a failing one is a NO vote.
        ``canary`` (``actors.canary.Canary``): commit on its cohort only (``CanaryRefused`` when it
        cannot be one). ``hashed_on``: the node whose object-store copy the caller took the
        checksums of (``Publication.hashed_on``); the members there stage it without hashing.
        ``specs`` and ``checksums`` may come sealed (``actors.payload.seal``)."""
        specs, checksums = unseal(specs), unseal(checksums)

        def make() -> Any:
            req = self.requests.refit(refs, specs, checksums, key, probes, hashed_on)
            return req if canary is None or isinstance(req, TxnResult) else self.canaries.request(canary, req)

        result = self._run(make, key, checksums, "a refit")
        if canary is not None and result.status == "committed" and not result.duplicate:
            self.canaries.started(result)
        return result

    def announce(self, tag: str, refs: list[Any], specs: dict[str, Any],
                 hashed_on: str | None = None) -> bool:
        """Buckets of a version a caller is publishing, each sent as soon as it is in the object
        store and checked: forwarded to the members (with each node's verifier, and ``hashed_on``
        as for ``refit``), which fetch, copy and hash them ahead of the PREPARE
        (``actors.prefetch``). Best effort: nothing waits for it and no refit depends on it.
        Ignored (False) while recovering or while a canary runs (its PREPARE goes to a cohort
        only)."""
        if self.ledger is None or not self.recovery.ready or self.canaries.running is not None:
            return False
        assert self.txns is not None
        members = self.membership.members()
        self.client.prefetch(members, tag, refs, specs, self.txns.verifiers_for(members, refs), hashed_on)
        return True

    def withdraw(self, tag: str) -> None:
        """The publication ``tag`` failed: the members free what they prefetched for it."""
        if self.ledger is not None:
            self.client.withdraw(self.membership.members(), tag)

    def promote(self, reason: str = "") -> TxnResult:
        """Activate the running canary's version on the rest of the fleet (one commit point);
        aborted (the canary goes on) if a member of the rest votes NO. ``NoCanary`` if none runs."""
        if why := self._ready(self.t.launch_s):
            return TxnResult(status="aborted", txn=None, version=None, reason=why)
        with self._refit_lock:
            return self.canaries.promote(reason)

    def abort_canary(self, reason: str = "") -> TxnResult:
        """End the running canary with a new version, on every member, carrying the pre-canary
        weights (no handle's versions go back). ``NoCanary`` if none runs."""
        if why := self._ready(self.t.launch_s):
            return TxnResult(status="aborted", txn=None, version=None, reason=why)
        with self._refit_lock:
            return self.canaries.abort(reason)

    def rollback(self, to: int | None = None, key: str | None = None) -> TxnResult:
        """A new version carrying an earlier version's weights (default: walk back one origin)."""
        sums = self.requests.target_checksums(to) if self.ledger is not None else None

        def make() -> Any:
            self.retention.wait()
            target = self.requests.rollback_target(to)
            state = self.ledger.state if self.ledger is not None else None
            if target is not None and state is not None and target in state.versions \
                    and not state.is_persisted(target):  # committed, its checkpoint still being written
                self.tracker.wait(target, self.t.persist_s, unless_failing=True)
            return self.requests.rollback(to, key)

        return self._run(make, key, sums, "a rollback")

    # ------------------------------------------------------------------ queries

    def _outcome(self, key_or_txn: str) -> TxnResult | None:
        return self.txns.outcome(key_or_txn) if self.txns is not None else None

    def outcome(self, key_or_txn: str) -> TxnResult:
        if not self.recovery.ready:
            return TxnResult(status="in_doubt", txn=None, version=None, reason=self._ready(0.0))
        o = self._outcome(key_or_txn)
        if o is None:
            return TxnResult(status="unknown", txn=None, version=None,
                             reason=f"no transaction or idempotency key {key_or_txn!r} in the log")
        return o

    def progress(self) -> dict[str, Any] | None:
        """The transaction in flight: phase, members, votes and acks so far."""
        current = self.txns.current if self.txns is not None else None
        return None if current is None else current.progress()

    def status(self) -> dict[str, Any]:
        seats = {s.rid: s for s in self.membership.seats()}
        replies = self.client.status(sorted(seats), self.t.request_s)
        replicas = []
        for rid, st in replies.items():
            row = dict(st) if isinstance(st, dict) else {"id": rid, "healthy": False, "state": "unreachable",
                                                          "error": st.reason, "version": None}
            row["membership"] = seats[rid].state.value
            row["cohort"] = self.canaries.cohort_of(rid) if self.ledger is not None else "main"
            if row["membership"] != "member":
                row.update(healthy=False, excluded_reason=seats[rid].reason)
                row["version"] = None if row["membership"] == "excluded" else row.get("version")
            replicas.append(row)
        ledger = self.ledger
        current = self.txns.current if self.txns is not None else None
        return {"name": self.settings.fleet, "epoch": ledger.epoch if ledger else None,
                "version": ledger.state.active_version if ledger else None,
                "last_version": ledger.state.last_version if ledger else None,
                "in_flight": None if current is None else {
                    "txn": current.txn, "version": current.version, "phase": current.phase.value},
                "recovery": self.recovery.summary(),
                "durability": self.settings.durability,
                "canary": None if ledger is None or ledger.state.canary is None else {
                    **ledger.state.canary.describe(), "judge_note": self.canaries.judge_note},
                "persistence": self.tracker.summary() if ledger else {},
                "log": {"unwritten_records": ledger.deferred if ledger else 0,
                        "cut_tails": [str(c) for c in ledger.cut_tails()] if ledger else []},
                "replicas": sorted(replicas, key=lambda r: r["id"])}

    def history(self, limit: int | None = None, since: int | None = None) -> list[dict[str, Any]]:
        """Transactions oldest first: those with a version above ``since``, the newest ``limit``."""
        rows = self.ledger.history() if self.ledger is not None else []
        if since is not None:
            rows = [r for r in rows if (r["version"] or 0) > since]
        return rows[-limit:] if limit else rows

    def versions(self) -> dict[str, Any]:
        assert self.ledger is not None
        self.retention.wait()
        return {"active": self.ledger.state.active_version, "stored": self.store.versions(),
                "committed": sorted(self.ledger.state.versions)}

    def manifest(self) -> dict[str, Any]:
        """name -> {shape, dtype} of every refittable weight (from the base version's checkpoint),
        and ``tied``: the other names of the same tensor, for weights the engine ties."""
        store = checkpoint_store(self.settings.state_dir, self.settings.state_options, cleanup=False)
        m = store.manifest(min(store.versions()))
        out: dict[str, Any] = {n: {"shape": list(e.shape), "dtype": e.dtype} for n, e in m.tensors.items()}
        for group in self.settings.tied:
            for name in group:
                if name in out:
                    out[name]["tied"] = [g for g in group if g != name]
        return out

    def config(self) -> dict[str, Any]:
        """The fleet config the launching driver gave (for ``Fleet.connect``)."""
        return dict(self.settings.driver_config)

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def arm_failpoint(self, name: str, action: str | None) -> None:
        """Arm a failpoint in the coordinator, its log and its store (fault-injection tests)."""
        self.fp.arm(name, action)

    def persist_worker(self) -> Any:
        """The persistence worker's handle (fault tests kill it)."""
        return self.persister.worker

    def shutdown(self) -> None:
        """Kill every replica and the persistence worker (the driver kills this actor afterwards)."""
        self._stop.set()
        for seat in self.membership.seats():
            self.client.kill(seat.rid)
        self.persister.stop()
        if self.ledger is not None:
            self.ledger.close()
        if self._state_lock is not None:
            self._state_lock.release()
