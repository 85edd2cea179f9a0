"""The driver API: launch or connect to a fleet, infer, refit, roll back, inspect, shut down."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from actors.canary import Canary
from actors.payload import BUCKET_BYTES, is_inline, seal
from actors.replica_client import coordinator_actor_name
from actors.settings import Timeouts
from actors.store import validate_label
from actors.two_phase import TxnResult
from engines.probes import Probe, load_probes

from .config import FleetConfig
from .errors import FleetNotFound, RefitAborted
from .launch import Launch
from .placement import (
    assign_card_indexes,
    bundle_nodes,
    cards_by_node,
    create_placement_group,
    plan_placement,
)
from .ray_session import ensure_ray
from .remote import readable_errors
from .router import InferResponse, Router

logger = logging.getLogger("weight_refit.fleet")

if TYPE_CHECKING:
    from engines.weights import WeightsLike


@dataclass
class RefitResult:
    """A committed refit or rollback (or a no-op: ``noop`` True, version unchanged)."""

    version: int
    txn: str | None
    duration_s: float
    noop: bool = False
    duplicate: bool = False
    replicas: dict[str, dict[str, float]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    excluded: list[str] = field(default_factory=list)
    persisted: bool = True  # the version's checkpoint was durable before refit returned
    canary: dict[str, Any] | None = None  # a canary refit: cohort, traffic, base_version, judge

    @property
    def evicted(self) -> list[str]:
        """The former name of ``excluded``."""
        return self.excluded


class Fleet:
    """A handle on one fleet: its coordinator, and a router over its replicas.

    ``launch`` starts (or re-attaches to) the detached coordinator and replicas named after the
    config; ``connect`` attaches to a running fleet from any driver or Ray job. Handles are
    thread-safe; each one routes its own requests (monotonic reads per handle).
    """

    def __init__(self, name: str, namespace: str, coordinator: Any, cfg: dict[str, Any]) -> None:
        self.name = name
        self.namespace = namespace
        self._coord = coordinator
        self._cfg = cfg
        self._manifest: dict[str, Any] | None = None
        self._checked: Any = None  # publish.CheckedManifest, parsed at the first refit
        timeouts = Timeouts(**cfg["timeouts"])
        routing = cfg["routing"]
        self._refit_timeout = timeouts.refit_call_s()
        self._request_s = timeouts.request_s
        self._persist_s = timeouts.persist_s
        self._unwritten: list[int] = []  # this handle's stored versions whose checkpoint may be behind
        self._lock = threading.Lock()
        self.launch_timings: dict[str, float] = {}  # seconds per launch step (set by ``launch``)
        self.router = Router(self._members, max_queue=routing["max_queue_per_replica"],
                             request_timeout_s=timeouts.request_s,
                             retries_on_stale=routing["retries_on_stale"],
                             refresh_s=routing.get("refresh_s", 2.0))

    # ---------------------------------------------------------------- lifecycle

    @classmethod
    def launch(cls, cfg: FleetConfig, *, address: str | None = None) -> Fleet:
        """Start coordinator and replicas (or re-attach to running ones); return when all serve.

        Ray: ``address``, else ``RAY_ADDRESS``, else ``cfg.address``, else a private Ray for this
        process (``cluster.ray_session``). A fleet already running with another config is refused
        (``FleetConfigMismatch``); a launch that fails leaves nothing it created behind."""
        launch = Launch(cfg, address)
        fleet = cls(cfg.name, cfg.namespace, launch.run(), cfg.model_dump(mode="json"))
        fleet.launch_timings = dict(launch.timings)
        return fleet

    @classmethod
    def connect(cls, name: str, namespace: str = "weight-refit", address: str | None = None) -> Fleet:
        """Attach to a running fleet by name (from another driver or a Ray job). Ray: ``address``,
        else ``RAY_ADDRESS``, else the head ``ray start`` recorded on this machine."""
        validate_label(name, what="fleet name")
        ensure_ray(address, private=False)
        try:
            coord = ray.get_actor(coordinator_actor_name(name), namespace=namespace)
        except ValueError:
            raise FleetNotFound(f"no fleet {name!r} in namespace {namespace!r} "
                                f"(no actor {coordinator_actor_name(name)!r})") from None
        try:
            with readable_errors():
                cfg = ray.get(coord.config.remote(), timeout=Timeouts().request_s)
        except RayActorError:
            raise FleetNotFound(f"fleet {name!r} in namespace {namespace!r} is not running "
                                "(its coordinator is gone)") from None
        return cls(name, namespace, coord, cfg)

    def shutdown(self) -> None:
        """Kill the replicas and the coordinator and remove the placement groups. The state
        directory (log and checkpoints) stays: a later launch resumes from it."""
        with readable_errors():
            ray.get(self._coord.shutdown.remote(), timeout=self._request_s * 2)
        ray.kill(self._coord, no_restart=True)
        from ray.util import remove_placement_group
        from ray.util.placement_group import placement_group_table

        prefix = f"{self.name}.replicas"
        for info in placement_group_table().values():
            if info.get("name", "").startswith(prefix) and info.get("state") != "REMOVED":
                with contextlib.suppress(Exception):
                    remove_placement_group(ray.util.get_placement_group(info["name"]))

    # ---------------------------------------------------------------- membership

    def scale(self, replicas: int) -> dict[str, Any]:
        """Add replicas (they catch up to the active version before they join and serve) or
        remove the newest ones (each drains its in-flight requests first). Returns the ids."""
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        cfg = FleetConfig(**{**self._cfg, "replicas": max(replicas, 1)})
        st = self.status()
        current = sorted((r["id"] for r in st["replicas"]), key=lambda r: int(r[1:]))
        added: list[str] = []
        removed: list[str] = []
        if replicas > len(current):
            added = self._add_replicas(cfg, current, st, replicas - len(current))
        for rid in reversed(current[replicas:]):
            with readable_errors():
                ray.get(self._coord.leave.remote(rid), timeout=self._request_s + 60)
            removed.append(rid)
        self.router.refresh()
        return {"added": added, "removed": removed, "replicas": replicas}

    def _add_replicas(self, cfg: FleetConfig, current: list[str], st: dict[str, Any], n: int) -> list[str]:
        start = 1 + max((int(r[1:]) for r in current), default=-1)
        new_ids = [f"r{start + i}" for i in range(n)]
        plan = plan_placement(cfg.model_copy(update={"replicas": n}))
        plan = dataclasses.replace(plan, replicas=tuple(
            dataclasses.replace(rp, replica_id=rid) for rp, rid in zip(plan.replicas, new_ids, strict=True)))
        pg = create_placement_group(plan, cfg.timeouts.launch_s, name=f"{cfg.name}.replicas.{start}")
        cards: dict[str, int] = {}
        if plan.card_env_var and pg is not None:
            existing = {r["id"]: r["card"] for r in st["replicas"] if r.get("card") is not None}
            nodes = {r["id"]: r["node"] for r in st["replicas"] if r.get("node")}
            bundle_node = bundle_nodes(pg)
            nodes.update({rp.replica_id: bundle_node[rp.bundle_index] for rp in plan.replicas})
            cards = {rid: c for rid, c in assign_card_indexes(
                nodes, cards_by_node(plan.resource_name), existing,
                replicas_per_card=plan.replicas_per_card).items() if rid in new_ids}
        launch = Launch(cfg)
        if pg is not None:
            launch.created_group(pg)
        try:
            launch.start_replicas(plan, pg, cards, self._coord)
        except BaseException:
            launch.undo(self._coord)
            raise
        return new_ids

    # ---------------------------------------------------------------- serving

    def _members(self) -> dict[str, Any]:
        with readable_errors():
            return ray.get(self._coord.routing.remote(), timeout=self._request_s)

    def handle(self) -> Fleet:
        """Another handle on this fleet, with its own router: its own monotonic reads (and, during
        a canary, its own stickiness), e.g. one per client session."""
        return type(self)(self.name, self.namespace, self._coord, self._cfg)

    def infer(self, *inputs: Any, timeout_s: float | None = None) -> InferResponse:
        """Infer on the least-loaded replica: ``r.outputs``, ``r.version``, ``r.replica``."""
        if len(inputs) == 1 and isinstance(inputs[0], (list, tuple)):
            inputs = tuple(inputs[0])
        return self.router.call(list(inputs), timeout_s)

    # ---------------------------------------------------------------- refits

    def manifest(self) -> dict[str, Any]:
        """name -> {shape, dtype} of every refittable weight."""
        with self._lock:
            if self._manifest is None:
                with readable_errors():
                    self._manifest = ray.get(self._coord.manifest.remote(), timeout=self._request_s)
            return self._manifest

    def refit(self, weights: WeightsLike, key: str | None = None, *, strip_prefix: str | None = None,
              add_prefix: str | None = None, mapping: Mapping[str, str] | None = None,
              complete: bool = False, probes: Sequence[Probe] | None = None,
              canary: Canary | None = None) -> RefitResult:
        """Publish ``weights`` (a mapping or a .safetensors/.pt/.npz path) and refit every replica.

        Validated and checksummed here before any transfer; put into the object store once. Raises
        ``RefitAborted`` when any member votes NO (the fleet stays on its version). The same
        ``key`` returns the first call's outcome; without one a key is generated, so that a call
        cut off by a coordinator crash still learns its outcome (it waits for the restarted
        coordinator's recovery and returns or raises accordingly). ``complete`` refuses a set
        that lacks any of the engine's weights. ``probes`` (``cluster.Probe``), with those of the
        config's ``probes:`` file, run on the staged set in PREPARE, before the vote: a failing one
        aborts the refit, its reason naming the probe, the output, the max |diff| and the tolerance.
        ``canary`` (``cluster.Canary``) commits the version on a cohort only and routes a share of
        new requests to it, until ``promote()``, ``abort_canary()`` or its judge ends it; other
        refits and rollbacks are refused meanwhile. This handle does not stick to the canary.
        """
        from engines.config import NonFinitePolicy

        t0 = time.perf_counter()
        key = key or f"auto-{uuid.uuid4().hex}"
        checks = self._probes(probes)
        if canary is not None and not isinstance(canary, Canary):
            raise ValueError(f"canary must be a cluster.Canary, got {type(canary).__name__}")
        waited = self._let_checkpoints_catch_up()
        pub = self._publish(weights, key, prefetch=canary is None and self._cfg.get("prefetch", False),
                            non_finite=NonFinitePolicy.REJECT, strip_prefix=strip_prefix,
                            add_prefix=add_prefix, mapping=mapping, complete=complete,
                            bucket_bytes=self._cfg.get("bucket_bytes", BUCKET_BYTES))
        stored = any(not is_inline(r) for r in pub.refs)
        try:
            call = self._coord.refit.remote(pub.refs, seal(pub.specs), seal(pub.checksums), key, checks,
                                            canary, pub.hashed_on)
            out = self._call(call, key)
        finally:
            pub.refs.clear()  # the replicas and the store have their copies (or it aborted)
        result = self._result(out, t0, {**pub.timings, "checkpoint_wait_s": waited}, observe=canary is None)
        with self._lock:  # the versions whose checkpoint is still to be written, as the answer says
            if out.unpersisted is not None:
                self._unwritten = [v for v in self._unwritten if v in out.unpersisted]
            if stored and not (result.persisted or result.noop or result.duplicate):
                self._unwritten.append(result.version)
        if canary is not None:
            self.router.refresh()
        return result

    def _publish(self, weights: WeightsLike, key: str, *, prefetch: bool, **options: Any) -> Any:
        """``cluster.publish.publish``; with ``prefetch`` each bucket is announced to the members as
        soon as it is put (``Coordinator.announce``: they copy it while the next is put), and a
        publication that fails withdraws what was announced."""
        from .publish import publish  # torch: imported by the first refit, not by every driver

        announced: list[Any] = []

        def announce(ref: Any, specs: dict[str, Any], hashed_on: str | None) -> None:
            announced.append(self._coord.announce.remote(key, [ref], specs, hashed_on))

        try:
            pub = publish(weights, self._checked_manifest(), on_put=announce if prefetch else None, **options)
        except BaseException:
            if announced:  # after the announcements, so that the coordinator forwards it last
                ray.wait(announced, num_returns=len(announced), timeout=1.0)
                self._coord.withdraw.remote(key)
            raise
        if announced:  # forwarded to the members before the PREPARE is
            ray.wait(announced, num_returns=len(announced), timeout=1.0)
        return pub

    def _checked_manifest(self) -> Any:
        from .publish import CheckedManifest

        if self._checked is None:
            self._checked = CheckedManifest.of(self.manifest())
        return self._checked

    def promote(self, reason: str = "") -> RefitResult:
        """Activate the running canary's version on the rest of the fleet, with one commit point.
        Raises ``RefitAborted`` (the canary goes on) if a replica of the rest votes NO, and
        ``NoCanary`` when no canary runs."""
        return self._end_canary(self._coord.promote, reason)

    def abort_canary(self, reason: str = "") -> RefitResult:
        """End the running canary: a new version, on every replica (the cohort included), carrying
        the weights from before the canary, so no handle sees its versions go back and the rest of
        the fleet never serves the canary's. ``NoCanary`` when no canary runs."""
        return self._end_canary(self._coord.abort_canary, reason)

    def _end_canary(self, method: Any, reason: str) -> RefitResult:
        t0 = time.perf_counter()
        with readable_errors():
            out = ray.get(method.remote(reason), timeout=self._refit_timeout)
        result = self._result(out, t0, {})
        self.router.refresh()  # the canary has ended: stop splitting traffic now
        return result

    def _probes(self, probes: Sequence[Probe] | None) -> list[Probe] | None:
        """The config's probes file's probes, then ``probes``; ValueError for anything else."""
        out = load_probes(self._cfg["probes"]) if self._cfg.get("probes") else []
        for p in probes or []:
            if not isinstance(p, Probe):
                raise ValueError(f"probes must be cluster.Probe objects, got {type(p).__name__}")
            out.append(p)
        return out or None

    def validate(self, weights: WeightsLike, *, strip_prefix: str | None = None,
                 add_prefix: str | None = None, mapping: Mapping[str, str] | None = None,
                 complete: bool = False) -> dict[str, Any]:
        """Dry run of ``refit``: read and validate against the fleet manifest, checksum; nothing
        is put or staged. Returns names, bytes, checksums and what is missing."""
        from engines.checksum import checksums

        from .publish import load_and_check

        manifest = self.manifest()
        tensors = load_and_check(weights, manifest, strip_prefix=strip_prefix, add_prefix=add_prefix,
                                 mapping=mapping, complete=complete)
        missing = sorted(set(manifest) - set(tensors))
        return {"valid": True, "tensors": len(tensors), "missing": missing,
                "bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
                "checksums": checksums(tensors)}

    def progress(self) -> dict[str, Any] | None:
        """The transaction in flight (phase, votes so far, activated), or None."""
        with readable_errors():
            return ray.get(self._coord.progress.remote(), timeout=self._request_s)

    def rollback(self, to: int | None = None, key: str | None = None) -> RefitResult:
        """A new version carrying an earlier version's weights (default: walk back one step)."""
        t0 = time.perf_counter()
        key = key or f"auto-{uuid.uuid4().hex}"
        return self._result(self._call(self._coord.rollback.remote(to, key), key), t0, {})

    def _call(self, ref: Any, key: str) -> TxnResult:
        """The coordinator's answer to a refit or rollback call. If the coordinator died meanwhile,
        or the call outlived every phase's timeout (it may have queued behind other drivers'
        refits), the outcome is resolved through the call's idempotency key."""
        try:
            with readable_errors():
                return ray.get(ref, timeout=self._refit_timeout)
        except RayActorError:
            return self._await_outcome(key, queued=False)
        except GetTimeoutError:
            return self._await_outcome(key, queued=True)

    def _await_outcome(self, key: str, *, queued: bool) -> TxnResult:
        """Ask (the next incarnation of) the coordinator until ``key``'s outcome is decided.
        ``queued``: the call may still be waiting for its turn, so "unknown" is not final."""
        deadline = time.monotonic() + self._refit_timeout
        while time.monotonic() < deadline:
            try:
                out: TxnResult = ray.get(self._coord.outcome.remote(key), timeout=self._request_s)
            except (RayActorError, GetTimeoutError):
                time.sleep(0.2)  # restarting; Ray queues nothing for a dead incarnation
                continue
            if out.status == "unknown" and not queued:
                return TxnResult(status="aborted", txn=None, version=None, key=key,
                                 reason="the coordinator died before the transaction began; nothing changed")
            if out.status == "aborted" or (out.status == "committed" and out.activated):
                return out
            time.sleep(0.2)
        raise RefitAborted(f"outcome of {key!r} still in doubt after {self._refit_timeout:g}s; "
                           f"ask fleet.outcome({key!r}) later", {}, None)

    def _result(self, out: TxnResult, t0: float, timings: dict[str, float], *,
                observe: bool = True) -> RefitResult:
        if out.status == "aborted":
            raise RefitAborted(out.reason or "aborted", out.votes, out.txn)
        if out.status in ("in_doubt", "unknown") or (out.status == "committed" and not out.activated):
            raise RefitAborted(f"transaction {out.txn} is still in progress ({out.phase or 'in doubt'}); "
                               f"ask fleet.outcome() later", {}, out.txn)
        assert out.version is not None
        if observe:
            self.router.observe(out.version)
        return RefitResult(version=out.version, txn=out.txn, duration_s=time.perf_counter() - t0,
                           noop=out.status == "noop", duplicate=out.duplicate, replicas=out.replicas,
                           timings={**timings, "coordinator_s": out.duration_s, "prepare_s": out.prepare_s,
                                    **{f"coordinator.{k}": v for k, v in out.phases.items()}},
                           excluded=list(out.excluded), persisted=out.persisted, canary=out.canary)

    def _let_checkpoints_catch_up(self) -> float:
        """Before putting a version into the object store, wait (seconds waited) until at most one
        version this handle put there may still have its checkpoint to write. Under ``durability:
        replicated`` each version stays in the store until its background write ends, and writes
        go in commit order: refits faster than the disk would pile versions up in the store, and
        Ray would spill them to disk. So the store holds at most two versions of this handle, and
        such refits go at the disk's pace. A write that is failing (a full disk) is not waited for,
        nor a coordinator that does not answer (the refit's own call then deals with it)."""
        with self._lock:
            if len(self._unwritten) < 2:
                return 0.0
            older, self._unwritten = self._unwritten[-2], self._unwritten[-1:]
        t = time.perf_counter()
        try:
            ray.get(self._coord.wait_persisted.remote(older, self._persist_s, True),
                    timeout=self._persist_s + 30)
        except Exception as exc:  # noqa: BLE001  (best effort: the store spills rather than the refit fails)
            logger.info("not waiting for the checkpoint of v%s: %s: %s", older, type(exc).__name__, exc)
        return time.perf_counter() - t

    def wait_persisted(self, version: int, timeout: float = 300.0) -> bool:
        """Wait until ``version``'s checkpoint is durable (under ``durability: replicated`` it is
        written after ``refit`` returns); False if it is not within ``timeout``."""
        with readable_errors():
            done = bool(ray.get(self._coord.wait_persisted.remote(version, timeout), timeout=timeout + 30))
        if done:  # checkpoints are written in commit order: none before it is left to wait for
            with self._lock:
                self._unwritten = [v for v in self._unwritten if v > version]
        return done

    def outcome(self, key_or_txn: str) -> dict[str, Any]:
        """``{"status": committed | aborted | in_doubt | unknown, "version", "txn", "reason", ...}``."""
        with readable_errors():
            out: TxnResult = ray.get(self._coord.outcome.remote(key_or_txn), timeout=self._request_s)
        return dataclasses.asdict(out)

    # ---------------------------------------------------------------- inspection

    def status(self) -> dict[str, Any]:
        """Version, epoch, in-flight txn, recovery, log; per replica: id, node, card, device,
        version, state, membership, healthy, and ``caught_up_from`` (where its version came from:
        ``source`` peer, store or engine file, the ``peer``, ``same_node``, ``seconds``)."""
        with readable_errors():
            return ray.get(self._coord.status.remote(), timeout=self._request_s * 2)

    def history(self, limit: int | None = None, since: int | None = None) -> list[dict[str, Any]]:
        """Transactions in the log, oldest first (committed and aborted, with reasons, durations,
        persisted): only versions above ``since``, and the newest ``limit`` of them."""
        if limit is not None and (isinstance(limit, bool) or limit < 1):
            raise ValueError(f"history limit must be a positive number of rows, got {limit!r}")
        with readable_errors():
            return ray.get(self._coord.history.remote(limit, since), timeout=self._request_s)
