"""Canaries: a refit committed on a cohort only, a share of new requests routed to it, handles that
saw it sticking to it, then one end fleet-wide: promoted (one commit point), aborted (a new
version carrying the pre-canary weights, so no handle goes back and the rest never serves the
canary's), or decided by a judge from the window's errors, latencies and probes. The canary's
state is in the log: a restarted coordinator resumes it, a killed canary replica comes back on
the canary's version, a replica added during a canary joins the rest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import ray
from fleet_models import (
    ClientLoad,
    converged,
    fleet_config,
    probe_input,
    probe_value,
    probe_weights,
    wait_for,
)

from actors.canary import Canary, CanaryJudge, CohortStats, cohort, verdict
from actors.log import (
    ActivatedRecord,
    BeginRecord,
    CanaryRecord,
    CanarySpec,
    CommitRecord,
    EpochRecord,
    replay,
)

# ----------------------------------------------------------------------------- without Ray


def test_a_canary_needs_exactly_one_size_and_shares_in_range_naming_the_field() -> None:
    for kwargs, says in [({}, "exactly one of replicas"), ({"replicas": 1, "fraction": 0.5}, "exactly one"),
                         ({"replicas": 0}, "canary replicas must be an int >= 1"),
                         ({"fraction": 1.5}, "canary fraction must be in"),
                         ({"replicas": 1, "traffic": 0.0}, "canary traffic must be in"),
                         ({"replicas": 1, "judge": "yes"}, "canary judge must be a CanaryJudge")]:
        with pytest.raises(ValueError, match=says):
            Canary(**kwargs)
    with pytest.raises(ValueError, match="window_s must be a positive number"):
        CanaryJudge(window_s=0)
    with pytest.raises(ValueError, match="max_p99_ratio must be a positive number"):
        CanaryJudge(window_s=1, max_p99_ratio=-1)


def test_the_cohort_is_the_first_members_by_number_and_never_the_whole_fleet() -> None:
    members = ["r10", "r2", "r0", "r1"]
    assert cohort(Canary(replicas=2), members) == ["r0", "r1"]
    assert cohort(Canary(fraction=0.25), members) == ["r0"]
    assert cohort(Canary(fraction=0.01), members) == ["r0"]  # at least one
    with pytest.raises(ValueError, match="would take every one of the 4 members"):
        cohort(Canary(replicas=4), members)
    with pytest.raises(ValueError, match="at least 2 members"):
        cohort(Canary(replicas=1), ["r0"])


def test_the_judge_aborts_on_errors_slow_canaries_too_little_traffic_or_failed_probes() -> None:
    settings = CanaryJudge(window_s=1, max_error_rate=0.1, max_p99_ratio=2.0, min_requests=5).settings()
    fast, slow = [0.01] * 100, [0.05] * 100
    ok = verdict(settings, CohortStats(100, 5, fast), CohortStats(100, 0, fast))
    assert ok.promote and "error rate 5.00% (5/100) <= 10.00%" in ok.reason and "<= 2" in ok.reason
    failing = verdict(settings, CohortStats(100, 20, fast), CohortStats(100, 0, fast))
    assert not failing.promote and "error rate 20.00% (20/100) > 10.00%" in failing.reason
    slowed = verdict(settings, CohortStats(100, 0, slow), CohortStats(100, 0, fast))
    assert not slowed.promote and "= 5.00 > 2" in slowed.reason
    idle = verdict(settings, CohortStats(2, 0, fast[:2]), CohortStats(100, 0, fast))
    assert not idle.promote and "fewer than min_requests=5" in idle.reason
    probed = verdict(settings, CohortStats(100, 0, fast), CohortStats(100, 0, fast),
                     ["probe 'p' output 0: x"])
    assert not probed.promote and "probe 'p' output 0" in probed.reason


def _log(*records: Any) -> Any:
    return replay(records)


def test_the_log_keeps_a_canary_from_its_commit_until_its_version_or_its_replacement_is_active() -> None:
    spec = CanarySpec(cohort=["r0"], traffic=0.25)
    base = [EpochRecord(epoch=1), BeginRecord(epoch=1, txn="a", version=1),
            CommitRecord(epoch=1, txn="a", version=1),
            ActivatedRecord(epoch=1, txn="a", version=1, duration_s=0),
            BeginRecord(epoch=1, txn="c", version=2, canary=spec), CommitRecord(epoch=1, txn="c", version=2)]
    state = _log(*base)
    assert state.canary is not None and state.canary.base_version == 1 and state.active_version == 1
    assert state.version_for("r0") == 2 and state.version_for("r1") == 1
    assert state.committed_not_activated == []  # recovery must not finish a canary fleet-wide
    promoted = _log(*base, CanaryRecord(epoch=1, txn="c", version=2, decision="promote", reason="ok"))
    assert promoted.committed_not_activated == ["c"]  # ... until it is promoted
    done = _log(*base, CanaryRecord(epoch=1, txn="c", version=2, decision="promote", reason="ok"),
                ActivatedRecord(epoch=1, txn="c", version=2, duration_s=0))
    assert done.canary is None and done.active_version == 2
    assert "promoted (ok)" in (done.history[-1].canary or "")
    aborted = _log(*base, CanaryRecord(epoch=1, txn="c", version=2, decision="abort", reason="bad"),
                   BeginRecord(epoch=1, txn="d", version=3, origin_version=1),
                   CommitRecord(epoch=1, txn="d", version=3), ActivatedRecord(epoch=1, txn="d", version=3,
                                                                              duration_s=0))
    assert aborted.canary is None and aborted.active_version == 3 and aborted.version_for("r0") == 3
    assert "aborted (bad); ended by v3" in (aborted.history[1].canary or "")
    kept, _ = aborted.compacted(10, set())  # records rebuilt from the state replay to it
    assert replay(kept) == aborted and any(isinstance(r, CanaryRecord) for r in kept)


# ----------------------------------------------------------------------------- through the fleet


@pytest.fixture(scope="module")
def fleet(ray_session: None, probe_engine_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from cluster import Fleet

    timeouts = {"prepare_s": 20, "commit_s": 10, "activate_s": 10, "request_s": 20, "launch_s": 60,
                "lease_s": 3}
    f = Fleet.launch(fleet_config(probe_engine_path, tmp_path_factory.mktemp("canary"), replicas=3,
                                  timeouts=timeouts))
    f.refit(probe_weights(1.0))
    yield f
    f.shutdown()


def _value(fleet: Any) -> float | None:
    return probe_value(fleet.infer(probe_input()).outputs)


def _served(fleet: Any) -> dict[str, tuple[int, float | None]]:
    out = {}
    for rid, h in ray.get(fleet._coord.member_handles.remote()).items():
        r = ray.get(h.infer.remote([probe_input()], 0))
        out[rid] = (r["version"], probe_value(r["outputs"]))
    return out


def _start(fleet: Any, value: float, **canary: Any) -> Any:
    res = fleet.refit(probe_weights(value), canary=Canary(**{"replicas": 1, "traffic": 0.5, **canary}))
    assert res.canary is not None and res.canary["cohort"] == ["r0"]
    return res


def test_a_canary_serves_its_share_sticks_handles_and_promotes_with_one_commit_point(fleet: Any) -> None:
    from cluster import RefitAborted

    base = converged(fleet)["version"]
    with ClientLoad(fleet, clients=3) as load:
        res = _start(fleet, 2.0)
        served = _served(fleet)
        assert served["r0"] == (res.version, 2.0) and served["r1"] == (base, 1.0) == served["r2"]
        st = fleet.status()
        assert st["version"] == base and st["canary"]["version"] == res.version
        assert {r["id"]: r["cohort"] for r in st["replicas"]} == {"r0": "canary", "r1": "main", "r2": "main"}
        with pytest.raises(RefitAborted, match=f"a canary of v{res.version} is running on r0"):
            fleet.refit(probe_weights(9.0))
        # a fresh handle that has not seen the canary: about half its requests go to it; once one
        # did, every later one does (it sticks)
        h = fleet.handle()
        versions = [h.infer(probe_input()).version for _ in range(40)]
        first = versions.index(res.version)
        assert set(versions[first:]) == {res.version} and set(versions[:first]) <= {base}
        wait_for(lambda: any(res.version in {v for v, _ in m} for m in load.responses), 30, "canary served")
        promoted = fleet.promote()
    load.check()
    assert promoted.version == res.version
    st = converged(fleet)
    assert st["version"] == res.version and st["canary"] is None and _value(fleet) == 2.0
    row = [h for h in fleet.history() if h["version"] == res.version][0]
    assert "promoted by hand" in row["canary"] and row["activated"]


def test_abort_moves_every_replica_to_a_new_version_with_the_pre_canary_weights(fleet: Any) -> None:
    from cluster import NoCanary

    base = converged(fleet)["version"]
    before = _value(fleet)
    with ClientLoad(fleet, clients=3) as load:
        res = _start(fleet, 7.0)
        wait_for(lambda: any(res.version in {v for v, _ in m} for m in load.responses), 30, "canary served")
        aborted = fleet.abort_canary("looks wrong")
    load.check()
    assert aborted.version > res.version > base
    st = converged(fleet)
    assert st["version"] == aborted.version and _value(fleet) == before  # the pre-canary weights
    for mine in load.responses:  # the rest never served the canary's weights under another version
        assert all(val == 7.0 for v, val in mine if v == res.version)
        assert all(val == before for v, val in mine if v != res.version)
    rows = {h["version"]: h for h in fleet.history()}
    assert f"aborted (looks wrong); ended by v{aborted.version}" in rows[res.version]["canary"]
    assert rows[aborted.version]["origin_version"] is not None
    with pytest.raises(NoCanary, match="no canary is running"):
        fleet.promote()


def test_a_judge_promotes_a_healthy_canary_after_its_window_and_says_why(fleet: Any) -> None:
    with ClientLoad(fleet, clients=2):
        res = _start(fleet, 3.0, judge=CanaryJudge(window_s=2.0, max_error_rate=0.0, max_p99_ratio=50.0))
        wait_for(lambda: fleet.status()["version"] == res.version, 60, "the judge promoted")
    st = converged(fleet)
    assert st["canary"] is None and _value(fleet) == 3.0
    row = [h for h in fleet.history() if h["version"] == res.version][0]
    assert "promoted (judge: error rate 0.00%" in row["canary"]


def test_a_judge_aborts_a_canary_whose_probe_fails_and_the_rest_never_serves_it(fleet: Any) -> None:
    from cluster import Probe

    before = _value(fleet)
    x = probe_input()
    expects_four = Probe("value", [x], expected=[x * 4.0] * 4)
    with ClientLoad(fleet, clients=2) as load:
        res = _start(fleet, 5.0, judge=CanaryJudge(window_s=1.0, probes=[expects_four]))
        wait_for(lambda: fleet.status()["version"] > res.version, 60, "the judge aborted")
    load.check(min_responses=1)
    st = converged(fleet)
    assert _value(fleet) == before and st["canary"] is None
    row = [h for h in fleet.history() if h["version"] == res.version][0]
    assert "aborted (judge: probe 'value' output 0: max |diff|" in row["canary"]
    assert "(on r0)" in row["canary"]


def test_a_canary_with_probes_deletes_the_probe_files_of_canaries_that_ended(fleet: Any) -> None:
    from cluster import Probe

    x = probe_input()
    probes = Path(fleet._cfg["state_dir"]) / "canary"
    ended = probes / "v999999.probes.safetensors"  # as a canary that ended long ago left it
    probes.mkdir(parents=True, exist_ok=True)
    ended.write_bytes(b"old probes")
    finite = Probe("finite", [x], finite=True)
    res = _start(fleet, 6.0, judge=CanaryJudge(window_s=600.0, probes=[finite]))
    assert sorted(p.name for p in probes.iterdir()) == [f"v{res.version}.probes.safetensors"]
    fleet.abort_canary("ended by the test")
    assert converged(fleet)["canary"] is None


def test_a_scale_up_during_a_canary_joins_the_rest_of_the_fleet(fleet: Any) -> None:
    base = converged(fleet)["version"]
    res = _start(fleet, 6.0)
    try:
        added = fleet.scale(4)["added"]
        st = fleet.status()
        row = [r for r in st["replicas"] if r["id"] in added][0]
        assert row["cohort"] == "main" and row["version"] == base
    finally:
        fleet.promote()
        fleet.scale(3)
    assert converged(fleet)["version"] == res.version


def _kill(fleet: Any, rid: str) -> None:
    handle = ray.get(fleet._coord.member_handles.remote())[rid]
    ray.kill(handle, no_restart=False)


def test_a_killed_canary_replica_comes_back_on_the_canarys_version(fleet: Any) -> None:
    res = _start(fleet, 8.0)
    with ClientLoad(fleet, clients=2) as load:
        _kill(fleet, "r0")
        wait_for(lambda: _served(fleet)["r0"] == (res.version, 8.0), 90, "r0 back on the canary")
    load.check(min_responses=1)
    assert fleet.status()["canary"]["cohort"] == ["r0"]
    fleet.promote()
    assert converged(fleet)["version"] == res.version and _value(fleet) == 8.0


def test_a_coordinator_killed_mid_canary_resumes_it_and_its_judge(fleet: Any) -> None:
    base = converged(fleet)["version"]
    res = _start(fleet, 4.0, judge=CanaryJudge(window_s=4.0, max_error_rate=0.0))
    with ClientLoad(fleet, clients=2) as load:
        ray.kill(fleet._coord, no_restart=False)
        wait_for(lambda: fleet.status()["canary"] is not None, 60, "the coordinator is back with its canary")
        assert _served(fleet)["r1"][0] == base
        wait_for(lambda: fleet.status()["version"] == res.version, 60, "the resumed judge promoted")
    load.check(min_responses=1)
    st = converged(fleet)
    assert st["canary"] is None and _value(fleet) == 4.0
    row = [h for h in fleet.history() if h["version"] == res.version][0]
    assert "promoted (judge:" in row["canary"]


def test_a_coordinator_killed_after_deciding_an_abort_finishes_it_when_it_recovers(fleet: Any) -> None:
    before = _value(fleet)
    res = _start(fleet, 9.0)
    ray.get(fleet._coord.arm_failpoint.remote("coordinator.after_begin", "exit"))
    with ClientLoad(fleet, clients=2) as load:
        with pytest.raises(Exception):  # noqa: B017  (the coordinator dies inside the call)
            fleet.abort_canary("crash test")
        wait_for(lambda: fleet.status()["canary"] is None and fleet.status()["version"] > res.version, 90,
                 "the recovered coordinator finished the abort")
    load.check(min_responses=1)
    converged(fleet)
    assert _value(fleet) == before


def test_a_canary_of_every_member_is_refused_naming_them_and_nothing_changes(fleet: Any) -> None:
    from cluster import CanaryRefused

    before = converged(fleet)
    with pytest.raises(CanaryRefused, match="would take every one of the 3 members"):
        fleet.refit(probe_weights(11.0), canary=Canary(replicas=3))
    after = converged(fleet)
    assert after["version"] == before["version"] and after["canary"] is None
    assert after["last_version"] == before["last_version"]  # no version number was used
