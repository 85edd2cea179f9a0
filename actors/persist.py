"""Writing a version to the checkpoint store, in a long-lived Ray actor beside the coordinator.

The coordinator never touches weight bytes: it hands this actor the same nested refs the replicas
get, and waits for it before logging COMMIT. Subset refits are materialised: the actor overlays the
changed tensors on the base version read back (verified) from the store. A rollback re-saves the
target version's set under the new version number.

The worker is an actor, not a task, so that the first refit after a launch or a coordinator restart
does not pay for starting a worker process and importing torch (measured 0.8-1.2 s here): the
coordinator creates it at start and pings it during recovery. The coordinator owns it, so it dies
with the coordinator and is created afresh by the next incarnation.
"""

from __future__ import annotations

import time
from typing import Any

import ray

from .failpoints import Failpoints
from .payload import from_wire
from .store import CheckpointStore


def persist(state_dir: str, version: int, refs: list[Any] | None, specs: dict[str, Any],
            checksums: dict[str, str], base_version: int | None, from_version: int | None,
            fsync: bool) -> dict[str, float]:
    """Save ``version`` as a full set; returns timings. Raises on any mismatch (a NO for COMMIT)."""
    t0 = time.perf_counter()
    store = CheckpointStore.in_state_dir(state_dir, cleanup=False)
    if from_version is not None:
        tensors = store.load(from_version)
        sums = store.manifest(from_version).checksums
    else:
        assert refs is not None
        arrays = ray.get(refs[0])
        tensors = from_wire(arrays, specs)
        sums = dict(checksums)
        if base_version is not None and set(tensors) != set(store.manifest(base_version).checksums):
            base = store.load(base_version)
            base_sums = store.manifest(base_version).checksums
            base.update(tensors)
            tensors = base
            sums = {**base_sums, **checksums}
    t1 = time.perf_counter()
    store.save(version, tensors, sums, fsync=fsync)
    return {"read_s": t1 - t0, "write_s": time.perf_counter() - t1}


@ray.remote(num_cpus=0, max_restarts=0, max_task_retries=0)
class PersistWorker:
    """Runs ``persist`` calls one at a time. Errors propagate to the caller (a NO for COMMIT)."""

    def __init__(self) -> None:
        self.fp = Failpoints(owner="persist")

    def arm_failpoint(self, name: str, action: str | None) -> None:
        """Arm a failpoint in this worker only (fault-injection tests)."""
        self.fp.arm(name, action)

    def ping(self) -> bool:
        return True

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def persist(self, state_dir: str, version: int, refs: list[Any] | None, specs: dict[str, Any],
                checksums: dict[str, str], base_version: int | None, from_version: int | None,
                fsync: bool) -> dict[str, float]:
        self.fp.hit("persist.before_save")
        return persist(state_dir, version, refs, specs, checksums, base_version, from_version, fsync)
