"""Launching a fleet: start its coordinator and replicas, or re-attach to running ones.

Contract of ``Launch.run``:
- Everything that can be checked before creating an actor is checked first: the engine file
  (exists, is an engine, built with ``enable_refit``), the cluster's capacity, and, when the fleet
  already runs, that it runs with this very config (``FleetConfigMismatch`` names every field that
  differs; nothing is touched).
- A launch that fails leaves nothing behind that it created: the replicas and the coordinator it
  started are killed (replicas that had already joined a running coordinator leave it), and the
  placement groups it created are removed. What ran before the call keeps running.
- The errors it raises are readable (``cluster.remote``): a replica that could not start says why.
- Its steps overlap where they can (``timings`` says where the seconds go): the base version is
  written to the checkpoint store (importing torch, on a thread) while Ray starts, and the
  replicas (the longest step: a process each, torch, the engine) are created before the
  coordinator, which is created once the base version is on disk.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ray

from actors.coordinator import Coordinator
from actors.durable import StateDirLock, describe_os_error
from actors.object_state import checkpoint_store, is_url, open_url
from actors.replica import SERVE_THREADS, Replica, replica_class
from actors.replica_client import coordinator_actor_name, replica_actor_name
from actors.settings import CoordinatorSettings, ReplicaSettings
from engines.checksum import bytes_checksum
from engines.engine_file import EngineMetadata, read_engine_metadata, read_engine_weight_bytes
from engines.errors import EngineFileError
from engines.paths import check_regular_file
from engines.probes import load_probes

from .config import FleetConfig
from .errors import BatchingUnsupported, EngineNotRefittable, FleetConfigMismatch, RemoteError
from .placement import (
    actor_options,
    create_placement_group,
    local_ray_init_kwargs,
    plan_placement,
    resolve_card_indexes,
)
from .ray_session import ensure_ray
from .remote import readable_errors

logger = logging.getLogger("weight_refit.launch")

__all__ = ["Launch", "config_differences", "coordinator_settings", "replica_settings"]


def replica_settings(cfg: FleetConfig, card: int | None) -> ReplicaSettings:
    device = cfg.engine_device or {"cpu": "cpu", "cuda": "cuda:0", "mlu": "mlu:0"}[cfg.device]
    spare = 2 if cfg.keep_previous else 1
    return ReplicaSettings(
        fleet=cfg.name, namespace=cfg.namespace, state_dir=cfg.state_dir,
        state_options=dict(cfg.state_options),
        failpoints=dict(cfg.failpoints), engine=cfg.engine, device=device, card=card,
        memory_mode=cfg.memory_mode, host_to_device=cfg.host_to_device, keep_previous=cfg.keep_previous,
        memory_budget_bytes=cfg.memory_budget_bytes, torch_threads=cfg.torch_threads,
        prefill_sets=spare if cfg.prefill_buffers and cfg.memory_mode == "swap" else 0,
        fetch_timeout_s=cfg.timeouts.prepare_s, lease_s=cfg.timeouts.lease_s,
        batch_size=cfg.batching.max_batch_size if cfg.batching else None,
        batch_wait_s=cfg.batching.max_wait_ms / 1000 if cfg.batching else 0.005,
    )


def replica_actor_class(cfg: FleetConfig) -> Any:
    """The replica actor class; with batching, enough requests may wait in a replica at once to
    fill two batches."""
    if cfg.batching is None or 2 * cfg.batching.max_batch_size <= SERVE_THREADS:
        return Replica
    return replica_class(2 * cfg.batching.max_batch_size)


def coordinator_settings(cfg: FleetConfig, tied: list[list[str]] | None = None) -> CoordinatorSettings:
    return CoordinatorSettings(tied=tied or [],
        fleet=cfg.name, namespace=cfg.namespace, state_dir=cfg.state_dir,
        state_options=dict(cfg.state_options),
        failpoints=dict(cfg.failpoints), timeouts=cfg.timeouts, commit_policy=cfg.commit_policy,
        max_exclude=cfg.max_exclude, retain_versions=cfg.retain_versions, persist_fsync=cfg.persist_fsync,
        durability=cfg.durability, history_window=cfg.history_window, control_channel=cfg.control_channel,
        driver_config=cfg.model_dump(mode="json"),
    )


def config_differences(running: Mapping[str, Any], wanted: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the fields whose values differ, with both values."""
    out = []
    for key in sorted(set(running) | set(wanted)):
        a, b = running.get(key), wanted.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping) and key != "failpoints":
            out += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} ({a!r} -> {b!r})")
    return out


