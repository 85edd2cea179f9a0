"""The two durability modes against real actors: ``replicated`` (COMMIT once every member holds the
set, the checkpoint follows, PERSISTED logged) and ``disk`` (COMMIT waits for the checkpoint), and
what a restart does with a committed version whose checkpoint was never written."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from fleet_models import (
    ClientLoad,
    build_probe_engine,
    converged,
    fleet_config,
    probe_input,
    probe_value,
    probe_weights,
    wait_for,
)

from cluster import Fleet, RefitAborted

TIMEOUTS = {"prepare_s": 4, "commit_s": 4, "activate_s": 4, "request_s": 15, "lease_s": 2,
            "launch_s": 60, "persist_s": 5}


@pytest.fixture
def make_fleet(ray_session: None, probe_engine_path: Path, tmp_path: Path) -> Iterator[Any]:
    fleets: list[Fleet] = []

    def make(**over: Any) -> Fleet:
        fleets.append(Fleet.launch(fleet_config(probe_engine_path, tmp_path, replicas=2, timeouts=TIMEOUTS,
                                                **over)))
        return fleets[-1]

    yield make
    for f in fleets:
        with contextlib.suppress(Exception):  # a test may have killed it
            f.shutdown()


def _hang_the_checkpoint_writer(fleet: Fleet) -> None:
    worker = ray.get(fleet._coord.persist_worker.remote())
    ray.get(worker.arm_failpoint.remote("persist.before_save", "hang"))


def _stored(fleet: Fleet) -> set[int]:
    return set(ray.get(fleet._coord.versions.remote())["stored"])


def _values(fleet: Fleet, x: Any = None) -> set[float | None]:
    x = probe_input() if x is None else x
    return {probe_value(fleet.infer(x).outputs) for _ in range(6)}


def _row(fleet: Fleet, version: int) -> dict[str, Any]:
    return next(h for h in fleet.history() if h["version"] == version)


def test_a_replicated_refit_commits_without_waiting_for_its_checkpoint_which_follows(make_fleet: Any) -> None:
    fleet = make_fleet()
    _hang_the_checkpoint_writer(fleet)
    res = fleet.refit(probe_weights(2.0))  # the write hangs: in disk mode this would abort
    assert not res.persisted and _values(fleet) == {2.0}
    assert res.version not in _stored(fleet) and _row(fleet, res.version)["persisted"] is False
    # the hung write times out (persist_s); the tracker writes the set from a replica that holds it
    assert fleet.wait_persisted(res.version, 120)
    assert res.version in _stored(fleet) and _row(fleet, res.version)["persisted"] is True
    assert fleet.status()["persistence"]["unpersisted"] == []


def test_refits_faster_than_their_checkpoints_keep_at_most_two_versions_behind_and_lose_none(
        ray_session: None, tmp_path: Path) -> None:
    wide = 64 << 10  # 4 weights of 256 KiB: put into the object store, not carried inside the calls
    engine = tmp_path / "wide.engine"
    build_probe_engine(engine, width=wide)
    fleet = Fleet.launch(fleet_config(engine, tmp_path, replicas=2, timeouts=TIMEOUTS,
                                      failpoints={"persist.before_save": "sleep:0.5"}))  # a slow disk
    try:
        behind, waited, versions = [], [], []
        for value in (1.0, 2.0, 3.0, 4.0, 5.0):
            res = fleet.refit(probe_weights(value, width=wide))
            versions.append(res.version)
            waited.append(res.timings["checkpoint_wait_s"])
            behind.append(fleet.status()["persistence"]["unpersisted"])
        # each refit waited for the write of the version two before it: never more than two behind
        assert all(len(b) <= 2 for b in behind), behind
        assert waited[:2] == [0.0, 0.0] and all(w > 0 for w in waited[2:]), waited
        assert fleet.wait_persisted(versions[-1], 30)
        persistence = fleet.status()["persistence"]
        assert persistence["unpersisted"] == [] and persistence["given_up"] == {}
        assert all(_row(fleet, v)["persisted"] for v in versions)
        # refits spaced so that each starts once the one before is written: each answer says which
        # versions are still being written, so no refit waits or asks the coordinator
        for value in (5.25, 5.5, 5.75):
            wait_for(lambda: fleet.status()["persistence"]["unpersisted"] == [], what="checkpoints")
            assert fleet.refit(probe_weights(value, width=wide)).timings["checkpoint_wait_s"] == 0.0
        # a coordinator restarted between refits: the next refit's wait goes to its successor
        fleet.refit(probe_weights(6.0, width=wide))
        epoch = fleet.status()["epoch"]
        ray.kill(fleet._coord, no_restart=False)
        wait_for(lambda: fleet.status()["epoch"] == epoch + 1, what="coordinator restart")
        res = fleet.refit(probe_weights(7.0, width=wide))
        assert _values(fleet, probe_input(wide)) == {7.0} and fleet.wait_persisted(res.version, 30)
    finally:
        fleet.shutdown()


def test_a_replica_added_before_the_checkpoint_is_written_waits_for_it_and_serves_the_active_version(
        make_fleet: Any) -> None:
    fleet = make_fleet()
    _hang_the_checkpoint_writer(fleet)
    res = fleet.refit(probe_weights(2.0))
    assert not res.persisted and res.version not in _stored(fleet)
    out = fleet.scale(3)  # the newcomer catches up from the store: it waits for the write, redone
    assert out["added"] == ["r2"]
    assert converged(fleet)["version"] == res.version
    handle = ray.get(fleet._coord.member_handles.remote())["r2"]
    reply = ray.get(handle.infer.remote([probe_input()], 0))
    assert reply["version"] == res.version and probe_value(reply["outputs"]) == 2.0


def test_a_disk_durability_refit_waits_for_its_checkpoint(make_fleet: Any) -> None:
    fleet = make_fleet(durability="disk")
    before = fleet.status()["version"]
    _hang_the_checkpoint_writer(fleet)
    with pytest.raises(RefitAborted, match="timed out"):
        fleet.refit(probe_weights(2.0))
    assert converged(fleet)["version"] == before and _values(fleet) == {0.0}
    res = fleet.refit(probe_weights(3.0))  # a fresh writer
    assert res.persisted and res.version in _stored(fleet)


def test_a_coordinator_lost_after_commit_before_persisted_is_succeeded_by_one_that_writes_it(
        make_fleet: Any) -> None:
    fleet = make_fleet()
    with ClientLoad(fleet) as load:
        _hang_the_checkpoint_writer(fleet)
        res = fleet.refit(probe_weights(4.0), key="k-unpersisted")
        assert not res.persisted
        ray.kill(fleet._coord, no_restart=False)  # its checkpoint writer goes with it
        wait_for(lambda: res.version in _stored(fleet), 120, "the restarted coordinator to write the version")
        row = _row(fleet, res.version)
        assert row["status"] == "committed" and row["persisted"] is True and row["lost"] is None
        assert converged(fleet)["version"] == res.version and _values(fleet) == {4.0}
    load.check()


def test_every_holder_and_the_coordinator_lost_before_persisted_give_a_new_version_of_stored_weights(
        make_fleet: Any) -> None:
    fleet = make_fleet()
    kept = fleet.refit(probe_weights(1.0))
    assert fleet.wait_persisted(kept.version, 60)
    handle = Fleet.connect(fleet.name, fleet.namespace)
    _hang_the_checkpoint_writer(fleet)
    lost = fleet.refit(probe_weights(2.0))
    assert not lost.persisted and probe_value(handle.infer(probe_input()).outputs) == 2.0
    for replica in ray.get(fleet._coord.member_handles.remote()).values():
        ray.kill(replica, no_restart=False)  # they restart without it: it is in no store
    ray.kill(fleet._coord, no_restart=False)

    def moved_on() -> dict[str, Any] | None:
        st = fleet.status()
        return st if st["version"] > lost.version and st["recovery"]["state"] == "ready" else None

    st = wait_for(moved_on, 180, "the fleet to move to a replacement version")
    row = _row(fleet, lost.version)
    assert row["lost"] and f"replaced by v{st['version']}" in row["lost"]
    replacement = _row(fleet, st["version"])
    assert replacement["origin_version"] == kept.version and replacement["persisted"] is True
    wait_for(lambda: converged(fleet)["version"] == st["version"], 120, "every member on the replacement")
    assert _values(fleet) == {1.0}  # the newest persisted weights, under a newer version
    r = handle.infer(probe_input())  # a handle that saw the lost version does not go back
    assert r.version == st["version"] > lost.version and probe_value(r.outputs) == 1.0


# ----------------------------------------------------------------------------- a bounded log


def test_a_fleet_past_its_history_window_keeps_a_bounded_log_and_a_restart_recovers_from_it(
        make_fleet: Any) -> None:
    fleet = make_fleet(history_window=10)
    log = Path(fleet._cfg["state_dir"]) / "txn.log"
    for i in range(1, 31):
        assert fleet.refit(probe_weights(float(i)), key=f"k{i}").version == i
    assert fleet.wait_persisted(30, 60)  # checkpoints follow the refits (replicated)
    lines = wait_for(lambda: (n := log.read_bytes().count(b"\n")) < 4 * 21 + 10 and n, 30,
                     "the log compacted to the window")
    archive = log.with_name("txn.archive.jsonl").read_bytes()
    assert b'"k1"' in archive and lines < 4 * 30
    assert [h["version"] for h in fleet.history(limit=3)] == [28, 29, 30]
    assert [h["version"] for h in fleet.history(since=27)] == [28, 29, 30]
    epoch = fleet.status()["epoch"]
    with ClientLoad(fleet) as load:
        ray.kill(fleet._coord, no_restart=False)
        wait_for(lambda: (s := fleet.status())["epoch"] == epoch + 1 and s["recovery"]["state"] == "ready",
                 60, "the coordinator's recovery")
        assert converged(fleet)["version"] == 30 and _values(fleet) == {30.0}
        assert fleet.outcome("k30")["status"] == "committed"
        assert fleet.outcome("k1")["status"] == "unknown"  # archived, not in the bounded log
        assert len(fleet.history()) <= 21
        assert fleet.refit(probe_weights(31.0)).version == 31
    load.check()
    assert fleet.rollback().version == 32 and _values(fleet) == {30.0}
