"""The fault matrix (I2-I5): real actors killed or hung at each protocol step, under client load.

Each case ends with every member on the same active version with equal checksums, and no client
request failed (a live member could always serve it).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from fleet_models import (
    ClientLoad,
    converged,
    fleet_config,
    probe_input,
    probe_value,
    probe_weights,
    serving_again,
    wait_for,
)

from cluster import Fleet, RefitAborted
from engines.checksum import tensor_checksum

TIMEOUTS = {"prepare_s": 4, "commit_s": 4, "activate_s": 4, "request_s": 15, "lease_s": 2,
            "launch_s": 60}


@pytest.fixture
def make_fleet(ray_session: None, probe_engine_path: Path, tmp_path: Path):
    fleets: list[Fleet] = []

    def make(**over):
        cfg = fleet_config(probe_engine_path, tmp_path, replicas=3, timeouts=TIMEOUTS, **over)
        fleets.append(Fleet.launch(cfg))
        fleets[-1].refit(probe_weights(1.0))
        return fleets[-1]

    yield make
    for f in fleets:
        f.shutdown()


def _handles(fleet: Fleet) -> dict:
    return ray.get(fleet._coord.member_handles.remote())


def _arm(fleet: Fleet, rid: str, name: str, action: str | None) -> None:
    ray.get(_handles(fleet)[rid].arm_failpoint.remote(name, action))


def _values(fleet: Fleet, n: int = 6) -> set:
    return {probe_value(fleet.infer(probe_input()).outputs) for _ in range(n)}


def _back(fleet: Fleet, rid: str) -> None:
    serving_again(_handles(fleet)[rid], rid)


# ----------------------------------------------------------------- replica killed at each step


def test_replica_killed_before_its_vote_aborts(make_fleet) -> None:
    fleet = make_fleet()
    before = fleet.status()["version"]
    with ClientLoad(fleet) as load:
        _arm(fleet, "r1", "replica.before_vote", "exit")
        with pytest.raises(RefitAborted) as info:
            fleet.refit(probe_weights(2.0))
        assert info.value.votes["r1"].startswith("NO")
        _back(fleet, "r1")
        st = converged(fleet)
        assert st["version"] == before and _values(fleet) == {1.0}
        res = fleet.refit(probe_weights(3.0))  # r1's old control connection is closed: through Ray
        assert converged(fleet)["version"] == res.version and _values(fleet) == {3.0}
        calls = ray.get(_handles(fleet)["r1"].status.remote())["control_calls"]
        res = fleet.refit(probe_weights(4.0))  # and its new one is open
        assert converged(fleet)["version"] == res.version and _values(fleet) == {4.0}
        assert ray.get(_handles(fleet)["r1"].status.remote())["control_calls"] == calls + 2
    load.check()


@pytest.mark.parametrize("failpoint", ["replica.before_commit", "replica.before_activate",
                                       "replica.during_activate"])
def test_replica_killed_after_yes_vote_catches_up_from_the_store(make_fleet, failpoint: str) -> None:
    """Killed after voting YES, after COMMIT before ACTIVATE, or during ACTIVATE: the decision
    stands (COMMIT is logged); the restarted replica loads the version from the store."""
    fleet = make_fleet()
    with ClientLoad(fleet) as load:
        _arm(fleet, "r2", failpoint, "exit")
        res = fleet.refit(probe_weights(5.0))
        st = converged(fleet)
        assert st["version"] == res.version and _values(fleet) == {5.0}
    load.check()


# ----------------------------------------------------------------- hung replicas


def test_replica_hung_in_prepare_times_out_as_no_then_recovers(make_fleet) -> None:
    fleet = make_fleet()
    before = fleet.status()["version"]
    with ClientLoad(fleet) as load:
        _arm(fleet, "r0", "replica.before_vote", "sleep:6")
        t0 = time.monotonic()
        with pytest.raises(RefitAborted) as info:
            fleet.refit(probe_weights(7.0))
        assert time.monotonic() - t0 < TIMEOUTS["prepare_s"] + 10  # a NO, not a hung refit
        assert "r0" in info.value.reason
        _arm(fleet, "r0", "replica.before_vote", None)
        # when it wakes, its late vote finds the txn aborted and frees the staged set
        wait_for(lambda: ray.get(_handles(fleet)["r0"].status.remote(), timeout=2)["staged_bytes"] == 0
                 and ray.get(_handles(fleet)["r0"].status.remote(), timeout=2)["pending"] == [],
                 what="r0 to drop its late staged set")
        assert converged(fleet)["version"] == before
        res = fleet.refit(probe_weights(8.0))
        assert converged(fleet)["version"] == res.version and _values(fleet) == {8.0}
    load.check()


@pytest.mark.parametrize("failpoint", ["replica.before_vote", "replica.after_vote"])
def test_hung_replica_is_excluded_and_readmitted(make_fleet, failpoint: str) -> None:
    """Commit policy exclude: a replica hung before or after voting is excluded, the coordinator
    waits out its lease before refit returns, so it cannot serve the old version afterwards; once
    it wakes it catches up and is re-admitted."""
    fleet = make_fleet(commit_policy="exclude", max_exclude=1)
    old = fleet.status()["version"]
    r1 = _handles(fleet)["r1"]
    with ClientLoad(fleet) as load:
        ray.get(r1.arm_failpoint.remote(failpoint, "sleep:8"))
        res = fleet.refit(probe_weights(9.0))
        assert res.excluded == ["r1"]
        late = ray.get(r1.infer.remote([probe_input()], 0), timeout=10)
        # never the old version: excluded, or (the repair loop is quick) re-admitted at the new one
        assert (late["stale"] and late["reason"] == "excluded") or late["version"] == res.version, late
        assert all(v == 9.0 for v in _values(fleet))
        ray.get(r1.arm_failpoint.remote(failpoint, None))
        wait_for(lambda: "r1" in ray.get(fleet._coord.member_handles.remote()), 60, "r1 re-admitted")
        st = converged(fleet)
        assert st["version"] == res.version > old
    load.check()


# ----------------------------------------------------------------- coordinator killed


def test_coordinator_killed_after_begin_presumes_abort(make_fleet) -> None:
    fleet = make_fleet()
    before = fleet.status()
    with ClientLoad(fleet) as load:
        ray.get(fleet._coord.arm_failpoint.remote("coordinator.after_begin", "exit"))
        with pytest.raises(RefitAborted, match="presumed abort"):
            fleet.refit(probe_weights(11.0), key="k-begin")
        out = fleet.outcome("k-begin")
        assert out["status"] == "aborted"
        st = converged(fleet)
        assert st["version"] == before["version"] and st["epoch"] == before["epoch"] + 1
        assert _values(fleet) == {1.0}
        res = fleet.refit(probe_weights(12.0))
        assert res.version > out["version"] and converged(fleet)["version"] == res.version
    load.check()


@pytest.mark.parametrize("durability", ["replicated", "disk"])
@pytest.mark.parametrize("failpoint", ["coordinator.after_decision_logged", "coordinator.mid_activate"])
def test_coordinator_killed_after_commit_finishes_it(make_fleet, failpoint: str, durability: str) -> None:
    """COMMIT logged: the restarted coordinator finishes COMMIT and ACTIVATE (and, under
    replicated durability, writes the checkpoint from a replica if it was not written); the
    cut-off caller gets the committed result (and fleet.outcome says so)."""
    fleet = make_fleet(durability=durability)
    with ClientLoad(fleet) as load:
        ray.get(fleet._coord.arm_failpoint.remote(failpoint, "exit"))
        res = fleet.refit(probe_weights(13.0), key=f"k-{failpoint}")
        out = fleet.outcome(f"k-{failpoint}")
        assert out["status"] == "committed" and out["version"] == res.version and out["activated"]
        st = converged(fleet)
        assert st["version"] == res.version and _values(fleet) == {13.0}
        assert fleet.wait_persisted(res.version, 60)
    load.check()


# ----------------------------------------------------------------- duplicates and stale epochs


def test_duplicate_commit_abort_activate_are_idempotent(make_fleet) -> None:
    fleet = make_fleet()
    st = fleet.status()
    epoch, version = st["epoch"], st["last_version"] + 10
    r0 = _handles(fleet)["r0"]
    ref = ray.put({f"w.{i}": np.full(256, 15.0, np.float32) for i in range(4)})
    sums = {f"w.{i}": tensor_checksum(torch.full((256,), 15.0)) for i in range(4)}
    specs = {f"w.{i}": {"shape": [256], "dtype": "float32"} for i in range(4)}
    assert ray.get(r0.prepare.remote(epoch, "dup", version, [ref], specs, sums)).yes
    first = ray.get(r0.commit.remote(epoch, "dup"))
    assert ray.get(r0.commit.remote(epoch, "dup")) == first
    a1 = ray.get(r0.activate.remote(epoch, "dup"))
    a2 = ray.get(r0.activate.remote(epoch, "dup"))
    assert a1.version == a2.version == version
    ray.get(r0.abort.remote(epoch, "other", "x"))
    ray.get(r0.abort.remote(epoch, "other", "x"))
    assert ray.get(r0.status.remote())["staged_bytes"] == 0
    assert fleet.wait_persisted(st["version"], 60)  # the store must hold what they catch up to
    for h in _handles(fleet).values():  # put the fleet back on one version
        ray.get(h.sync_to.remote(st["version"]))
    converged(fleet)


def test_stale_epoch_message_after_coordinator_restart_is_refused(make_fleet) -> None:
    fleet = make_fleet()
    old_epoch = fleet.status()["epoch"]
    ray.kill(fleet._coord, no_restart=False)
    wait_for(lambda: fleet.status()["epoch"] == old_epoch + 1, what="coordinator restart")
    fleet.refit(probe_weights(17.0))  # replicas learn the new epoch
    r0 = _handles(fleet)["r0"]
    ref = ray.put({"w.0": np.zeros(256, np.float32)})
    vote = ray.get(r0.prepare.remote(old_epoch, "zombie", 10_000, [ref],
                                     {"w.0": {"shape": [256], "dtype": "float32"}}, {"w.0": "0"}))
    assert not vote.yes and "StaleEpoch" in vote.reason
    assert ray.get(r0.status.remote())["staged_bytes"] == 0
    assert converged(fleet) and _values(fleet) == {17.0}


def test_replica_never_goes_back_when_its_lease_lapses_mid_activate(make_fleet) -> None:
    """Found by the soak: a lapsed lease reconfirmed while a restarted coordinator was finishing
    ACTIVATE used to sync the replica back to the log's (lagging) active version."""
    import threading

    fleet = make_fleet(failpoints={"coordinator.mid_activate": "sleep:6"})
    r0 = _handles(fleet)["r0"]
    served: list[tuple[float, int]] = []
    stop = threading.Event()

    def direct() -> None:  # as from a handle that has not seen the new version yet
        while not stop.is_set():
            r = ray.get(r0.infer.remote([probe_input()], 0), timeout=30)
            if not r["stale"]:
                served.append((time.monotonic(), r["version"]))

    th = threading.Thread(target=direct, daemon=True)
    th.start()
    try:
        ray.get(fleet._coord.arm_failpoint.remote("coordinator.after_decision_logged", "exit"))
        res = fleet.refit(probe_weights(2.0), key="k-lapse")
        returned = time.monotonic()
        wait_for(lambda: sum(t > returned for t, _ in served) >= 20, 60, "requests after the refit")
    finally:
        stop.set()
        th.join(timeout=60)
    versions = [v for _, v in served]
    assert versions == sorted(versions), "r0 went back to an older version"
    assert all(v >= res.version for t, v in served if t > returned)
    assert converged(fleet)["version"] == res.version
