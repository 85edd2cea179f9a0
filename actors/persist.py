"""Writing a version to the checkpoint store, in a long-lived Ray actor beside the coordinator.

The coordinator never fetches weight bytes: it hands the ``PersistWorker`` the same buckets the
replicas get (under ``durability: disk`` it waits for the write before logging COMMIT). Subset
refits are materialised: the worker overlays the changed tensors on the base version read back
(verified) from the store. A rollback
re-saves the target version's set under the new version number.

The worker is an actor, not a task, so that the first refit after a launch or a coordinator restart
does not pay for starting a worker process: the coordinator starts it, and has it import what a
write needs, once the fleet serves (``Persister.warm``: at the first replica's join, or at the
end of a restarted coordinator's recovery), not while the replicas start on the same cores; any
other first use starts it too. It never imports torch: it writes the bytes as they lie in the
buckets (``payload.raw_from_wire``) or in the stored version (``CheckpointStore.load_raw``), so
the refits just after a launch do not share the cores with its import.
The coordinator owns it, so it dies with the coordinator and is created afresh by the next
incarnation.

``Persister`` supervises the worker (contract):
- ``ensure()`` replaces a worker that died between refits (OOM, node loss) before it is needed
  (the checkpoint writes of ``durability: replicated`` do without: ``wait`` replaces it).
- ``wait(pending, deadline)`` returns the write's timings and "" once the version is stored, or {}
  and a one-line reason. A worker that died mid-write is replaced and the write retried once within
  the same deadline. A failed write (a bad payload, a full disk) is not retried; a timed-out
  worker is replaced so that a hung one cannot hold up the next refit.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from engines.threads import lower_priority

from .durable import describe_os_error
from .failpoints import Failpoints
from .object_state import checkpoint_store

logger = logging.getLogger("weight_refit.coordinator")

__all__ = ["PersistJob", "PersistWorker", "Persister", "persist"]


@dataclass(frozen=True)
class PersistJob:
    """One version to write: from the published refs, or (a rollback) from ``from_version``."""

    state_dir: str
    version: int
    refs: list[Any] | None
    specs: dict[str, Any]
    checksums: dict[str, str]
    base_version: int | None
    from_version: int | None
    fsync: bool
    state_options: dict[str, Any] = field(default_factory=dict)
    hashed_on: str | None = None  # the node whose object-store copy of ``refs`` the checksums are of


def _this_node() -> str | None:
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def persist(job: PersistJob, fp: Failpoints | None = None) -> dict[str, float]:
    """Save ``job.version`` as a full set; returns timings. Raises on any mismatch or I/O error.
    Every tensor is hashed against its checksum before it is written, unless the checksums were
    taken of the very copy this worker read: ``job.hashed_on`` names this node (I4 verifies each
    object-store copy once; a base version read back from the store was verified by the read).
    Torch-free: the bytes go from the buckets (or the stored version) to the file as they lie."""
    from .payload import fetch, raw_from_wire

    t0 = time.perf_counter()
    store = checkpoint_store(job.state_dir, job.state_options, cleanup=False, fp=fp)
    verify = job.refs is None or job.hashed_on is None or job.hashed_on != _this_node()
    if job.from_version is not None:
        tensors = store.load_raw(job.from_version)
        sums = store.manifest(job.from_version).checksums
    else:
        assert job.refs is not None
        tensors = raw_from_wire(fetch(job.refs, None), job.specs)
        sums = dict(job.checksums)
        if job.base_version is not None and set(tensors) != set(store.manifest(job.base_version).checksums):
            base = store.load_raw(job.base_version)
            base_sums = store.manifest(job.base_version).checksums
            base.update(tensors)
            tensors = base
            sums = {**base_sums, **job.checksums}
    t1 = time.perf_counter()
    store.save_raw(job.version, tensors, sums, fsync=job.fsync, verify=verify)
    return {"read_s": t1 - t0, "write_s": time.perf_counter() - t1, "verified": float(verify)}


@ray.remote(num_cpus=0, max_restarts=0, max_task_retries=0)
class PersistWorker:
    """Runs ``persist`` calls one at a time. Errors propagate to the caller (a NO for COMMIT)."""

    def __init__(self, failpoints: dict[str, str] | None = None) -> None:
        self.fp = Failpoints(failpoints, owner="persist")
        lower_priority(os.getpid())  # background writes: serving threads on these cores go first

    def arm_failpoint(self, name: str, action: str | None) -> None:
        """Arm a failpoint in this worker only (fault-injection tests)."""
        self.fp.arm(name, action)

    def ping(self) -> bool:
        return True

    def warm(self) -> None:
        """Import what a write needs now, so that the first write does not wait for it (no torch:
        ``persist`` writes the bytes as they lie)."""
        from . import payload  # noqa: F401

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def persist(self, job: PersistJob) -> dict[str, float]:
        self.fp.hit("persist.before_save")
        return persist(job, self.fp)


def _reason(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc
    if isinstance(cause, OSError) and not isinstance(cause, TimeoutError):
        return describe_os_error(cause, "writing the checkpoint")
    text = str(cause).splitlines()[0] if str(cause) else ""
    return f"{type(cause).__name__}: {text}"


@dataclass
class PendingPersist:
    job: PersistJob
    ref: Any


class Persister:
    """Supervises one ``PersistWorker`` (see the module docstring for the contract)."""

    def __init__(self, ready_s: float, failpoints: dict[str, str] | None = None) -> None:
        self._ready_s = ready_s
        self._failpoints = dict(failpoints or {})
        self._warmed = False
        self._worker: Any = None  # started on first use (not while the replicas start)

    @property
    def worker(self) -> Any:
        if self._worker is None:
            self._worker = self._new_worker()
        return self._worker

    def _new_worker(self) -> Any:
        here = ray.get_runtime_context().get_node_id()
        return PersistWorker.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=True)).remote(self._failpoints)

    def ready(self) -> None:
        """Wait until the worker runs, so the first refit does not start it."""
        try:
            ray.get(self.worker.ping.remote(), timeout=self._ready_s)
        except Exception as exc:  # noqa: BLE001  (the next persist reports it as the abort reason)
            logger.warning("persistence worker not ready: %s", _reason(exc))

    def warm(self) -> None:
        """Have the worker import what a write needs, without waiting (once the fleet serves:
        not while the replicas start on the same cores)."""
        if not self._warmed:
            self._warmed = True
            self.worker.warm.remote()

    def ensure(self) -> None:
        try:
            ray.get(self.worker.ping.remote(), timeout=5.0)
        except Exception as exc:  # noqa: BLE001
            logger.warning("persistence worker lost (%s): starting a new one", _reason(exc))
            self.replace()
            self.ready()

    def start(self, job: PersistJob) -> PendingPersist:
        return PendingPersist(job, self.worker.persist.remote(job))

    def done(self, pending: PendingPersist) -> bool:
        """Whether the write has ended (successfully or not), without waiting."""
        ready, _ = ray.wait([pending.ref], timeout=0)
        return bool(ready)

    def wait(self, pending: PendingPersist, deadline: float) -> tuple[dict[str, float], str]:
        version = pending.job.version
        ref = pending.ref
        for attempt in (1, 2):
            try:
                return ray.get(ref, timeout=max(0.0, deadline - time.monotonic())), ""
            except RayActorError as exc:
                self.replace()
                if attempt == 2 or time.monotonic() >= deadline:
                    return {}, f"persisting version {version} failed: {_reason(exc)}"
                logger.warning("persistence worker lost during v%s (%s): retrying on a new one",
                               version, _reason(exc))
                self.ready()
                ref = self.worker.persist.remote(pending.job)
            except RayTaskError as exc:  # the write failed; the worker itself is fine
                return {}, f"persisting version {version} failed: {_reason(exc)}"
            except GetTimeoutError:
                self.replace()
                return {}, f"persisting version {version} timed out (timeouts.persist_s)"
            except Exception as exc:  # noqa: BLE001
                self.replace()
                return {}, f"persisting version {version} failed: {_reason(exc)}"
        raise AssertionError("unreachable")

    def replace(self) -> None:
        if self._worker is not None:
            try:
                ray.kill(self._worker, no_restart=True)
            except Exception:  # noqa: BLE001
                logger.exception("killing the persistence worker failed")
        self._worker = self._new_worker()
        self._warmed = False

    def stop(self) -> None:
        if self._worker is None:
            return
        try:
            ray.kill(self._worker, no_restart=True)
        except Exception:  # noqa: BLE001  (already gone)
            logger.debug("persistence worker already gone", exc_info=True)
