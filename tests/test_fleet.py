"""The fleet against a real local Ray: two-phase commit, aborts, I1/I3 under load, rollback, keys."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from fleet_models import fleet_config, probe_input, probe_value, probe_weights, wait_for

from cluster import Fleet, KeyReused, NoReplicaAvailable, Overloaded, RefitAborted
from engines import NonFiniteWeightError, ShapeMismatchError, UnknownWeightError
from engines.checksum import tensor_checksum

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def fleet(ray_session: None, probe_engine_path: Path, tmp_path_factory: pytest.TempPathFactory):
    cfg = fleet_config(probe_engine_path, tmp_path_factory.mktemp("state"), replicas=3, torch_threads=2,
                       routing={"refresh_s": 1.5})
    f = Fleet.launch(cfg)
    yield f
    f.shutdown()


def _checksums(fleet: Fleet) -> list[dict[str, str]]:
    handles = ray.get(fleet._coord.member_handles.remote())
    return [ray.get(h.weight_checksums.remote()) for h in handles.values()]


def _value_everywhere(fleet: Fleet, n: int = 6) -> set[float | None]:
    return {probe_value(fleet.infer(probe_input()).outputs) for _ in range(n)}


def test_happy_path_every_replica_switches(fleet: Fleet) -> None:
    before = fleet.status()["version"]
    calls = {r["id"]: r["control_calls"] for r in fleet.status()["replicas"]}
    res = fleet.refit(probe_weights(7.0))
    assert res.version > before and not res.noop
    st = fleet.status()
    # PREPARE and COMMIT+ACTIVATE each went over the control channel, not through Ray
    assert {r["id"]: r["control_calls"] - calls[r["id"]] for r in st["replicas"]} == dict.fromkeys(calls, 2)
    assert st["version"] == res.version
    assert [r["version"] for r in st["replicas"]] == [res.version] * 3
    assert all(r["staged_bytes"] == 0 for r in st["replicas"])
    assert _value_everywhere(fleet) == {7.0}
    sums = _checksums(fleet)
    assert all(s == sums[0] for s in sums)
    assert set(res.replicas) == {"r0", "r1", "r2"}


def test_each_replica_runs_torch_with_the_configured_threads(fleet: Fleet) -> None:
    handles = ray.get(fleet._coord.member_handles.remote())
    assert len(handles) == 3
    for handle in handles.values():
        assert ray.get(handle.status.remote())["torch_threads"] == 2


def test_i6_each_replica_freezes_its_start_up_heap_so_no_full_collection_walks_it(fleet: Fleet) -> None:
    """The objects a replica made while starting (Ray, torch, the program) are frozen out of the
    cycle collector (``actors.heap``): its full collections, which hold every serving thread, walk
    only what came after."""
    replicas = fleet.status()["replicas"]
    assert len(replicas) == 3
    assert all(r["gc"]["frozen"] > 10_000 for r in replicas), [r["gc"] for r in replicas]


def test_handles_re_read_the_routing_table_as_often_as_configured(fleet: Fleet) -> None:
    assert fleet.router.refresh_s == 1.5
    assert Fleet.connect(fleet.name, fleet.namespace).router.refresh_s == 1.5  # from the coordinator's config


def test_identical_refit_is_a_noop(fleet: Fleet) -> None:
    fleet.refit(probe_weights(11.0))
    version = fleet.status()["version"]
    res = fleet.refit(probe_weights(11.0))
    assert res.noop and res.version == version
    assert fleet.status()["last_version"] == version


def test_subset_refit_changes_only_named_weights(fleet: Fleet) -> None:
    fleet.refit(probe_weights(3.0))
    res = fleet.refit({"w.2": np.full(256, 5.0, np.float32)})
    outs = fleet.infer(probe_input()).outputs
    assert [float(o[0]) for o in outs] == [3.0, 3.0, 5.0, 3.0]
    assert fleet.infer(probe_input()).version == res.version


def test_one_no_vote_aborts_everywhere(fleet: Fleet) -> None:
    fleet.refit(probe_weights(2.0))
    version = fleet.status()["version"]
    handles = ray.get(fleet._coord.member_handles.remote())
    ray.get(handles["r1"].arm_failpoint.remote("replica.before_vote", "raise"))
    try:
        with pytest.raises(RefitAborted) as info:
            fleet.refit(probe_weights(99.0))
    finally:
        ray.get(handles["r1"].arm_failpoint.remote("replica.before_vote", None))
    assert "r1" in info.value.reason and info.value.votes["r0"] == "YES"
    assert info.value.votes["r1"].startswith("NO")
    st = fleet.status()
    assert st["version"] == version
    assert all(r["version"] == version and r["staged_bytes"] == 0 and r["pending"] == []
               for r in st["replicas"])
    assert _value_everywhere(fleet) == {2.0}
    assert fleet.outcome(info.value.txn)["status"] == "aborted"
    # the next refit works and skips the aborted version number (gaps are allowed)
    res = fleet.refit(probe_weights(4.0))
    assert res.version >= version + 2


def test_prepare_after_abort_stages_nothing(fleet: Fleet) -> None:
    handles = ray.get(fleet._coord.member_handles.remote())
    epoch = fleet.status()["epoch"]
    r0 = handles["r0"]
    ray.get(r0.abort.remote(epoch, "late-txn", "test"))
    ref = ray.put({"w.0": np.zeros(256, np.float32)})
    vote = ray.get(r0.prepare.remote(epoch, "late-txn", 10_000, [ref],
                                     {"w.0": {"shape": [256], "dtype": "float32"}}, {"w.0": "0"}))
    assert vote.yes is False and "aborted" in vote.reason
    st = ray.get(r0.status.remote())
    assert st["staged_bytes"] == 0 and st["pending"] == []


def test_bad_input_is_refused_before_any_transfer(fleet: Fleet) -> None:
    fleet.refit(probe_weights(6.0))
    version = fleet.status()["last_version"]
    with pytest.raises(UnknownWeightError, match="nope"):
        fleet.refit({"nope": np.zeros(256, np.float32)})
    with pytest.raises(ShapeMismatchError, match="w.1"):
        fleet.refit({"w.1": np.zeros(3, np.float32)})
    bad = probe_weights(1.0)
    bad["w.3"][5] = np.nan
    with pytest.raises(NonFiniteWeightError, match="w.3"):
        fleet.refit(bad)
    assert fleet.status()["last_version"] == version  # no transaction even began
    assert _value_everywhere(fleet) == {6.0}


def test_same_key_returns_first_outcome(fleet: Fleet) -> None:
    first = fleet.refit(probe_weights(21.0), key="deploy-21")
    again = fleet.refit(probe_weights(21.0), key="deploy-21")
    assert again.version == first.version and again.duplicate
    assert _value_everywhere(fleet) == {21.0}
    assert fleet.outcome("deploy-21")["status"] == "committed"
    assert fleet.outcome(first.txn)["version"] == first.version
    assert fleet.outcome("never-used")["status"] == "unknown"


def test_a_key_reused_for_other_weights_is_refused_and_changes_nothing(fleet: Fleet) -> None:
    first = fleet.refit(probe_weights(23.0), key="deploy-23")
    last = fleet.status()["last_version"]
    with pytest.raises(KeyReused, match="deploy-23") as info:
        fleet.refit(probe_weights(24.0), key="deploy-23")
    assert isinstance(info.value, ValueError) and first.txn in str(info.value)
    assert fleet.status()["last_version"] == last  # no transaction began
    assert _value_everywhere(fleet) == {23.0}


def test_rollback_walks_back(fleet: Fleet) -> None:
    a = fleet.refit(probe_weights(31.0))
    b = fleet.refit(probe_weights(32.0))
    c = fleet.refit(probe_weights(33.0))
    r1 = fleet.rollback()
    assert r1.version > c.version and _value_everywhere(fleet) == {32.0}
    r2 = fleet.rollback()
    assert r2.version > r1.version and _value_everywhere(fleet) == {31.0}
    r3 = fleet.rollback(to=c.version)
    assert _value_everywhere(fleet) == {33.0}
    assert r3.version > r2.version > b.version > a.version
    with pytest.raises(RefitAborted, match="not a committed version"):
        fleet.rollback(to=10_000)
    sums = _checksums(fleet)
    assert all(s == sums[0] for s in sums)


def test_concurrent_refits_from_two_drivers_are_serialised(fleet: Fleet) -> None:
    other = Fleet.connect(fleet.name, fleet.namespace)
    results: dict[str, int] = {}

    def run(handle: Fleet, tag: str, value: float) -> None:
        results[tag] = handle.refit(probe_weights(value)).version

    threads = [threading.Thread(target=run, args=(fleet, "a", 41.0)),
               threading.Thread(target=run, args=(other, "b", 42.0))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results["a"] != results["b"]
    winner = 41.0 if results["a"] > results["b"] else 42.0
    assert _value_everywhere(fleet) == {winner}
    committed = [h for h in fleet.history() if h["status"] == "committed"]
    assert {results["a"], results["b"]} <= {h["version"] for h in committed}


def test_connect_from_another_driver_process(fleet: Fleet) -> None:
    fleet.refit(probe_weights(51.0))
    code = (
        "import json, numpy as np, ray\n"
        "from cluster import Fleet\n"
        f"f = Fleet.connect({fleet.name!r}, {fleet.namespace!r})\n"
        "r = f.infer(np.ones(256, np.float32))\n"
        "print(json.dumps({'v': r.version, 'x': float(r.outputs[0][0])}))\n"
    )
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"v": fleet.status()["version"], "x": 51.0}


def _commit_times(state_dir: str) -> dict[int, float]:
    times = {}
    for line in (Path(state_dir) / "txn.log").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "COMMIT":
            times[rec["version"]] = rec["ts"]
    return times


def test_i1_i3_under_concurrent_load(fleet: Fleet) -> None:
    """Clients infer while the driver refits many times: no torn response, no stale read after a
    refit returned, no version before its COMMIT, no handle going backwards."""
    sys.setswitchinterval(1e-5)
    stop = threading.Event()
    records: list[list[tuple[float, float, int, float | None]]] = []
    errors: list[BaseException] = []

    def client() -> None:
        handle = Fleet.connect(fleet.name, fleet.namespace)
        mine: list[tuple[float, float, int, float | None]] = []
        records.append(mine)
        try:
            while not stop.is_set():
                issued = time.time()
                r = handle.infer(probe_input())
                mine.append((issued, time.time(), r.version, probe_value(r.outputs)))
        except BaseException as exc:  # noqa: BLE001  (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    returned: dict[int, float] = {}
    value_of: dict[int, float] = {}
    try:
        for k in range(1, 16):
            value = 1000.0 + k
            res = fleet.refit(probe_weights(value))
            returned[res.version] = time.time()
            value_of[res.version] = value
    finally:
        stop.set()
        for t in threads:
            t.join()
        sys.setswitchinterval(0.005)
    assert not errors, errors
    commits = _commit_times(fleet._cfg["state_dir"])
    total = 0
    for mine in records:
        versions = [v for _, _, v, _ in mine]
        assert versions == sorted(versions), "a client handle saw its versions go backwards"
        for issued, done, version, value in mine:
            total += 1
            assert value is not None, f"torn response at version {version}"
            if version in value_of:
                assert value == value_of[version]
                assert done >= commits[version], "a response of v before COMMIT(v) was logged"
            for v, t_ret in returned.items():
                if issued > t_ret:
                    assert version >= v, f"request issued after refit({v}) returned got {version}"
    assert total > 50


def test_overloaded_when_every_replica_is_full(fleet: Fleet) -> None:
    handle = Fleet.connect(fleet.name, fleet.namespace)
    router = handle.router
    for rid in list(router._outstanding):
        router._outstanding[rid] = router.max_queue
    with pytest.raises(Overloaded, match="max_queue_per_replica"):
        handle.infer(probe_input())
    for rid in list(router._outstanding):
        router._outstanding[rid] = 0
    assert handle.infer(probe_input()).version == fleet.status()["version"]


def test_stale_answers_are_retried_then_reported(fleet: Fleet) -> None:
    handle = Fleet.connect(fleet.name, fleet.namespace)
    handle.router.observe(fleet.status()["version"] + 1000)
    with pytest.raises(NoReplicaAvailable, match="stale"):
        handle.infer(probe_input(), timeout_s=5)


def test_committed_version_activates_early_for_a_client_that_saw_it(fleet: Fleet) -> None:
    """DESIGN step 5: a replica holding v committed-not-active serves min_version=v at once."""
    fleet.refit(probe_weights(61.0))
    st = fleet.status()
    epoch, version = st["epoch"], st["last_version"] + 50
    handles = ray.get(fleet._coord.member_handles.remote())
    r0 = handles["r0"]
    ref = ray.put({f"w.{i}": np.full(256, 62.0, np.float32) for i in range(4)})
    sums = {f"w.{i}": tensor_checksum(torch.full((256,), 62.0)) for i in range(4)}
    specs = {f"w.{i}": {"shape": [256], "dtype": "float32"} for i in range(4)}
    vote = ray.get(r0.prepare.remote(epoch, "early-txn", version, [ref], specs, sums))
    assert vote.yes, vote
    ray.get(r0.commit.remote(epoch, "early-txn"))
    plain = ray.get(r0.infer.remote([probe_input()], 0))
    assert plain["version"] == st["version"]  # committed, not active: still the old version
    early = ray.get(r0.infer.remote([probe_input()], version))
    assert early["version"] == version and float(early["outputs"][0][0]) == 62.0
    # put the fleet back on one version (r0 alone moved): catch every member up, from the store
    assert fleet.wait_persisted(st["version"], 60)
    for h in handles.values():
        ray.get(h.sync_to.remote(st["version"]))
    assert _value_everywhere(fleet) == {61.0}


def test_a_sealed_prepare_is_the_plain_prepare_in_one_argument(fleet: Fleet) -> None:
    """How the coordinator sends PREPARE: every argument but the refs in one sealed bytes."""
    from actors.payload import seal

    fleet.refit(probe_weights(64.0))
    st = fleet.status()
    epoch, version = st["epoch"], st["last_version"] + 70
    r0 = ray.get(fleet._coord.member_handles.remote())["r0"]
    ref = ray.put({f"w.{i}": np.full(256, 65.0, np.float32) for i in range(4)})
    sums = {f"w.{i}": tensor_checksum(torch.full((256,), 65.0)) for i in range(4)}
    specs = {f"w.{i}": {"shape": [256], "dtype": "float32"} for i in range(4)}

    def sealed(txn: str, v: int, checksums: dict[str, str]) -> bytes:
        return seal((epoch, txn, v, specs, checksums, None, None, None, None, None))

    no = ray.get(r0.prepare_sealed.remote(sealed("sealed-bad", version, {**sums, "w.2": "0" * 16}), [ref]))
    assert not no.yes and "w.2" in no.reason
    yes = ray.get(r0.prepare_sealed.remote(sealed("sealed-txn", version + 1, sums), [ref]))
    assert yes.yes, yes
    ray.get(r0.abort.remote(epoch, "sealed-txn", "the test is over"))
    assert _value_everywhere(fleet) == {64.0}


def test_store_keeps_only_the_retention_set(fleet: Fleet) -> None:
    results = [fleet.refit(probe_weights(40.0 + i)) for i in range(5)]
    versions = [r.version for r in results]
    assert all(fleet.wait_persisted(v, 60) for v in versions)  # checkpoints follow the refits
    versions.append(fleet.refit(probe_weights(46.0)).version)  # its retention sees every one of them
    assert fleet.wait_persisted(versions[-1], 60)
    held = ray.get(fleet._coord.versions.remote())  # waits for the background retention
    assert held["active"] == versions[-1]
    stored = set(held["stored"])
    # v0 (the engine file's weights), the newest retain_versions (3) and the previous one stay...
    assert {0, *versions[-3:]} <= stored
    # ...and the older ones of these five are gone, whatever ran before them.
    assert not stored & set(versions[:2])
    assert stored <= {0, *held["committed"]}


def test_a_lost_persistence_worker_is_replaced_before_the_next_refit(fleet: Fleet) -> None:
    worker = ray.get(fleet._coord.persist_worker.remote())
    ray.kill(worker, no_restart=True)
    res = fleet.refit(probe_weights(61.0))  # would abort if the dead worker were used
    assert fleet.status()["version"] == res.version
    assert _value_everywhere(fleet) == {61.0}
    assert fleet.wait_persisted(res.version, 60)
    held = ray.get(fleet._coord.versions.remote())
    assert res.version in held["stored"]
    replacement = ray.get(fleet._coord.persist_worker.remote())
    assert replacement._actor_id != worker._actor_id


def test_a_persistence_worker_lost_mid_write_is_replaced_and_the_refit_commits(
        ray_session: None, probe_engine_path: Path, tmp_path: Path) -> None:
    """As when the worker's node is lost: the write COMMIT waits for (``durability: disk``) is
    retried once on a new worker. (Under ``replicated`` the write follows the refit; a failed one is
    redone from a replica: ``test_durability.py``.)"""
    fleet = Fleet.launch(fleet_config(probe_engine_path, tmp_path, replicas=2, durability="disk"))
    try:
        _a_worker_lost_mid_write(fleet)
    finally:
        fleet.shutdown()


def _a_worker_lost_mid_write(fleet: Fleet) -> None:
    worker = ray.get(fleet._coord.persist_worker.remote())
    ray.get(worker.arm_failpoint.remote("persist.before_save", "hang"))
    result: dict = {}
    refit = threading.Thread(target=lambda: result.update(r=fleet.refit(probe_weights(71.0))))
    refit.start()
    wait_for(lambda: fleet.status()["in_flight"] is not None, 30, "the refit to begin")
    ray.kill(worker, no_restart=True)
    refit.join(timeout=60)
    assert not refit.is_alive() and "r" in result
    assert fleet.status()["version"] == result["r"].version
    assert _value_everywhere(fleet) == {71.0}
    assert fleet.wait_persisted(result["r"].version, 60)
    assert result["r"].version in ray.get(fleet._coord.versions.remote())["stored"]
