"""The replica actor: one card, one engine, serving while it takes part in refits.

Contract:
- ``infer`` runs in the ``serve`` concurrency group and protocol calls in ``control``: a refit never
  queues behind inference, nor the reverse. Every response carries the version that produced it.
- ``prepare`` fetches the version's bytes from the object store, verifies every checksum, stages
  them in the engine and votes. It never raises: every failure becomes a NO vote with a reason.
- ``commit``/``activate``/``abort`` are idempotent; their legality is decided by
  ``ReplicaParticipant`` (epoch fencing, remembered decisions).
- On start (and on every Ray restart) the replica loads the engine file, then catches up to the
  fleet's active version as the coordinator's log names it, from the checkpoint store with
  checksums verified, before it reports ready.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import ray

from engines import Engine, StagedSet, load_engine
from engines.checksum import ChecksumMismatch, tensor_checksum
from engines.errors import NotRetainedError

from .failpoints import Failpoints
from .log import TxnLog
from .payload import from_wire
from .replica_protocol import ProtocolViolation, ReplicaParticipant, TxnState
from .store import CheckpointStore
from .telemetry import observe_request, phase_log, set_version


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


@ray.remote(concurrency_groups={"serve": 32, "control": 4}, max_restarts=-1, max_task_retries=0)
class Replica:
    """A Ray actor owning one engine on one card. See the module docstring for its contract."""

    def __init__(self, replica_id: str, spec: dict[str, Any]) -> None:
        import torch

        torch.set_num_threads(int(spec.get("torch_threads", 1)))
        self.replica_id = replica_id
        self.spec = spec
        self.fp = Failpoints(spec.get("failpoints"), owner=replica_id)
        self.participant = ReplicaParticipant()
        self._ctl = threading.RLock()
        self._staged: dict[str, StagedSet] = {}
        self._last_refit_s: float | None = None
        self._last_refit_at: float | None = None
        self.state = "loading"
        self._lease_s = float(spec.get("lease_s", 10.0))
        self._lease_expires = 0.0  # monotonic; 0: never granted, reconfirm before serving
        self._excluded = False
        self._inflight = 0
        self._inflight_cv = threading.Condition()
        self._coordinator: Any = None
        self._fleet = str(spec.get("fleet", ""))
        self.engine = self._load_engine()
        spare = int(spec.get("prefill_sets", 0))
        if spare:
            self.engine.prefill_pool(spare)
        self.store = CheckpointStore.in_state_dir(spec["state_dir"], cleanup=False)
        self.active_checksums: dict[str, str] = {}
        self.fp.hit("replica.on_start")
        self._catch_up_from_log()
        self.state = "serving"
        set_version(self._fleet, replica_id, self.engine.version)

    # ------------------------------------------------------------------ start-up

    def _load_engine(self) -> Engine:
        """The engine file on this replica's device. ``enable_refit`` is the file's own: an engine
        built without it refuses every PREPARE (a NO vote naming RefitDisabledError)."""
        spec = self.spec
        return load_engine(
            spec["engine"], device=spec["device"],
            memory_mode=spec.get("memory_mode", "swap"), keep_previous=spec.get("keep_previous", True),
            memory_budget_bytes=spec.get("memory_budget_bytes"),
        )

    def _catch_up_from_log(self) -> None:
        log_path = Path(self.spec["state_dir"])
        if not (log_path / "txn.log").exists():
            return
        with TxnLog.open(log_path) as log:
            state = log.state()
        if state.active_version and state.active_version != self.engine.version:
            self.state = "catching_up"
            self.sync_to(state.active_version)

    # ------------------------------------------------------------------ serving

    @ray.method(concurrency_group="serve")
    def infer(self, inputs: list[Any], min_version: int = 0) -> dict[str, Any]:
        """Run inference; answers ``stale`` when it cannot serve ``min_version`` or newer, when it
        is draining, or when it is fenced out of the fleet (its lease lapsed and the coordinator
        no longer counts it as a member)."""
        if self.state == "draining" or not self._lease_ok():
            return {"stale": True, "version": self.engine.version, "replica": self.replica_id,
                    "reason": "draining" if self.state == "draining" else "fenced"}
        if min_version > self.engine.version and not self._activate_for(min_version):
            return {"stale": True, "version": self.engine.version, "replica": self.replica_id,
                    "reason": "behind"}
        with self._inflight_cv:
            self._inflight += 1
        t0 = time.perf_counter()
        try:
            r = self.engine.infer(*inputs)
            observe_request(self._fleet, self.replica_id, time.perf_counter() - t0)
        finally:
            with self._inflight_cv:
                self._inflight -= 1
                if self._inflight == 0:
                    self._inflight_cv.notify_all()
        return {"stale": False, "outputs": r.outputs, "version": r.version, "replica": self.replica_id}

    # ------------------------------------------------------------------ leases

    def _lease_ok(self) -> bool:
        """Serve under a lease; a lapsed lease is reconfirmed with the coordinator first.

        Member: renewed. Excluded: fenced (refuse until the coordinator re-admits it). Coordinator
        unreachable: keep serving the active version (an outage stops refits, not serving), and
        ask again after half a lease."""
        if time.monotonic() < self._lease_expires and not self._excluded:
            return True
        if self._excluded and time.monotonic() < self._lease_expires:
            return False
        try:
            if self._coordinator is None:
                self._coordinator = ray.get_actor(self.spec["coordinator"], self.spec["namespace"])
            answer = ray.get(self._coordinator.confirm.remote(self.replica_id, self.engine.version),
                             timeout=max(1.0, self._lease_s / 2))
        except Exception:  # noqa: BLE001  (coordinator down or restarting)
            self._coordinator = None
            self._lease_expires = time.monotonic() + self._lease_s / 2
            return not self._excluded
        self._excluded = not answer["member"]
        self._lease_expires = time.monotonic() + (self._lease_s if answer["member"] else 1.0)
        if answer["member"] and answer["active_version"] > self.engine.version:
            # only forward: the log's active version lags while an ACTIVATE fan-out (or a
            # restarted coordinator's recovery) is under way, and this replica may be ahead
            self.sync_to(answer["active_version"])
        return answer["member"]

    @ray.method(concurrency_group="control")
    def renew_lease(self, epoch: int, lease_s: float) -> int:
        """The coordinator's renewal: serve for ``lease_s`` more seconds as a member."""
        with self._ctl:
            self._fence(epoch)
        self._lease_s = lease_s
        self._excluded = False
        self._lease_expires = time.monotonic() + lease_s
        return self.engine.version

    @ray.method(concurrency_group="control")
    def exclude(self) -> None:
        """Stop serving fleet traffic now (evicted or removed)."""
        self._excluded = True
        self._lease_expires = 0.0

    @ray.method(concurrency_group="control")
    def drain(self, timeout_s: float = 30.0) -> int:
        """Refuse new requests (routers retry elsewhere); wait for in-flight ones; return how many
        were still running at the deadline (0: drained)."""
        self.state = "draining"
        deadline = time.monotonic() + timeout_s
        with self._inflight_cv:
            while self._inflight and time.monotonic() < deadline:
                self._inflight_cv.wait(timeout=max(0.0, deadline - time.monotonic()))
            return self._inflight

    def _activate_for(self, min_version: int) -> bool:
        """DESIGN step 5: a committed-not-active version a client has already seen goes live now.
        Never blocks the serving path for long: if a protocol call holds the replica, answer
        stale and let the client's handle try another member."""
        if not self._ctl.acquire(timeout=0.5):
            return False
        try:
            rec = self.participant.committed_at_least(min_version)
            if rec is None:
                return self.engine.version >= min_version
            self._activate_locked(None, rec.txn)
            return True
        finally:
            self._ctl.release()

    # ------------------------------------------------------------------ protocol

    @ray.method(concurrency_group="control")
    def prepare(self, epoch: int, txn: str, version: int, refs: list[Any] | None,
                specs: dict[str, Any], checksums: dict[str, str],
                source: dict[str, Any] | None = None) -> dict[str, Any]:
        """Fetch, verify, stage; vote. ``source`` may name a version to re-stage (rollback)."""
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        try:
            with self._ctl:
                self._fence(epoch)
                self.participant.begin_prepare(epoch, txn, version)
            staged = self._stage(version, refs, specs, checksums, source, timings)
        except BaseException as exc:  # every failure is a NO vote, reported back
            with self._ctl:
                if self.participant.get(txn) is not None:
                    self.participant.finish_prepare(txn, False, _reason(exc))
            return self._vote(txn, False, _reason(exc), timings, t0)
        with self._ctl:
            keep = self.participant.finish_prepare(txn, True)
            if not keep:
                self.engine.discard(staged)
                return self._vote(txn, False, "aborted while preparing", timings, t0)
            self._staged[txn] = staged
        self.fp.hit("replica.before_vote")
        vote = self._vote(txn, True, "", timings, t0)
        self.fp.hit("replica.after_vote")
        return vote

    def _stage(self, version: int, refs: list[Any] | None, specs: dict[str, Any],
               checksums: dict[str, str], source: dict[str, Any] | None,
               timings: dict[str, float]) -> StagedSet:
        if source and source.get("from_version") is not None:
            from_version = int(source["from_version"])
            try:
                staged = self.engine.stage_retained(from_version, version)
                timings["retained"] = 1.0
                return staged
            except NotRetainedError:
                tensors = self.store.load(from_version)
                timings["from_store"] = 1.0
                return self.engine.stage(tensors, version)
        t = time.perf_counter()
        arrays = ray.get(refs[0], timeout=self.spec.get("fetch_timeout_s", 60))
        timings["fetch_s"] = time.perf_counter() - t
        try:
            tensors = from_wire(arrays, specs)
            t = time.perf_counter()
            for name, tensor in tensors.items():
                want = checksums.get(name)
                got = tensor_checksum(tensor)
                if want != got:
                    raise ChecksumMismatch(name, str(want), got, f"replica {self.replica_id}")
            timings["verify_s"] = time.perf_counter() - t
            t = time.perf_counter()
            staged = self.engine.stage(tensors, version)
            timings["stage_s"] = time.perf_counter() - t
            return staged
        finally:
            del arrays

    def _vote(self, txn: str, yes: bool, reason: str, timings: dict[str, float], t0: float) -> dict[str, Any]:
        timings["prepare_s"] = time.perf_counter() - t0
        rec = self.participant.get(txn)
        phase_log("replica", "prepare", txn, rec.version if rec else None, timings["prepare_s"],
                  replica=self.replica_id, vote="YES" if yes else "NO", reason=reason,
                  **{k: round(v, 6) for k, v in timings.items() if k != "prepare_s"})
        return {"replica": self.replica_id, "txn": txn, "yes": yes, "reason": reason,
                "timings": timings, "version": self.engine.version}

    @ray.method(concurrency_group="control")
    def commit(self, epoch: int, txn: str) -> dict[str, Any]:
        """Pin the staged set as committed; keep serving the old version. Idempotent."""
        self.fp.hit("replica.before_commit")
        with self._ctl:
            t = time.perf_counter()
            self._fence(epoch, keep=txn)
            rec, _ = self.participant.commit(epoch, txn)
            phase_log("replica", "commit", txn, rec.version, time.perf_counter() - t,
                      replica=self.replica_id)
            return {"replica": self.replica_id, "txn": txn, "state": rec.state.value,
                    "version": self.engine.version}

    @ray.method(concurrency_group="control")
    def activate(self, epoch: int, txn: str) -> dict[str, Any]:
        """Make the committed set live (the swap). Idempotent."""
        self.fp.hit("replica.before_activate")
        with self._ctl:
            t = time.perf_counter()
            self._fence(epoch, keep=txn)
            self._activate_locked(epoch, txn)
            phase_log("replica", "activate", txn, self.engine.version, time.perf_counter() - t,
                      replica=self.replica_id, swap_ns=self.engine.last_swap_ns)
            return {"replica": self.replica_id, "txn": txn, "version": self.engine.version,
                    "activate_s": time.perf_counter() - t, "swap_ns": self.engine.last_swap_ns}

    def _activate_locked(self, epoch: int | None, txn: str) -> None:
        rec = self.participant.get(txn)
        if rec is not None and rec.state is TxnState.ACTIVE:
            return
        if rec is None or rec.state is not TxnState.COMMITTED:
            if epoch is not None:
                self.participant.check_epoch(epoch)
            raise ProtocolViolation(f"txn {txn}: ACTIVATE needs a committed staged set here "
                                    f"(state {rec.state.value if rec else 'unknown'})")
        staged = self._staged.pop(txn)
        self.fp.hit("replica.during_activate")
        self.engine.commit(staged)
        self.participant.activate(epoch, txn)
        self._last_refit_at = time.time()
        set_version(self._fleet, self.replica_id, self.engine.version)

    @ray.method(concurrency_group="control")
    def abort(self, epoch: int, txn: str, reason: str = "") -> dict[str, Any]:
        """Discard the staged set of ``txn``; remember the decision. Idempotent."""
        with self._ctl:
            t = time.perf_counter()
            self._fence(epoch)
            rec, _ = self.participant.abort(epoch, txn, reason)
            self._discard(txn)
            phase_log("replica", "abort", txn, rec.version, time.perf_counter() - t,
                      replica=self.replica_id, reason=reason)
            return {"replica": self.replica_id, "txn": txn, "version": self.engine.version}

    def _fence(self, epoch: int, keep: str | None = None) -> None:
        for dropped in self.participant.check_epoch(epoch, keep=keep):
            self._discard(dropped.txn)

    def _discard(self, txn: str) -> None:
        staged = self._staged.pop(txn, None)
        if staged is not None:
            self.engine.discard(staged)

    @ray.method(concurrency_group="control")
    def sync_to(self, version: int) -> dict[str, Any]:
        """Catch up to ``version`` from the checkpoint store (checksums verified), or a retained set."""
        with self._ctl:
            t = time.perf_counter()
            if self.engine.version != version:
                for txn in list(self._staged):
                    self._discard(txn)
                if version < self.engine.version:
                    self.engine = self._load_engine()  # versions only grow within one engine
                if version != self.engine.version:
                    staged = self.engine.stage(self.store.load(version), version)
                    self.engine.commit(staged)
            self.state = "serving"
            set_version(self._fleet, self.replica_id, self.engine.version)
            phase_log("replica", "sync", None, self.engine.version, time.perf_counter() - t,
                      replica=self.replica_id)
            return {"replica": self.replica_id, "version": self.engine.version,
                    "sync_s": time.perf_counter() - t}

    # ------------------------------------------------------------------ inspection

    @ray.method(concurrency_group="control")
    def status(self) -> dict[str, Any]:
        ctx = ray.get_runtime_context()
        mem = self.engine.memory()
        return {
            "id": self.replica_id,
            "node": ctx.get_node_id(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "card": self.spec.get("card"),
            "device": self.spec["device"],
            "visible_devices": {k: os.environ.get(k) for k in
                                ("CUDA_VISIBLE_DEVICES", "MLU_VISIBLE_DEVICES") if os.environ.get(k)},
            "version": self.engine.version,
            "state": self.state,
            "healthy": not self._excluded and self.state == "serving",
            "lease_left_s": round(max(0.0, self._lease_expires - time.monotonic()), 3),
            "inflight": self._inflight,
            "pending": [(r.txn, r.state.value) for r in self.participant.pending()],
            "staged_bytes": mem.staged_bytes,
            "previous_bytes": mem.previous_bytes,
            "epoch": self.participant.epoch,
            "last_refit_at": self._last_refit_at,
        }

    @ray.method(concurrency_group="control")
    def weight_checksums(self) -> dict[str, str]:
        """Checksums of the live weights (for invariant checks: equal across the fleet)."""
        return {n: tensor_checksum(t) for n, t in self.engine.weights().items()}

    @ray.method(concurrency_group="control")
    def arm_failpoint(self, name: str, action: str | None) -> None:
        """Arm a failpoint in this replica (fault-injection tests)."""
        self.fp.arm(name, action)

    @ray.method(concurrency_group="control")
    def ping(self) -> str:
        return self.replica_id