def check_engine(cfg: FleetConfig) -> EngineMetadata:
    """The engine file exists, is an engine file, was built with ``enable_refit``, and (with
    ``batching``) its inputs share a dynamic batch dim 0 that takes ``max_batch_size`` samples."""
    try:
        check_regular_file(cfg.engine, "engine file", EngineFileError)
    except EngineFileError as exc:
        raise EngineFileError(f"{exc} (build one with scripts/gen_model.py)") from None
    meta = read_engine_metadata(cfg.engine)
    if not meta.builder_config.get("enable_refit", False):
        raise EngineNotRefittable(
            f"engine file {cfg.engine!r} was built without enable_refit=True: its weights cannot be "
            f"refit (rebuild it with BuilderConfig(enable_refit=True))")
    if cfg.batching is not None:
        check_batchable(cfg.engine, meta.inputs, cfg.batching.max_batch_size)
    return meta


def check_batchable(engine: str, inputs: list[dict] | None, max_batch_size: int) -> None:
    """BatchingUnsupported, naming the input, unless every input has one shared dynamic dim 0 whose
    range takes ``max_batch_size`` samples."""
    how = "build the engine with BuilderConfig(dynamic_batch=(1, N)) or a torch.export Dim on dim 0"
    if inputs is None:
        raise BatchingUnsupported(f"batching: engine file {engine!r} does not record its inputs "
                                  f"(rebuild it: {how})")
    dims = set()
    for spec in inputs:
        first = spec["shape"][0] if spec["shape"] else None
        if not isinstance(first, dict):
            fixed = "no dims" if first is None else f"dim 0 fixed at {first}"
            raise BatchingUnsupported(f"batching needs a dynamic batch dim 0 on every input: input "
                                      f"{spec['name']!r} of {engine!r} has {fixed} ({how})")
        dims.add(first["dim"])
        top = first.get("max")
        if top is not None and top < max_batch_size:
            raise BatchingUnsupported(f"batching.max_batch_size={max_batch_size} exceeds input "
                                      f"{spec['name']!r}: its dim 0 ({first['dim']}) takes "
                                      f"{first['min']}..{top}")
    if len(dims) > 1:
        raise BatchingUnsupported(f"batching needs one batch dim shared by every input; {engine!r} has "
                                  f"{sorted(dims)}")


def check_state_dir(path: str, options: Mapping[str, Any] | None = None) -> None:
    """``state_dir`` is a directory (or object-storage URL) this process can create and write, or
    a ValueError says why."""
    if is_url(path):
        fs, key = open_url(path, options)
        probe = f"{key.rstrip('/')}/.write-test.{os.getpid()}"
        try:
            fs.makedirs(key, exist_ok=True)
            fs.pipe_file(probe, b"")
            fs.rm_file(probe)
        except Exception as exc:  # noqa: BLE001  (the store's own error, named)
            raise ValueError(f"state_dir {path!r} cannot be used: {type(exc).__name__}: {exc} (it must be "
                             "object storage this process can write, with state_options giving the "
                             "endpoint and credentials where the environment does not)") from None
        return
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"state_dir {path!r} exists and is not a directory")
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".write-test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        why = describe_os_error(exc, "creating or writing")
        raise ValueError(f"state_dir {path!r} cannot be used: {why} "
                         "(it must be a directory this process can create and write: a local disk, or a "
                         "filesystem every node shares)") from None


