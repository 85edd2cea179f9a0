"""The replica actor: one card, one engine, serving while it takes part in refits.

Contract:
- ``infer`` runs in the ``serve`` concurrency group and protocol calls in ``control``: a refit never
  queues behind inference, nor the reverse. Every response carries the version that produced it.
  With batching (``ReplicaSettings.batch_size``) a request's inputs are checked on their own
  (its own ``InputError``), then joined with concurrent ones along the batch dim
  (``actors.batcher``): one run of the engine, one weight set and one version per batch.
  It serves only while its lifecycle is ``serving`` and its lease allows (``ServingLease``); it
  never loads weights on the serving path (a replica found behind catches up in the background
  and answers ``stale`` meanwhile).
- ``prepare`` fetches the version's bytes from the object store, verifies every checksum, stages
  them in the engine and votes. It never raises: every failure becomes a NO vote with a reason. A
  partial refit built on a version this replica does not serve is a NO. A repeated PREPARE of a
  known transaction answers from its record and changes nothing.
- ``commit``/``activate``/``abort`` are idempotent; their legality is decided by
  ``ReplicaParticipant`` (epoch fencing, remembered decisions), whose records hold the staged sets.
- Canaries: the coordinator's renewals say the replica's cohort (``main`` or ``canary``), which
  labels its request metrics; ``serving_stats`` tells the canary's judge what it served (requests,
  errors, latencies: ``actors.serving_stats``). A canary replica counts outputs that are not finite
  as errors.
- On start (and on every Ray restart) the replica loads the engine file and serves nothing
  (lifecycle ``loading``) until it learned from the coordinator which version to serve (the
  active version, or the canary's for a member of a canary's cohort): it asks
  (``catch_up_plan``) until the coordinator answers, or the coordinator catches it up first
  (``sync_to``). It never reads the coordinator's log. It then catches up from a live peer
  (its own node first) or else the checkpoint store, checksums verified (``actors.catch_up``);
  ``status`` names the source. If it cannot (a corrupted checkpoint and no peer), it is in
  lifecycle ``failed``: it serves nothing, and ``status`` and lease renewals say why.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import ray

from engines.checksum import tensor_checksum
from engines.errors import InputError

from .batcher import Batcher
from .catch_up import CatchUpPlan
from .control_channel import ControlServer
from .failpoints import Failpoints
from .heap import CollectorPauses, freeze_startup_heap
from .object_state import checkpoint_store
from .payload import fetch, unseal
from .replica_client import coordinator_actor_name, replica_actor_name
from .replica_core import ReplicaCore
from .replica_protocol import Lifecycle, NodeDuty, TxnState
from .replies import Ack, LeaseReply, PrepareReply
from .serving_lease import LeaseVerdict, ServingLease
from .serving_stats import ServingStats
from .settings import ReplicaSettings
from .telemetry import observe_request, set_version

if TYPE_CHECKING:
    from engines import Engine


SERVE_THREADS = 32  # requests a replica holds at once (more with batching: ``replica_class``)
CONTROL_THREADS = 4


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


class ReplicaActor:
    """A Ray actor owning one engine on one card. See the module docstring for its contract."""

    def __init__(self, replica_id: str, settings: ReplicaSettings) -> None:
        # set here, not in a runtime_env: any runtime_env makes Ray start a new worker process for
        # the replica instead of one it started ahead. OpenMP reads it when torch loads.
        os.environ["OMP_NUM_THREADS"] = str(settings.torch_threads)
        import torch

        torch.set_num_threads(settings.torch_threads)
        self.replica_id = replica_id
        self.s = settings
        self.fp = Failpoints(settings.failpoints, owner=replica_id)
        self.lease = ServingLease(settings.lease_s, self._ask_coordinator)
        self._inflight = 0
        self._inflight_cv = threading.Condition()
        self.stats = ServingStats()
        self.cohort = "main"
        self._coordinator: Any = None
        self._background: threading.Thread | None = None
        self._background_lock = threading.Lock()
        store = checkpoint_store(settings.state_dir, settings.state_options, cleanup=False, fp=self.fp)
        self.core = ReplicaCore(replica_id, self._load_engine, store, self._fetch, self.fp)
        self.core.node = ray.get_runtime_context().get_node_id()
        self.core.on_version = lambda v: set_version(settings.fleet, replica_id, v)
        self.core.from_peer = self._from_peer
        self.core.prefetch_wait_s = settings.fetch_timeout_s
        self.batcher = None if settings.batch_size is None else Batcher(
            self._run_batch, max_batch_size=settings.batch_size, max_wait_s=settings.batch_wait_s)
        if settings.prefill_sets:
            self.core.engine.prefill_pool(settings.prefill_sets)
        freeze_startup_heap()
        self.gc_pauses = CollectorPauses().install()
        self.control = ControlServer({"prepare": self.prepare_sealed, "commit": self.commit,
                                      "abort": self.abort}, ray.util.get_node_ip_address())
        self.fp.hit("replica.on_start")
        self._start_serving()

    @property
    def engine(self) -> Engine:
        return self.core.engine

    # ------------------------------------------------------------------ start-up and catch-up

    def _load_engine(self) -> Engine:
        """The engine file on this replica's device. ``enable_refit`` is the file's own: an engine
        built without it refuses every PREPARE (a NO vote naming RefitDisabledError)."""
        from engines import load_engine

        return load_engine(self.s.engine, device=self.s.device, memory_mode=self.s.memory_mode,
                           host_to_device=self.s.host_to_device, keep_previous=self.s.keep_previous,
                           memory_budget_bytes=self.s.memory_budget_bytes)

    def _fetch(self, refs: list[Any]) -> list[Any]:
        return fetch(refs, self.s.fetch_timeout_s)

    def _start_serving(self) -> None:
        set_version(self.s.fleet, self.replica_id, self.engine.version)
        with self._background_lock:
            self._background = threading.Thread(target=self._learn_version, name="start-up", daemon=True)
            self._background.start()

    def _learn_version(self) -> None:
        """Ask the coordinator which version to serve until it answers (or caught this replica up
        itself), then catch up to it."""
        wait = 0.05
        while self.core.lifecycle.state is Lifecycle.LOADING:
            plan = self._ask_plan()
            if plan is not None:
                with self.core.ctl:
                    if self.core.lifecycle.state is Lifecycle.LOADING:
                        self._sync_quietly(plan.version, plan)
                return
            time.sleep(wait)
            wait = min(1.0, wait * 2)

    def _ask_plan(self) -> CatchUpPlan | None:
        """The coordinator's catch-up plan for this replica; None while it cannot say."""
        try:
            if self._coordinator is None:
                self._coordinator = ray.get_actor(coordinator_actor_name(self.s.fleet), self.s.namespace)
            return ray.get(self._coordinator.catch_up_plan.remote(self.replica_id),
                           timeout=self.lease.confirm_s)
        except Exception:  # noqa: BLE001  (not there yet, restarting or recovering: ask again)
            self._coordinator = None
            return None

    def _from_peer(self, peer: str, version: int) -> tuple[list[Any], dict[str, Any]] | None:
        handle = ray.get_actor(replica_actor_name(self.s.fleet, peer), self.s.namespace)
        return ray.get(handle.export.remote(version), timeout=self.s.fetch_timeout_s)

    def _catch_up_in_background(self, version: int) -> None:
        """Found behind on the serving path: catch up off it (one catch-up at a time)."""
        with self._background_lock:
            if self._background is not None and self._background.is_alive():
                return
            self.core.lifecycle.move(Lifecycle.CATCHING_UP)
            self._background = threading.Thread(target=self._catch_up, args=(version,), daemon=True)
            self._background.start()

    def _catch_up(self, version: int) -> None:
        plan = self._ask_plan()
        with self.core.ctl:
            if self.engine.version < version:
                self._sync_quietly(version, plan)
            else:
                self.core.lifecycle.move(Lifecycle.SERVING)

    def _sync_quietly(self, version: int, plan: CatchUpPlan | None) -> None:
        with contextlib.suppress(Exception):  # state failed, with the reason, for status and renewals
            self.core.sync(version, plan)

    # ------------------------------------------------------------------ serving

    @ray.method(concurrency_group="serve")
    def infer(self, inputs: list[Any], min_version: int = 0) -> dict[str, Any]:
        """Run inference; answers ``stale`` (with a reason) when it cannot serve ``min_version`` or
        newer, is not serving (catching up, failed, draining) or is excluded from the fleet."""
        state = self.core.lifecycle.state
        if state is not Lifecycle.SERVING:
            why = f"failed: {self.core.lifecycle.error}" if state is Lifecycle.FAILED else state.value
            return self._stale(why)
        verdict, active = self.lease.check(self.engine.version)
        if verdict is LeaseVerdict.EXCLUDED:
            return self._stale("excluded")
        if verdict is LeaseVerdict.BEHIND:
            self._catch_up_in_background(active)
            return self._stale("behind")
        if min_version > self.engine.version and not self.core.activate_for(min_version):
            return self._stale("behind")
        with self._inflight_cv:
            self._inflight += 1
        t0 = time.perf_counter()
        cohort = self.cohort
        try:
            try:
                if self.batcher is None:
                    r = self.engine.infer(*inputs)
                    outputs, version = r.outputs, r.version
                else:
                    self.engine.check_inputs(*inputs)  # this request's own InputError, not its batch's
                    outputs, version = self.batcher.submit(inputs)
            except InputError:
                raise
            except Exception:
                self.stats.record(time.perf_counter() - t0, error=True)
                raise
            seconds = time.perf_counter() - t0
            bad = cohort == "canary" and not all(np.isfinite(np.asarray(o)).all() for o in outputs)
            self.stats.record(seconds, error=bad)
            observe_request(self.s.fleet, self.replica_id, cohort, seconds)
        finally:
            with self._inflight_cv:
                self._inflight -= 1
                if self._inflight == 0:
                    self._inflight_cv.notify_all()
        return {"stale": False, "outputs": outputs, "version": version, "replica": self.replica_id}

    def _run_batch(self, joined: list[Any]) -> tuple[list[Any], int]:
        """One run of the engine for a whole batch: one weight set, one version (I1 per batch)."""
        r = self.engine.infer(*joined)
        return r.outputs, r.version

    def _stale(self, reason: str) -> dict[str, Any]:
        return {"stale": True, "version": self.engine.version, "replica": self.replica_id, "reason": reason}

    def _ask_coordinator(self) -> dict[str, Any]:
        if self._coordinator is None:
            self._coordinator = ray.get_actor(coordinator_actor_name(self.s.fleet), self.s.namespace)
        try:
            return ray.get(self._coordinator.confirm.remote(self.replica_id, self.engine.version),
                           timeout=self.lease.confirm_s)
        except Exception:
            self._coordinator = None
            raise

    # ------------------------------------------------------------------ leases and membership

    @ray.method(concurrency_group="control")
    def renew_lease(self, epoch: int, lease_s: float, generation: int = 0,
                    cohort: str = "main") -> LeaseReply:
        """The coordinator's renewal: serve for ``lease_s`` more seconds as a member of ``cohort``."""
        self.fp.hit("message.renew_lease")
        self.core.fence(epoch)
        accepted = self.lease.renew(epoch, lease_s, generation)
        if accepted:
            self.cohort = cohort
        self.fp.hit("reply.renew_lease")
        self.core.prefetch.expire()
        lifecycle = self.core.lifecycle
        prepared = tuple(r.txn for r in self.core.participant.pending() if r.state is TxnState.PREPARED)
        return LeaseReply(self.replica_id, accepted, self.engine.version, lifecycle.state.value,
                          lifecycle.error, prepared, self.core.node)

    @ray.method(concurrency_group="control")
    def exclude(self, epoch: int = 0, generation: int = 0) -> bool:
        """Stop serving fleet traffic now (excluded); ignored if older than a later renewal."""
        self.fp.hit("message.exclude")
        return self.lease.exclude(epoch, generation)

    @ray.method(concurrency_group="control")
    def drain(self, timeout_s: float = 30.0) -> int:
        """Refuse new requests (routers retry elsewhere); wait for in-flight ones; return how many
        were still running at the deadline (0: drained)."""
        self.core.lifecycle.move(Lifecycle.DRAINING)
        self.lease.revoke()
        deadline = time.monotonic() + timeout_s
        with self._inflight_cv:
            while self._inflight and time.monotonic() < deadline:
                self._inflight_cv.wait(timeout=max(0.0, deadline - time.monotonic()))
            return self._inflight

    # ------------------------------------------------------------------ protocol (see ReplicaCore)

    @ray.method(concurrency_group="control")
    def prepare(self, epoch: int, txn: str, version: int, refs: list[Any] | None,
                specs: dict[str, Any], checksums: dict[str, str],
                source: dict[str, Any] | None = None, base_version: int | None = None,
                verifiers: dict[str, str] | None = None, probes: list[Any] | None = None,
                hashed_on: str | None = None) -> PrepareReply:
        """Fetch, verify, stage; vote. ``source`` may name a version to re-stage (rollback).
        ``verifiers`` (node -> replica) names the one member per node that checks the node's copy
        (it hashes it, unless ``hashed_on`` names this node: the caller hashed that copy); the
        others stage it unhashed. A replica named for a node it is not on (it moved) votes NO, so
        that no node's copy goes unverified (``NodeDuty``). ``probes`` (``engines.Probe``) run on
        the staged set of each node's named member (every member without verifiers): a failing
        probe is a NO vote naming it."""
        self.fp.hit("message.prepare", txn)
        duty = NodeDuty.of(verifiers, hashed_on, self.core.node, self.replica_id)
        if duty.refused:
            return self.core.refuse(txn, duty.refused)
        vote = self.core.prepare(epoch, txn, version, refs, specs, checksums, source, base_version,
                                 duty.hash, probes if duty.designated else None)
        self.fp.hit("reply.prepare", txn)
        return vote

    @ray.method(concurrency_group="control")
    def prepare_sealed(self, sealed: bytes, refs: list[Any] | None) -> PrepareReply:
        """``prepare`` with every argument but ``refs`` sealed in one ``bytes``
        (``actors.payload.seal``), as the coordinator sends it: one argument for Ray to serialise
        and deserialise instead of ten."""
        (epoch, txn, version, specs, checksums, source, base_version, verifiers, probes,
         hashed_on) = unseal(sealed)
        return self.prepare(epoch, txn, version, refs, specs, checksums, source, base_version, verifiers,
                            probes, hashed_on)

    @ray.method(concurrency_group="control")
    def open_control(self, key: bytes) -> tuple[str, int]:
        """Take the coordinator's PREPARE, COMMIT and ABORT over the control channel too
        (``actors.control_channel``), from peers that hold ``key`` (the coordinator's, handed over
        through Ray); the address to connect to."""
        return self.control.open(key)

    @ray.method(concurrency_group="control")
    def prefetch(self, tag: str, refs: list[Any], specs: dict[str, Any],
                 verifiers: dict[str, str] | None = None, hashed_on: str | None = None) -> bool:
        """A bucket of publication ``tag``, announced as soon as it is in the object store and
        checked: fetch, copy and hash it (``NodeDuty``, as in ``prepare``) in the background, for
        the PREPARE that names it (``actors.prefetch``). Returns at once; False when it is ignored
        (this memory mode stages at PREPARE only)."""
        if not self.core.can_prefetch():
            return False
        verify = NodeDuty.of(verifiers, hashed_on, self.core.node, self.replica_id).hash
        return all([self.core.prefetch.offer(tag, ref, specs, verify) for ref in refs])

    @ray.method(concurrency_group="control")
    def withdraw(self, tag: str) -> None:
        """Free what was prefetched for ``tag`` (its publication failed; no PREPARE will come)."""
        self.core.prefetch.forget(tag)

    @ray.method(concurrency_group="control")
    def commit(self, epoch: int, txn: str, activate: bool = False) -> Ack:
        """Pin the staged set as committed; with ``activate``, then make it live at once (the
        coordinator's one message after its COMMIT record). Idempotent."""
        self.fp.hit("message.commit", txn)
        self.fp.hit("replica.before_commit")
        ack = self.core.commit(epoch, txn)
        if activate:
            ack = self._activate(epoch, txn)
        self.fp.hit("reply.commit", txn)
        return ack

    @ray.method(concurrency_group="control")
    def activate(self, epoch: int, txn: str) -> Ack:
        """Make the committed set live (the swap). Idempotent."""
        return self._activate(epoch, txn)

    def _activate(self, epoch: int, txn: str) -> Ack:
        self.fp.hit("message.activate", txn)
        self.fp.hit("replica.before_activate")
        ack = self.core.activate(epoch, txn)
        self.fp.hit("reply.activate", txn)
        return ack

    @ray.method(concurrency_group="control")
    def abort(self, epoch: int, txn: str, reason: str = "") -> Ack:
        """Discard the staged set of ``txn``; remember the decision. Idempotent."""
        self.fp.hit("message.abort", txn)
        ack = self.core.abort(epoch, txn, reason)
        self.fp.hit("reply.abort", txn)
        return ack

    @ray.method(concurrency_group="control")
    def sync_to(self, version: int, plan: CatchUpPlan | None = None) -> Ack:
        """Catch up to ``version`` from the plan's peers, else the checkpoint store (checksums
        verified). Raises (and the replica's state is ``failed``, with the reason) if it cannot."""
        self.fp.hit("message.sync_to")
        ack = self.core.sync(version, plan)
        self.fp.hit("reply.sync_to")
        return ack

    @ray.method(concurrency_group="control")
    def export(self, version: int) -> tuple[list[Any], dict[str, Any]] | None:
        """Put the weights of ``version`` into the object store, if this replica holds them
        (the coordinator re-persists a version nobody has written yet): ``([ref], specs)``."""
        self.fp.hit("replica.export")
        exported = self.core.export(version)
        if exported is None:
            return None
        wire, specs = exported
        return [ray.put(wire)], specs

    # ------------------------------------------------------------------ inspection

    @ray.method(concurrency_group="control")
    def status(self) -> dict[str, Any]:
        mem = self.engine.memory()
        core = self.core
        state = core.lifecycle.state
        return {
            "id": self.replica_id, "node": ray.get_runtime_context().get_node_id(),
            "host": socket.gethostname(), "pid": os.getpid(), "card": self.s.card, "device": self.s.device,
            "torch_threads": _torch_threads(),
            "visible_devices": {k: os.environ.get(k) for k in
                                ("CUDA_VISIBLE_DEVICES", "MLU_VISIBLE_DEVICES") if os.environ.get(k)},
            "version": self.engine.version, "state": state.value, "error": core.lifecycle.error,
            "healthy": not self.lease.excluded and state is Lifecycle.SERVING,
            "lease_left_s": round(self.lease.left_s(), 3), "inflight": self._inflight,
            "pending": [(r.txn, r.state.value) for r in core.participant.pending()],
            "staged_bytes": mem.staged_bytes, "previous_bytes": mem.previous_bytes,
            "borrowed_bytes": mem.borrowed_bytes, "memory_mode": self.s.memory_mode,
            "retained": self.engine.retained_versions(),
            "inputs": [{"name": s.name, "spec": s.describe()} for s in self.engine.input_specs()],
            "batching": None if self.batcher is None else {
                "max_batch_size": self.batcher.max_batch_size, "max_wait_s": self.batcher.max_wait_s,
                **self.batcher.stats.as_dict()},
            "epoch": core.participant.epoch, "last_refit_at": core.last_refit_at, "cohort": self.cohort,
            "caught_up_from": core.caught_up.as_dict(), "prefetch": core.prefetch.held(),
            "gc": self.gc_pauses.as_dict(), "control_calls": self.control.calls,
        }

    @ray.method(concurrency_group="control")
    def serving_stats(self, since: float) -> dict[str, Any]:
        """Requests served from wall time ``since`` on: ``served``, ``errors``, ``latencies`` (s)."""
        return self.stats.window(since)

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


def replica_class(serve_threads: int = SERVE_THREADS) -> Any:
    """The replica as a Ray actor class whose ``serve`` group has ``serve_threads`` threads (Ray
    fixes concurrency groups with the class, not per actor)."""
    return ray.remote(concurrency_groups={"serve": serve_threads, "control": CONTROL_THREADS},
                      max_restarts=-1, max_task_retries=0)(ReplicaActor)


Replica = replica_class()
