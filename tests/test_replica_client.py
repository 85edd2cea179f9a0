"""``RayReplicaClient`` against real actors: failures come back typed, and a call that timed out
is cancelled instead of running later on the replica's control threads."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import ray
from ray.exceptions import RayActorError

from actors.replica_client import RayReplicaClient, replica_actor_name
from actors.replies import Ack, Failed, FailureKind

FLEET, NAMESPACE = "clienttest", "weight-refit-client-test"


@ray.remote(num_cpus=0)
class Gate:
    def __init__(self) -> None:
        self._open = asyncio.Event()

    async def wait(self) -> None:
        await self._open.wait()

    async def open(self) -> None:
        self._open.set()


@ray.remote(num_cpus=0, concurrency_groups={"control": 1, "inspect": 1})
class OneThreadReplica:
    """A replica with a single control thread: a second control call queues behind the first."""

    def __init__(self, rid: str, gate: Any) -> None:
        self.rid = rid
        self.gate = gate
        self.status_runs = 0

    @ray.method(concurrency_group="control")
    def sync_to(self, version: int, plan: Any = None) -> Ack:
        ray.get(self.gate.wait.remote())
        return Ack(self.rid, None, version, "serving")

    @ray.method(concurrency_group="control")
    def status(self) -> dict[str, Any]:
        self.status_runs += 1
        return {"id": self.rid, "version": 0}

    @ray.method(concurrency_group="control")
    def commit(self, epoch: int, txn: str, activate: bool = False) -> Ack:
        raise RuntimeError(f"no staged set for {txn}")

    @ray.method(concurrency_group="inspect")
    def runs(self) -> int:
        return self.status_runs


@pytest.fixture
def replica(ray_session: None) -> Any:
    gate = Gate.remote()
    named = OneThreadReplica.options(name=replica_actor_name(FLEET, "r0"), namespace=NAMESPACE)
    actor = named.remote("r0", gate)
    ray.get(actor.runs.remote())
    yield actor, gate
    ray.kill(actor)


def test_a_timed_out_call_is_cancelled_and_never_runs_on_the_replica(replica: Any) -> None:
    """Loose end 9: timed-out calls were not cancelled, so they piled onto the control threads."""
    actor, gate = replica
    client = RayReplicaClient(FLEET, NAMESPACE)
    assert client.attach("r0") and not client.attach("r9")
    busy = actor.sync_to.remote(5)  # holds the only control thread until the gate opens
    out = client.status(["r0"], timeout=0.5)["r0"]
    assert isinstance(out, Failed) and out.kind is FailureKind.TIMEOUT and "status" in out.reason
    ray.get(gate.open.remote())
    assert ray.get(busy).version == 5
    assert client.catch_up(["r0"], 6, timeout=30)["r0"].version == 6  # the thread is free again
    assert ray.get(actor.runs.remote()) == 0  # the cancelled status call never ran


def test_an_exception_in_the_replica_comes_back_as_its_own_error(replica: Any) -> None:
    client = RayReplicaClient(FLEET, NAMESPACE)
    client.attach("r0")
    out = client.commit(["r0"], 30, 1, "t1")["r0"]
    assert isinstance(out, Failed) and out.kind is FailureKind.ERROR
    assert out.reason == "RuntimeError: no staged set for t1"


def test_a_dead_or_unknown_replica_is_a_failure_not_an_exception(replica: Any) -> None:
    actor, _ = replica
    client = RayReplicaClient(FLEET, NAMESPACE)
    client.attach("r0")
    ray.kill(actor)  # asynchronous: a call sent at once may still run before it lands
    deadline = time.monotonic() + 30
    with pytest.raises(RayActorError):  # the kill has taken effect
        while time.monotonic() < deadline:
            ray.get(actor.runs.remote(), timeout=30)
    out = client.status(["r0", "nobody"], timeout=30)
    assert isinstance(out["r0"], Failed) and out["r0"].kind in (FailureKind.DEAD, FailureKind.UNAVAILABLE)
    assert isinstance(out["nobody"], Failed) and out["nobody"].kind is FailureKind.UNKNOWN