class BaseVersion:
    """Writes the engine file's weights as version 0 of the checkpoint store (once per fleet),
    on a thread of its own: ``wait`` returns once it is there, or raises why it is not."""

    def __init__(self, cfg: FleetConfig) -> None:
        self._cfg = cfg
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._write, name="base-version", daemon=True)
        self._thread.start()

    def _write(self) -> None:
        try:
            store = checkpoint_store(self._cfg.state_dir, self._cfg.state_options, cleanup=False)
            if store.has(0):
                return
            weights = read_engine_weight_bytes(self._cfg.engine)  # byte for byte: no torch here
            sums = {name: bytes_checksum(t.data) for name, t in weights.items()}
            store.save_raw(0, weights, sums, fsync=self._cfg.persist_fsync)
        except BaseException as exc:  # noqa: BLE001  (raised by wait, in the launching thread)
            self._error = exc

    def wait(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error

    def wait_quietly(self) -> None:
        """Wait for the write to end, whatever its outcome (a failed launch cleans up after it)."""
        self._thread.join()


def _head_node_strategy() -> Any:
    """Prefer the head node for the coordinator (it outlives worker nodes; its log and store are
    there on a one-machine fleet); soft, so a restart goes elsewhere if the head is gone."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    head = next((n["NodeID"] for n in ray.nodes()
                 if n.get("Alive") and "node:__internal_head__" in n.get("Resources", {})), None)
    return NodeAffinitySchedulingStrategy(head, soft=True) if head else "DEFAULT"


def _named(name: str, namespace: str) -> Any:
    try:
        return ray.get_actor(name, namespace)
    except ValueError:
        return None


def _placement_group(name: str) -> Any:
    from ray.util import get_placement_group

    try:
        return get_placement_group(name)
    except ValueError:
        return None


class Launch:
    """One launch (or re-attach); see the module docstring."""

    def __init__(self, cfg: FleetConfig, address: str | None = None) -> None:
        self.cfg = cfg
        self.address = address
        self._actors: list[Any] = []  # created by this launch, newest last
        self._coordinator: Any = None  # the coordinator this launch created, if it did
        self._joined: list[str] = []  # replicas this launch had a running coordinator admit
        self._groups: list[Any] = []
        self._coordinator_was_running = False
        self.timings: dict[str, float] = {}  # seconds per step of ``run``, in order
        self._mark = time.perf_counter()

    def _lap(self, step: str) -> None:
        now = time.perf_counter()
        self.timings[step] = now - self._mark
        self._mark = now

    def run(self) -> Any:
        """Return the coordinator's handle once every replica serves."""
        cfg = self.cfg
        self._meta = check_engine(cfg)
        if cfg.probes is not None:
            load_probes(cfg.probes)  # a ValueError naming the file before anything starts
        check_state_dir(cfg.state_dir, cfg.state_options)
        base = BaseVersion(cfg)  # a new fleet's version 0, written while Ray starts
        self._lap("checks_s")
        try:
            ensure_ray(self.address or cfg.address, local_ray_init_kwargs(cfg))
        finally:
            self._lap("ray_s")
        running = _named(coordinator_actor_name(cfg.name), cfg.namespace)
        if running is not None:
            self._check_same_config(running)
        elif not is_url(cfg.state_dir):  # a URL state: fenced in object storage (actors.log_mirror)
            StateDirLock(cfg.state_dir).check_free()
        try:
            return self._start(running, base)
        except BaseException:
            base.wait_quietly()
            self.undo(running)
            raise

    def _check_same_config(self, running: Any) -> None:
        with readable_errors():
            current = ray.get(running.config.remote(), timeout=self.cfg.timeouts.request_s)
        differ = config_differences(current, self.cfg.model_dump(mode="json"))
        if differ:
            raise FleetConfigMismatch(
                f"fleet {self.cfg.name!r} is running with a different config: {'; '.join(differ)}. "
                "Nothing was changed: shut it down first (`weight-refit shutdown`), or change the "
                "number of replicas with `weight-refit scale`",
                [d.split(" ", 1)[0] for d in differ])
        self._coordinator_was_running = True

    def _start(self, running: Any, base: BaseVersion) -> Any:
        cfg = self.cfg
        plan = plan_placement(cfg)
        group_name = f"{cfg.name}.replicas"
        pg = _placement_group(group_name)
        if pg is None:
            pg = create_placement_group(plan, cfg.timeouts.launch_s, name=group_name)
            if pg is not None:
                self._groups.append(pg)
        cards = resolve_card_indexes(plan, pg)
        self._lap("placement_s")
        handles = self.create_replicas(plan, pg, cards)
        base.wait()  # the coordinator's store must find version 0 complete
        self._lap("base_version_s")
        coord = running
        if coord is None:
            coord = Coordinator.options(
                name=coordinator_actor_name(cfg.name), namespace=cfg.namespace, lifetime="detached",
                get_if_exists=True, num_cpus=0, resources=dict(cfg.coordinator_resources) or None,
                scheduling_strategy="DEFAULT" if cfg.coordinator_resources else _head_node_strategy(),
                runtime_env={"env_vars": dict(cfg.coordinator_env)} if cfg.coordinator_env else None,
            ).remote(coordinator_settings(cfg, self._meta.tied))
            self._actors.append(coord)
            self._coordinator = coord
        self.admit_replicas(handles, coord)
        return coord

    def start_replicas(self, plan: Any, pg: Any, cards: Mapping[str, int], coord: Any) -> None:
        """Create the plan's replicas (detached, named) that are not running, wait until each
        answers, and have the coordinator admit each one (it catches it up first)."""
        self.admit_replicas(self.create_replicas(plan, pg, cards), coord)

    def create_replicas(self, plan: Any, pg: Any, cards: Mapping[str, int]) -> dict[str, Any]:
        """Create the plan's replicas that are not running (detached, named); their handles."""
        cfg = self.cfg
        handles = {}
        actor_class = replica_actor_class(cfg)
        for rp in plan.replicas:
            name = replica_actor_name(cfg.name, rp.replica_id)
            existing = _named(name, cfg.namespace)
            if existing is not None:
                handles[rp.replica_id] = existing
                continue
            card = cards.get(rp.replica_id)
            handles[rp.replica_id] = actor_class.options(
                name=name, namespace=cfg.namespace, lifetime="detached",
                **actor_options(rp, placement_group=pg, card_index=card),
            ).remote(rp.replica_id, replica_settings(cfg, card))
            self._actors.append(handles[rp.replica_id])
        return handles

    def admit_replicas(self, handles: Mapping[str, Any], coord: Any) -> None:
        """Wait until each replica answers, then have the coordinator admit each one (it catches
        it up first)."""
        cfg = self.cfg
        deadline = time.monotonic() + cfg.timeouts.launch_s
        for rid, handle in handles.items():
            with readable_errors(RemoteError, where=f"replica {rid}"):  # "replica r1 could not start"
                ray.get(handle.ping.remote(), timeout=max(1.0, deadline - time.monotonic()))
        self._lap("replicas_start_s")
        for rid in handles:
            with readable_errors(RemoteError, where=f"admitting replica {rid}"):
                ray.get(coord.join.remote(rid), timeout=max(1.0, deadline - time.monotonic()))
            self._joined.append(rid)
        self._lap("replicas_join_s")

    def created_group(self, pg: Any) -> None:
        """Count a placement group made for this launch as its own (removed if it fails)."""
        self._groups.append(pg)

    def undo(self, running: Any) -> None:
        """Take back what this launch created (see the module docstring); ``running`` is the
        coordinator that ran before it, if any."""
        coord = running
        if coord is not None:
            for rid in self._joined:
                with contextlib.suppress(Exception):
                    ray.get(coord.leave.remote(rid, 0.0), timeout=self.cfg.timeouts.request_s)
        if running is None and self._coordinator is not None:  # let it release the state dir first
            with contextlib.suppress(Exception):
                ray.get(self._coordinator.shutdown.remote(), timeout=10)
        for handle in reversed(self._actors):
            with contextlib.suppress(Exception):
                ray.kill(handle, no_restart=True)
        from ray.util import remove_placement_group

        for pg in self._groups:
            with contextlib.suppress(Exception):
                remove_placement_group(pg)
        if self._actors or self._groups:
            logger.info("launch of %s failed: removed the %d actor(s) and %d placement group(s) "
                           "it had created", self.cfg.name, len(self._actors), len(self._groups))
