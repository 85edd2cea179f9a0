"""The router's load count against real Ray actors: a timed-out request stays counted until the
replica really finishes it (or dies), so a busy replica is not sent more than it can hold.

The replica here is a tiny actor whose ``infer`` blocks on a gate actor the test opens itself;
no test waits on the clock for anything to happen, it waits on the count with a bounded poll.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import ray

from cluster.errors import NoReplicaAvailable, Overloaded
from cluster.router import Router

POLL_LIMIT_S = 60.0  # a bound on waiting for Ray to deliver an event, not a timing assertion


@ray.remote(num_cpus=0)
class Gate:
    """A one-shot signal: ``wait`` returns once ``open`` was called."""

    def __init__(self) -> None:
        self._open = asyncio.Event()

    async def wait(self) -> None:
        await self._open.wait()

    async def open(self) -> None:
        self._open.set()


@ray.remote(num_cpus=0, max_concurrency=8)
class GatedReplica:
    """Answers like a fleet replica, but only once the gate is open."""

    def __init__(self, rid: str, gate: Any) -> None:
        self.rid = rid
        self.gate = gate
        self.started = 0
        self.finished = 0

    def infer(self, inputs: list[Any], min_version: int) -> dict[str, Any]:
        self.started += 1
        ray.get(self.gate.wait.remote())
        self.finished += 1
        return {"stale": False, "outputs": list(inputs), "version": 1, "replica": self.rid}

    def counts(self) -> tuple[int, int]:
        return self.started, self.finished


def _wait_until(condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition`` until it holds; fail (naming ``what``) if it does not within the bound."""
    give_up = time.monotonic() + POLL_LIMIT_S
    while not condition():
        if time.monotonic() > give_up:
            pytest.fail(f"{what} did not happen within {POLL_LIMIT_S:g}s")
        time.sleep(0.02)


@pytest.fixture
def gated(ray_session: None) -> Iterator[tuple[Any, Any]]:
    gate = Gate.remote()
    replica = GatedReplica.remote("r0", gate)
    ray.get(replica.counts.remote())  # started
    yield gate, replica
    ray.get(gate.open.remote())
    ray.kill(replica)
    ray.kill(gate)


def _router(replica: Any, *, max_queue: int = 4) -> Router:
    return Router(lambda: {"r0": replica}, max_queue=max_queue, request_timeout_s=30.0,
                  retries_on_stale=0)


def _time_out_once(router: Router, replica: Any) -> None:
    """One call that times out on r0 while r0 holds it (r0 is the only member: the call fails)."""
    with pytest.raises(NoReplicaAvailable, match="GetTimeoutError"):
        router.call([1], timeout_s=0.2)
    _wait_until(lambda: ray.get(replica.counts.remote())[0] == 1, "r0 starting the request")
    assert ray.get(replica.counts.remote()) == (1, 0)  # r0 is still working on it (gate shut)


def test_a_timed_out_request_stays_counted_until_the_replica_finishes_it(gated):
    gate, replica = gated
    router = _router(replica)
    assert router.outstanding() == {"r0": 0}
    _time_out_once(router, replica)
    assert router.outstanding()["r0"] == 1
    ray.get(gate.open.remote())
    _wait_until(lambda: ray.get(replica.counts.remote()) == (1, 1), "r0 finishing the request")
    _wait_until(lambda: router.outstanding()["r0"] == 0, "r0's count dropping back to 0")
    assert router.outstanding() == {"r0": 0}


def test_a_replica_still_busy_with_timed_out_requests_gets_no_more_than_max_queue(gated):
    gate, replica = gated
    router = _router(replica, max_queue=1)
    _time_out_once(router, replica)
    with pytest.raises(Overloaded, match="max_queue_per_replica=1"):
        router.call([2], timeout_s=0.2)
    assert ray.get(replica.counts.remote()) == (1, 0)  # nothing more was sent to r0
    ray.get(gate.open.remote())
    _wait_until(lambda: router.outstanding()["r0"] == 0, "r0's count dropping back to 0")
    resp = router.call([3])
    assert (resp.outputs, resp.version, resp.replica) == ([3], 1, "r0")
    assert router.outstanding() == {"r0": 0}


def test_a_timed_out_request_on_a_replica_that_is_then_killed_does_not_stay_counted(gated):
    _, replica = gated
    router = _router(replica)
    _time_out_once(router, replica)
    assert router.outstanding()["r0"] == 1
    ray.kill(replica, no_restart=True)
    _wait_until(lambda: router.outstanding()["r0"] == 0, "the dead r0's count dropping back to 0")
    assert router.outstanding() == {"r0": 0}


def test_an_answered_request_is_uncounted_at_once(gated):
    gate, replica = gated
    ray.get(gate.open.remote())
    router = _router(replica)
    resp = router.call([4])
    assert (resp.outputs, resp.replica) == ([4], "r0")
    assert router.outstanding() == {"r0": 0}


def test_a_replica_failing_in_a_row_is_avoided_longer_each_time_until_it_answers(gated):
    gate, replica = gated
    router = _router(replica)
    for failures in (1, 2, 3):
        with pytest.raises(NoReplicaAvailable, match="GetTimeoutError"):
            router.call([1], timeout_s=0.2)
        left = router._unhealthy_until["r0"] - time.monotonic()
        assert router._failures_in_a_row["r0"] == failures
        assert left > router.unhealthy_s * 2 ** (failures - 1) - 1.0  # 2 s, then 4 s, then 8 s
    ray.get(gate.open.remote())
    assert router.call([1], timeout_s=30).replica == "r0"  # all members unhealthy: tried anyway
    assert router._unhealthy_until == {} and router._failures_in_a_row == {}
