"""``RayReplicaClient`` against real actors: failures come back typed, and a call that timed out
is cancelled instead of running later on the replica's control threads."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import ray
from fleet_models import wait_for
from ray.exceptions import RayActorError

from actors.control_channel import ControlServer
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


# ----------------------------------------------------------------- the control channel


@ray.remote(num_cpus=0, concurrency_groups={"control": 4})
class ChannelReplica:
    """A replica whose COMMIT is served over the control channel and through Ray alike; it counts
    each path's calls and can be slowed, or have its channel closed (as a restart leaves it)."""

    def __init__(self, rid: str) -> None:
        self.rid = rid
        self.delay = 0.0
        self.via_ray = 0
        self.server = ControlServer({"commit": self._commit}, "127.0.0.1")

    def _commit(self, epoch: int, txn: str, activate: bool = False) -> Ack:
        time.sleep(self.delay)
        return Ack(self.rid, txn, epoch, "serving")

    @ray.method(concurrency_group="control")
    def open_control(self, key: bytes) -> tuple[str, int]:
        return self.server.open(key)

    @ray.method(concurrency_group="control")
    def commit(self, epoch: int, txn: str, activate: bool = False) -> Ack:
        self.via_ray += 1
        return self._commit(epoch, txn, activate)

    def slow(self, delay: float) -> None:
        self.delay = delay

    def close_control(self) -> None:
        self.server.close()

    def calls(self) -> tuple[int, int]:
        return self.server.calls, self.via_ray


def test_a_replica_the_channel_cannot_reach_gets_the_call_through_ray_at_once(ray_session: None) -> None:
    """The call to a replica whose channel is closed goes through Ray at once, not once another
    replica's slow answer over the channel is in (the soak caught that: both timed out)."""
    actors = {rid: ChannelReplica.options(name=replica_actor_name(FLEET, rid), namespace=NAMESPACE)
              .remote(rid) for rid in ("c0", "c1")}
    try:
        client = RayReplicaClient(FLEET, NAMESPACE)
        assert all(client.attach(rid) for rid in actors)
        assert channel_open(client, list(actors))
        assert all(isinstance(a, Ack) for a in client.commit(list(actors), 30, 1, "t1").values())
        assert ray.get([a.calls.remote() for a in actors.values()]) == [(1, 0), (1, 0)]
        ray.get([actors["c0"].slow.remote(3.0), actors["c1"].close_control.remote()])
        out = client.commit(list(actors), 1.5, 1, "t2")
        assert out["c0"].kind is FailureKind.TIMEOUT
        assert out["c1"] == Ack("c1", "t2", 1, "serving")  # through Ray, within the same deadline
        assert ray.get(actors["c1"].calls.remote()) == (1, 1)
        ray.get(actors["c0"].slow.remote(0.0))
        assert channel_open(client, ["c1"])  # asked through Ray to open a new one
        assert client.commit(["c1"], 30, 1, "t3")["c1"] == Ack("c1", "t3", 1, "serving")
        assert ray.get(actors["c1"].calls.remote()) == (2, 1)
    finally:
        for actor in actors.values():
            ray.kill(actor)


def channel_open(client: RayReplicaClient, rids: list[str]) -> bool:
    """Wait until the client holds an address of each replica's channel."""
    return bool(wait_for(lambda: client._on_channel(rids) == rids, 30, "the channels open"))
