"""The coordinator actor: versions, the two-phase commit, the durable log, membership.

Guarantees, stated the way Ray Serve's controller states its own:

- What survives a crash: everything in ``<state_dir>/txn.log`` (epochs, BEGIN/COMMIT/ABORT/
  ACTIVATED and membership records; EPOCH and COMMIT fsync'd) and in the checkpoint store (every
  committed version as a full, checksummed set). Nothing else is needed to recover: a restarted
  coordinator bumps its epoch durably, replays the log, finishes every transaction whose COMMIT is
  logged (COMMIT then ACTIVATE, weights from the store) and presumes every other one aborted.
- The commit point is the fsync'd COMMIT record, written only after every member voted YES and the
  version is persisted. Versions only grow; aborted transactions leave gaps.
- Every state-changing call is idempotent: ``refit``/``rollback`` with a key return the first
  call's outcome; COMMIT/ABORT/ACTIVATE to replicas may be repeated.
- Refits and rollbacks from any number of drivers are serialised by one lock; status, outcome and
  membership calls run on other threads and never queue behind a refit.
- The coordinator handles object refs, manifests and checksums, never the weight bytes.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from engines.checksum import set_digest

from .coordinator_protocol import CoordinatorTxn, Phase, Vote, default_rollback_target, tally
from .failpoints import Failpoints
from .log import AbortRecord, ActivatedRecord, BeginRecord, CommitRecord, MemberRecord, TxnLog
from .persist import PersistWorker
from .store import CheckpointStore
from .telemetry import count_prepare_failure, observe_refit, phase_log, reason_class

logger = logging.getLogger("weight_refit.coordinator")


def replica_actor_name(fleet: str, replica_id: str) -> str:
    return f"{fleet}.replica.{replica_id}"


def coordinator_actor_name(fleet: str) -> str:
    return f"{fleet}.coordinator"


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


@ray.remote(max_concurrency=64, max_restarts=-1, max_task_retries=0)
class Coordinator:
    """A named, detached, threaded actor driving every refit of one fleet."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.name = cfg["name"]
        self.namespace = cfg["namespace"]
        self.state_dir = cfg["state_dir"]
        self.timeouts = cfg["timeouts"]
        self.fp = Failpoints(cfg.get("failpoints"), owner="coordinator")
        self.log = TxnLog.open(self.state_dir)
        self.epoch = self.log.bump_epoch()
        self.state = self.log.state()
        self.store = CheckpointStore.in_state_dir(self.state_dir)
        self._lock = threading.Lock()
        self._refit_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=8)
        self._retainer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="retain")
        self._retaining: Future[list[int]] | None = None
        self._persister = self._new_persister()
        self.members: dict[str, Any] = {}
        self.excluded: dict[str, Any] = {}  # evicted, alive or not: re-admitted once caught up
        self.current: CoordinatorTxn | None = None
        self._renewed: dict[str, float] = {}  # replica -> monotonic time of the last renewal sent
        self._late_evicted: list[str] = []  # fenced out during COMMIT/ACTIVATE of the current txn
        self.lease_s = float(self.timeouts.get("lease_s", 10.0))
        for rid, event in self.state.members.items():
            if event in ("join", "evict"):
                try:
                    handle = ray.get_actor(replica_actor_name(self.name, rid), self.namespace)
                except ValueError:
                    logger.warning("member %s is gone", rid)
                    continue
                (self.members if event == "join" else self.excluded)[rid] = handle
        self._stop = threading.Event()
        self._recovered = threading.Event()
        threading.Thread(target=self._recover, daemon=True).start()
        threading.Thread(target=self._lease_loop, daemon=True).start()

    # ------------------------------------------------------------------ recovery

    def _recover(self) -> None:
        """Finish logged COMMITs, presume the rest aborted (runs once per incarnation)."""
        try:
            with self._refit_lock:
                for txn in self.state.undecided:
                    self._append(AbortRecord(epoch=self.epoch, txn=txn,
                                             reason="presumed abort: coordinator restarted before COMMIT"),
                                 fsync=True)
                for txn in self.state.committed_not_activated:
                    outcome = self.state.outcomes[txn]
                    assert outcome.version is not None
                    self._finish_committed(txn, outcome.version, time.perf_counter())
                if self.members:
                    self._sync_members(list(self.members))
                self._await_persister()
        except Exception:
            logger.exception("recovery failed")
        finally:
            self._recovered.set()

    def _finish_committed(self, txn: str, version: int, t0: float) -> dict[str, Any]:
        """COMMIT then ACTIVATE a logged-committed txn. A member that lost its staged set (it
        restarted) catches up from the checkpoint store; one that cannot within ``launch_s`` is
        fenced out (evicted) and re-admitted by the repair loop once it has caught up."""
        acks = self._fan_out("commit", self.timeouts["commit_s"], self.epoch, txn)
        lost = [rid for rid, r in acks.items() if isinstance(r, BaseException)]
        ready = [rid for rid in acks if rid not in lost]
        activations: dict[str, Any] = {}
        for i, rid in enumerate(ready):
            if i == 1:
                self.fp.hit("coordinator.mid_activate")
            activations[rid] = self._pool.submit(self._call_one, rid, "activate",
                                                 self.timeouts["activate_s"], self.epoch, txn)
        results = {rid: f.result() for rid, f in activations.items()}
        if self.current is not None and self.current.txn == txn:
            self.current.activated.update(r for r, v in results.items() if isinstance(v, dict))
        lost += [rid for rid, r in results.items()
                 if isinstance(r, BaseException) or r.get("version") != version]
        for rid in lost:
            caught_up = self._call_until(rid, "sync_to", self.timeouts.get("launch_s", 120), version)
            if isinstance(caught_up, BaseException) or caught_up.get("version") != version:
                logger.warning("member %s could not catch up to v%s: %s", rid, version, caught_up)
                self._evict(rid)
                self._late_evicted.append(rid)
            else:
                results[rid] = caught_up
        self.fp.hit("coordinator.before_activated_logged")
        self._append(ActivatedRecord(epoch=self.epoch, txn=txn, version=version,
                                     duration_s=time.perf_counter() - t0), fsync=False)
        self._schedule_retention()
        return results

    # ------------------------------------------------------------------ persistence worker

    def _new_persister(self) -> Any:
        here = ray.get_runtime_context().get_node_id()
        return PersistWorker.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=True)).remote()

    def _await_persister(self) -> None:
        """Wait until the persistence worker runs, so the first refit does not start it."""
        try:
            ray.get(self._persister.ping.remote(), timeout=self.timeouts.get("launch_s", 120))
        except Exception as exc:  # the next persist call reports it as the refit's abort reason
            logger.warning("persistence worker not ready: %s", _reason(exc))

    def _ensure_persister(self) -> None:
        """A worker that died between refits (OOM, node loss) is replaced before it is needed."""
        try:
            ray.get(self._persister.ping.remote(), timeout=5.0)
        except Exception as exc:
            logger.warning("persistence worker lost (%s): starting a new one", _reason(exc))
            self._replace_persister()
            self._await_persister()

    def _await_persist(self, pending: Any, args: tuple[Any, ...],
                       deadline: float) -> tuple[dict[str, float], str]:
        """Timings and "" once the version is in the store, else {} and the reason. A worker that
        died mid-write (its node was lost) is replaced and the write retried once, within the same
        ``persist_s``; a timeout or a bad payload is not retried."""
        version = args[1]
        for attempt in (1, 2):
            try:
                return ray.get(pending, timeout=max(0.0, deadline - time.monotonic())), ""
            except RayActorError as exc:
                self._replace_persister()
                if attempt == 2 or time.monotonic() >= deadline:
                    return {}, f"persisting version {version} failed: {_reason(exc)}"
                logger.warning("persistence worker lost during v%s (%s): retrying on a new one",
                               version, _reason(exc))
                self._await_persister()
                pending = self._persister.persist.remote(*args)
            except BaseException as exc:
                self._replace_persister()
                return {}, f"persisting version {version} failed: {_reason(exc)}"
        raise AssertionError("unreachable")

    def persist_worker(self) -> Any:
        """The persistence worker's handle (fault tests kill it)."""
        return self._persister

    def _replace_persister(self) -> None:
        """After a failed or timed-out persist: a hung worker must not hold up the next refit."""
        try:
            ray.kill(self._persister, no_restart=True)
        except Exception:
            logger.exception("killing the persistence worker failed")
        self._persister = self._new_persister()

    # ------------------------------------------------------------------ leases and repair

    def _lease_loop(self) -> None:
        """Renew members' leases every third of a lease; re-admit excluded replicas that answer."""
        self._recovered.wait()
        while not self._stop.wait(self.lease_s / 3):
            for rid, handle in self.member_handles().items():
                try:
                    handle.renew_lease.remote(self.epoch, self.lease_s)
                    self._renewed[rid] = time.monotonic()
                except Exception:  # noqa: BLE001  (a dead member: its restart renews itself)
                    logger.warning("lease renewal of %s failed", rid)
            if self.excluded and self._refit_lock.acquire(blocking=False):
                try:
                    self._repair()
                finally:
                    self._refit_lock.release()

    def _repair(self) -> None:
        """Catch excluded replicas up to the active version and make them members again."""
        version = self.state.active_version
        for rid, handle in list(self.excluded.items()):
            try:
                ray.get(handle.ping.remote(), timeout=1.0)
                ray.get(handle.sync_to.remote(version), timeout=self.timeouts.get("launch_s", 120))
                ray.get(handle.renew_lease.remote(self.epoch, self.lease_s), timeout=1.0)
            except Exception:  # noqa: BLE001  (still hung or dead: try again later)
                continue
            with self._lock:
                self.excluded.pop(rid, None)
                self.members[rid] = handle
            self._append(MemberRecord(epoch=self.epoch, replica_id=rid, event="join"), fsync=False)
            logger.info("replica %s re-admitted at version %s", rid, version)

    def confirm(self, rid: str, version: int) -> dict[str, Any]:
        """A replica whose lease lapsed asks whether it may serve (never queued behind a refit)."""
        with self._lock:
            member = rid in self.members
        if member:
            self._renewed[rid] = time.monotonic()
        return {"member": member, "active_version": self.state.active_version, "epoch": self.epoch}

    def _wait_out_leases(self, rids: list[str]) -> None:
        """Before a refit that excluded ``rids`` returns: their last lease must have lapsed, so a
        replica that wakes up cannot serve the old version afterwards."""
        for rid in rids:
            left = self._renewed.get(rid, 0.0) + self.lease_s - time.monotonic()
            if left > 0:
                time.sleep(left)

    # ------------------------------------------------------------------ helpers

    def _append(self, record: Any, *, fsync: bool) -> None:
        self.log.append(record, fsync=fsync)
        self.state = self.log.state()

    def _call_one(self, rid: str, method: str, timeout: float, *args: Any) -> Any:
        handle = self.members.get(rid)
        if handle is None:
            return KeyError(f"replica {rid} is not a member")
        try:
            return ray.get(getattr(handle, method).remote(*args), timeout=timeout)
        except BaseException as exc:
            return exc

    def _call_until(self, rid: str, method: str, timeout: float, *args: Any) -> Any:
        """``_call_one`` that waits for a restarting actor (Ray refuses calls while it restarts)."""
        deadline = time.monotonic() + timeout
        while True:
            out = self._call_one(rid, method, max(0.1, deadline - time.monotonic()), *args)
            if not isinstance(out, ActorUnavailableError) or time.monotonic() >= deadline:
                return out
            time.sleep(0.2)

    def _fan_out(self, method: str, timeout: float, *args: Any, members: list[str] | None = None,
                 progress: dict[str, Any] | None = None) -> dict[str, Any]:
        """Call ``method`` on every member at once; a failure or timeout comes back as the
        exception. Results land in ``progress`` as they arrive (for ``progress()`` callers)."""
        rids = list(self.members) if members is None else members
        out: dict[str, Any] = {}
        pending: dict[Any, str] = {}
        for rid in rids:
            try:
                pending[getattr(self.members[rid], method).remote(*args)] = rid
            except BaseException as exc:
                out[rid] = exc
        deadline = time.monotonic() + timeout
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1,
                                timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            rid = pending.pop(ready[0])
            try:
                out[rid] = ray.get(ready[0])
            except BaseException as exc:
                out[rid] = exc
            if progress is not None:
                progress[rid] = out[rid]
        for rid in pending.values():
            out[rid] = TimeoutError(f"replica {rid}: no answer to {method} within {timeout:g}s")
        return out

    def _active_checksums(self) -> dict[str, str]:
        info = self.state.active
        if info is not None:
            return dict(info.checksums)
        return self.store.manifest(self.state.active_version).checksums

    def _origins(self) -> dict[int, int]:
        return {v: (i.origin_version if i.origin_version is not None else v)
                for v, i in self.state.versions.items()}

    def _schedule_retention(self) -> None:
        """Delete unneeded versions in the background, after ``refit`` has returned (deleting
        1 GiB took 0.17 s here). Only versions below the next one to be assigned are considered,
        so a refit that starts meanwhile cannot lose its checkpoint."""
        keep = self._retained()
        below = self.state.last_version + 1
        self._retaining = self._retainer.submit(self.store.retain, keep, below=below)

    def _await_retention(self) -> None:
        pending = self._retaining
        if pending is not None:
            try:
                pending.result()
            except Exception:
                logger.exception("checkpoint retention failed")

    def _retained(self) -> set[int]:
        """Keep the base (0), active, previous, in-flight and default rollback target versions,
        plus the newest ``retain_versions`` committed ones; delete the rest from the store."""
        active = self.state.active_version
        committed = sorted(set(self.state.versions) | ({0} if self.store.has(0) else set()))
        keep = {0, active, *[v for v in committed if v < active][-1:]}
        keep.update(committed[-int(self.cfg.get("retain_versions", 3)):])
        if self.current is not None:
            keep.add(self.current.version)
        target = default_rollback_target(active, self._origins(), committed)
        if target is not None:
            keep.add(target)
        keep.update(range(active + 1, self.state.last_version + 1))  # anything newer may be in flight
        return keep

    def _outcome_dict(self, key_or_txn: str) -> dict[str, Any] | None:
        if self.current is not None and key_or_txn in (self.current.txn, self.current.key):
            return {"status": "in_doubt", "txn": self.current.txn, "version": self.current.version,
                    "phase": self.current.phase.value, "reason": "in progress"}
        o = self.state.outcomes.get(key_or_txn)
        if o is None:
            return None
        return {"status": o.status, "txn": o.txn, "version": o.version, "key": o.key,
                "reason": o.reason, "votes": dict(o.votes), "activated": o.activated}

    # ------------------------------------------------------------------ membership

    def join(self, rid: str) -> dict[str, Any]:
        """Add a running replica (named actor) to the fleet, after it caught up to the active version."""
        self._recovered.wait()
        handle = ray.get_actor(replica_actor_name(self.name, rid), self.namespace)
        with self._refit_lock:
            version = self.state.active_version
            status = ray.get(handle.status.remote(), timeout=self.timeouts["request_s"])
            if status["version"] != version:
                ray.get(handle.sync_to.remote(version), timeout=self.timeouts["prepare_s"])
            ray.get(handle.renew_lease.remote(self.epoch, self.lease_s), timeout=self.timeouts["request_s"])
            self._renewed[rid] = time.monotonic()
            with self._lock:
                self.excluded.pop(rid, None)
                self.members[rid] = handle
            if self.state.members.get(rid) != "join":
                self._append(MemberRecord(epoch=self.epoch, replica_id=rid, event="join"), fsync=False)
            return {"replica": rid, "version": version}

    def leave(self, rid: str, drain_s: float = 30.0) -> dict[str, Any]:
        """Remove a replica: no new refit includes it, it drains its in-flight requests (routers
        retry elsewhere), then it is stopped."""
        with self._refit_lock:
            with self._lock:
                handle = self.members.pop(rid, None) or self.excluded.pop(rid, None)
            self._append(MemberRecord(epoch=self.epoch, replica_id=rid, event="leave"), fsync=False)
        left = None
        if handle is not None:
            try:
                left = ray.get(handle.drain.remote(drain_s), timeout=drain_s + 5)
            except Exception:  # noqa: BLE001  (already dead)
                left = None
            ray.kill(handle, no_restart=True)
        return {"replica": rid, "still_running": left}

    def _sync_members(self, rids: list[str]) -> None:
        version = self.state.active_version
        for rid in rids:
            st = self._call_one(rid, "status", self.timeouts["request_s"])
            if isinstance(st, dict) and st["version"] != version:
                self._call_one(rid, "sync_to", self.timeouts["prepare_s"], version)

    def member_handles(self) -> dict[str, Any]:
        with self._lock:
            return dict(self.members)

    # ------------------------------------------------------------------ queries

    def node_id(self) -> str:
        """The node this incarnation runs on."""
        return ray.get_runtime_context().get_node_id()

    def arm_failpoint(self, name: str, action: str | None) -> None:
        """Arm a failpoint in the coordinator (fault-injection tests)."""
        self.fp.arm(name, action)

    def config(self) -> dict[str, Any]:
        """The fleet config this coordinator runs with (for ``Fleet.connect``)."""
        return dict(self.cfg)

    def manifest(self) -> dict[str, Any]:
        """name -> {shape, dtype} of every refittable weight (from the base version's checkpoint)."""
        m = self.store.manifest(min(self.store.versions()))
        return {n: {"shape": list(e.shape), "dtype": e.dtype} for n, e in m.tensors.items()}

    def progress(self) -> dict[str, Any] | None:
        """The transaction in flight: phase, members, who voted how so far, who activated."""
        txn = self.current
        if txn is None:
            return None
        votes = {rid: ("YES" if isinstance(r, dict) and r.get("yes") else "NO")
                 for rid, r in list(txn.progress.items())}
        return {"txn": txn.txn, "version": txn.version, "phase": txn.phase.value,
                "members": list(txn.members), "votes": votes, "activated": sorted(txn.activated),
                "elapsed_s": time.monotonic() - txn.started}

    def outcome(self, key_or_txn: str) -> dict[str, Any]:
        o = self._outcome_dict(key_or_txn)
        if o is None:
            return {"status": "unknown", "txn": None, "version": None,
                    "reason": f"no transaction or idempotency key {key_or_txn!r} in the log"}
        return o

    def status(self) -> dict[str, Any]:
        members = self.member_handles()
        refs = {rid: h.status.remote() for rid, h in members.items()}
        replicas = []
        for rid, ref in refs.items():
            try:
                replicas.append(ray.get(ref, timeout=self.timeouts["request_s"]))
            except BaseException as exc:
                replicas.append({"id": rid, "healthy": False, "state": "unreachable",
                                 "error": _reason(exc), "version": None})
        for rid in dict(self.excluded):
            replicas.append({"id": rid, "healthy": False, "state": "excluded", "version": None})
        return {"name": self.name, "epoch": self.epoch, "version": self.state.active_version,
                "last_version": self.state.last_version,
                "in_flight": None if self.current is None else {
                    "txn": self.current.txn, "version": self.current.version,
                    "phase": self.current.phase.value},
                "replicas": sorted(replicas, key=lambda r: r["id"])}

    def history(self) -> list[dict[str, Any]]:
        return [dict(vars(h)) for h in self.state.history]

    def versions(self) -> dict[str, Any]:
        self._await_retention()
        return {"active": self.state.active_version, "stored": self.store.versions(),
                "committed": sorted(self.state.versions)}

    # ------------------------------------------------------------------ refit / rollback

    def refit(self, refs: list[Any], specs: dict[str, Any], checksums: dict[str, str],
              key: str | None = None) -> dict[str, Any]:
        """Two-phase commit of a published version; returns its outcome (never raises for an abort)."""
        self._recovered.wait()
        with self._refit_lock:
            if key is not None and (prior := self._outcome_dict(key)) is not None:
                return {**prior, "duplicate": True}
            active = self._active_checksums()
            full = {**active, **checksums}
            if set_digest(full) == set_digest(active):
                return {"status": "noop", "version": self.state.active_version, "txn": None,
                        "reason": "identical to the active version"}
            return self._run(refs, specs, checksums, full, key, origin=None,
                             base_version=self.state.active_version, from_version=None)

    def rollback(self, to: int | None = None, key: str | None = None) -> dict[str, Any]:
        """A new version carrying an earlier version's weights (default: walk back one origin)."""
        self._recovered.wait()
        with self._refit_lock:
            if key is not None and (prior := self._outcome_dict(key)) is not None:
                return {**prior, "duplicate": True}
            self._await_retention()
            committed = sorted(set(self.state.versions) | ({0} if self.store.has(0) else set()))
            if to is None:
                to = default_rollback_target(self.state.active_version, self._origins(), committed)
                if to is None:
                    return {"status": "aborted", "version": None, "txn": None, "votes": {},
                            "reason": "no earlier version to roll back to"}
            if to not in committed or not self.store.has(to):
                return {"status": "aborted", "version": None, "txn": None, "votes": {},
                        "reason": f"version {to} is not a committed version held in the checkpoint "
                                  f"store (held: {self.store.versions()})"}
            sums = self.store.manifest(to).checksums
            info = self.state.versions.get(to)
            origin = info.origin_version if info is not None and info.origin_version is not None else to
            return self._run(None, {}, sums, sums, key, origin=origin, base_version=None, from_version=to)

    def _run(self, refs: list[Any] | None, specs: dict[str, Any], checksums: dict[str, str],
             full: dict[str, str], key: str | None, *, origin: int | None, base_version: int | None,
             from_version: int | None) -> dict[str, Any]:
        t0 = time.perf_counter()
        version = self.state.last_version + 1
        members = list(self.members)
        txn = CoordinatorTxn(txn=uuid.uuid4().hex[:16], epoch=self.epoch, version=version, key=key,
                             members=members)
        self.current = txn
        try:
            self._append(BeginRecord(epoch=self.epoch, txn=txn.txn, version=version, key=key,
                                     checksums=full, origin_version=origin), fsync=False)
            self.fp.hit("coordinator.after_begin")
            self._ensure_persister()
            persist_args = (self.state_dir, version, refs, specs, checksums, base_version,
                            from_version, self.cfg.get("persist_fsync", True))
            persist_deadline = time.monotonic() + self.timeouts.get("persist_s", 300.0)
            persist = self._persister.persist.remote(*persist_args)
            source = {"from_version": from_version} if from_version is not None else None
            t_prep = time.perf_counter()
            phase_log("coordinator", "begin", txn.txn, version, 0.0, members=members, key=key)
            raw = self._fan_out("prepare", self.timeouts["prepare_s"], self.epoch, txn.txn, version,
                                refs, specs, checksums, source, members=members, progress=txn.progress)
            votes = {rid: (Vote(rid, bool(r["yes"]), r["reason"], r.get("timings", {}))
                           if isinstance(r, dict) else Vote(rid, False, _reason(r)))
                     for rid, r in raw.items()}
            prepare_s = time.perf_counter() - t_prep
            txn.votes = votes
            for vote in votes.values():
                if not vote.yes:
                    count_prepare_failure(self.name, reason_class(vote.reason))
            phase_log("coordinator", "prepare", txn.txn, version, prepare_s,
                      yes=sorted(r for r, v in votes.items() if v.yes),
                      no={r: v.reason for r, v in votes.items() if not v.yes})
            persist_timings, persist_error = self._await_persist(persist, persist_args, persist_deadline)
            decision = tally(votes, policy=self.cfg.get("commit_policy", "strict"),
                             max_evict=int(self.cfg.get("max_evict", 0)))
            if not decision.commit or persist_error:
                reason = persist_error or decision.reason
                return self._abort(txn, reason, votes, t0)
            for rid in decision.evicted:
                self._evict(rid)
            self._append(CommitRecord(epoch=self.epoch, txn=txn.txn, version=version), fsync=True)
            phase_log("coordinator", "commit_logged", txn.txn, version, time.perf_counter() - t0)
            txn.move(Phase.COMMITTING)
            self.fp.hit("coordinator.after_decision_logged")
            txn.move(Phase.ACTIVATING)
            self._late_evicted = []
            activations = self._finish_committed(txn.txn, version, t0)
            evicted = decision.evicted + self._late_evicted
            self._wait_out_leases(evicted)
            txn.move(Phase.DONE)
            duration = time.perf_counter() - t0
            observe_refit(self.name, "committed", duration)
            phase_log("coordinator", "activated", txn.txn, version, duration, evicted=evicted)
            replicas: dict[str, dict[str, Any]] = {}
            for rid, vote in votes.items():
                replicas[rid] = dict(vote.timings)
                if isinstance(activations.get(rid), dict):
                    replicas[rid].update(activations[rid])
            return {"status": "committed", "txn": txn.txn, "version": version, "key": key,
                    "duration_s": duration, "prepare_s": prepare_s,
                    "persist": persist_timings, "evicted": evicted, "replicas": replicas}
        finally:
            self.current = None

    def _abort(self, txn: CoordinatorTxn, reason: str, votes: dict[str, Vote], t0: float) -> dict[str, Any]:
        vote_text = {rid: ("YES" if v.yes else f"NO: {v.reason}") for rid, v in votes.items()}
        self._append(AbortRecord(epoch=self.epoch, txn=txn.txn, reason=reason, votes=vote_text), fsync=True)
        txn.move(Phase.ABORTED)
        observe_refit(self.name, "aborted", time.perf_counter() - t0)
        phase_log("coordinator", "abort", txn.txn, txn.version, time.perf_counter() - t0, reason=reason)
        self._fan_out("abort", self.timeouts["commit_s"], self.epoch, txn.txn, reason, members=txn.members)
        self.store.retain(set(self.store.versions()) - {txn.version})
        return {"status": "aborted", "txn": txn.txn, "version": None, "key": txn.key, "reason": reason,
                "votes": vote_text, "duration_s": time.perf_counter() - t0}

    def _evict(self, rid: str) -> None:
        """Fence a member out: no more lease renewals; it serves again only once re-admitted."""
        with self._lock:
            handle = self.members.pop(rid, None)
            if handle is not None:
                self.excluded[rid] = handle
        self._append(MemberRecord(epoch=self.epoch, replica_id=rid, event="evict"), fsync=True)
        if handle is not None:
            handle.exclude.remote()  # best effort; the lease bounds it if the replica is hung

    def shutdown(self) -> None:
        """Kill every member (the driver kills this actor afterwards)."""
        self._stop.set()
        with self._lock:
            handles = [*self.members.values(), *self.excluded.values()]
        for handle in handles:
            try:
                ray.kill(handle, no_restart=True)
            except BaseException:
                logger.exception("kill failed")
        self.log.close()
