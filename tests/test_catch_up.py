"""Catch-up without reading the log: the coordinator names the version, its checksums and the peers
serving it; a replica takes the set from a peer (its own node first, checksums verified), else
from the checkpoint store, and says in ``status`` which source it used (issue 15)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import ray
import torch
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

from actors.catch_up import PEER, STORE, CatchUpPlan, Peer, Sightings, plan_with_peers
from actors.failpoints import Failpoints
from actors.payload import spec_dict, to_wire
from actors.replica_core import ReplicaCore
from actors.replica_protocol import Lifecycle
from actors.replies import Ack, Failed, FailureKind
from actors.store import CheckpointStore
from engines import load_engine
from engines.checksum import checksums

# ----------------------------------------------------------------------------- without Ray


def _set(value: float) -> dict[str, torch.Tensor]:
    return {n: torch.from_numpy(a) for n, a in probe_weights(value).items()}


class Peers:
    """Stands in for the peers' ``export``: what each would answer, and who was asked."""

    def __init__(self, sets: dict[str, dict[str, torch.Tensor] | None]) -> None:
        self.sets = sets
        self.asked: list[str] = []

    def __call__(self, peer: str, version: int) -> tuple[list[Any], dict[str, Any]] | None:
        self.asked.append(peer)
        tensors = self.sets[peer]
        if tensors is None:
            return None
        return [to_wire(tensors)], spec_dict(tensors)


@pytest.fixture(scope="module")
def engine_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("engine") / "probe.engine"
    build_probe_engine(path)
    return path


def _core(engine_path: Path, store_dir: Path, peers: Peers, node: str = "n1") -> ReplicaCore:
    core = ReplicaCore("r0", lambda: load_engine(engine_path, device="cpu"), CheckpointStore(store_dir),
                       lambda refs: refs, Failpoints(owner="r0"))
    core.node, core.from_peer = node, peers
    return core


def _served(core: ReplicaCore) -> tuple[int, float | None]:
    return core.engine.version, probe_value(core.engine.infer(probe_input()).outputs)


def _plan(version: int, value: float, *peers: tuple[str, str]) -> CatchUpPlan:
    return CatchUpPlan(version, checksums(_set(value)), tuple(Peer(r, n) for r, n in peers))


def test_a_catch_up_takes_the_set_from_a_peer_on_its_own_node_first(engine_path: Path,
                                                                      tmp_path: Path) -> None:
    peers = Peers({"r1": _set(5.0), "r2": _set(5.0), "r0": _set(5.0)})
    core = _core(engine_path, tmp_path, peers, node="n2")
    core.sync(3, _plan(3, 5.0, ("r0", "n2"), ("r1", "n1"), ("r2", "n2")))
    assert peers.asked == ["r2"]  # never itself; the peer on its node before r1
    assert _served(core) == (3, 5.0) and core.lifecycle.state is Lifecycle.SERVING
    got = core.caught_up.as_dict()
    assert (got["source"], got["peer"], got["same_node"], got["version"]) == (PEER, "r2", True, 3)
    assert got["text"] == "peer r2 (same node)"


def test_a_peer_whose_bytes_differ_from_the_committed_checksums_is_skipped_for_the_next(
        engine_path: Path, tmp_path: Path) -> None:
    peers = Peers({"r1": _set(9.0), "r2": _set(5.0)})
    core = _core(engine_path, tmp_path, peers)
    core.sync(4, _plan(4, 5.0, ("r1", "n1"), ("r2", "n3")))
    assert _served(core) == (4, 5.0)
    assert core.caught_up.peer == "r2" and core.caught_up.same_node is False
    assert len(core.caught_up.skipped) == 1 and core.caught_up.skipped[0].startswith("r1: ChecksumMismatch")
    assert core.engine.memory().staged_bytes == 0  # the refused set was freed


def test_a_peer_sending_part_of_the_set_is_skipped_naming_the_difference(engine_path: Path,
                                                                          tmp_path: Path) -> None:
    partial = {n: t for n, t in _set(5.0).items() if n != "w.0"}
    store = CheckpointStore(tmp_path)
    store.save(2, _set(5.0), checksums(_set(5.0)))
    core = _core(engine_path, tmp_path, Peers({"r1": partial}))
    core.sync(2, _plan(2, 5.0, ("r1", "n1")))
    assert core.caught_up.source == STORE and _served(core) == (2, 5.0)
    assert "differs from the committed set in ['w.0']" in core.caught_up.skipped[0]


def test_without_a_peer_holding_the_version_the_store_serves_and_the_peers_tried_are_named(
        engine_path: Path, tmp_path: Path) -> None:
    CheckpointStore(tmp_path).save(6, _set(2.0), checksums(_set(2.0)))
    peers = Peers({"r1": None})
    core = _core(engine_path, tmp_path, peers)
    core.sync(6, _plan(6, 2.0, ("r1", "n1")))
    assert _served(core) == (6, 2.0)
    assert core.caught_up.source == STORE and core.caught_up.skipped == ("r1: LookupError: does not hold v6",)
    assert core.caught_up.describe() == "checkpoint store"


def test_a_plan_without_checksums_or_for_another_version_never_asks_a_peer(engine_path: Path,
                                                                           tmp_path: Path) -> None:
    CheckpointStore(tmp_path).save(7, _set(1.5), checksums(_set(1.5)))
    peers = Peers({"r1": _set(1.5)})
    core = _core(engine_path, tmp_path, peers)
    core.sync(7, CatchUpPlan(7, {}, (Peer("r1", "n1"),)))
    core2 = _core(engine_path, tmp_path, peers)
    core2.sync(7, _plan(8, 1.5, ("r1", "n1")))  # a plan for another version is not this catch-up's
    assert peers.asked == [] and core.caught_up.source == core2.caught_up.source == STORE


def test_with_no_source_holding_the_version_the_replica_is_failed_naming_why(engine_path: Path,
                                                                             tmp_path: Path) -> None:
    core = _core(engine_path, tmp_path, Peers({"r1": None}))
    with pytest.raises(Exception, match="v9"):
        core.sync(9, _plan(9, 1.0, ("r1", "n1")))
    assert core.lifecycle.state is Lifecycle.FAILED and "v9" in core.lifecycle.error
    assert _served(core)[0] == 0


def test_the_coordinator_names_as_peers_the_members_seen_serving_the_version_then_those_past_it() -> None:
    seen = Sightings()
    seen.saw("r0", "n1", 5, "serving")
    seen.saw("r1", "n2", 4, "serving")
    seen.saw("r2", "n2", 5, "catching_up")
    seen.saw_status("r3", {"node": "n3", "version": 5, "state": "serving"})
    seen.saw("r4", "", 5, "serving")  # no node: not a sighting
    seen.saw("r5", "n1", 6, "catching_up")  # on a newer version: may keep 5 as its previous set
    assert seen.holders(5, ["r5", "r3", "r0", "r1", "r2", "r4"]) == \
        (Peer("r3", "n3"), Peer("r0", "n1"), Peer("r5", "n1"))
    assert seen.holders(5, ["r0"]) == (Peer("r0", "n1"),)  # members only
    seen.forget("r0")
    assert seen.holders(5, ["r0", "r3"]) == (Peer("r3", "n3"),)
    seen.saw_acks({"r1": Ack("r1", "t6", 5, "active"), "r3": Ack("r3", "t6", 6, "committed"),
                   "r9": Ack("r9", None, 5, "serving"), "r2": Failed(FailureKind.TIMEOUT, "no answer")})
    assert seen.holders(5, ["r1", "r2", "r9"]) == (Peer("r1", "n2"),)  # r9: never seen with a node
    assert seen.holders(6, ["r3"]) == (Peer("r3", "n3"),)  # committed, still serving: its state stays
    assert seen.holders(4, ["r1", "r3"]) == (Peer("r1", "n2"), Peer("r3", "n3"))  # both past 4: may keep it


def test_a_coordinator_that_has_heard_from_no_member_asks_the_others_before_it_plans_a_catch_up() -> None:
    """A coordinator restarted together with a replica it lost remembers no sightings: the plan it
    answers that replica must still name the peers, not send it to the checkpoint store."""
    seen, asked = Sightings(), []

    def plan() -> CatchUpPlan:
        return CatchUpPlan(5, {"w": "abc"}, seen.holders(5, ["r0", "r1", "r2"]))

    def ask(others: list[str]) -> None:  # what a status fan-out feeds into the sightings
        asked.append(others)
        seen.saw_status("r1", {"node": "n2", "version": 5, "state": "serving"})

    got = plan_with_peers(plan, ["r0"], ["r0", "r1", "r2"], ask)
    assert asked == [["r1", "r2"]] and got is not None and got.peers_for("r0", "n1") == [Peer("r1", "n2")]
    assert plan_with_peers(plan, ["r0"], ["r0", "r1", "r2"], ask).peers == (Peer("r1", "n2"),)
    assert len(asked) == 1  # peers known already: nobody is asked again
    assert plan_with_peers(lambda: CatchUpPlan(5, {}, ()), ["r0"], ["r0", "r1"], ask).peers == ()
    assert plan_with_peers(lambda: None, ["r0"], ["r0", "r1"], ask) is None
    alone = plan_with_peers(lambda: CatchUpPlan(5, {"w": "abc"}, ()), ["r0", "r1"], ["r0", "r1"], ask)
    assert alone is not None and alone.peers == ()
    assert len(asked) == 1  # no checksums, no plan, or nobody but those catching up: nobody to ask
    seen.forget("r1")
    seen.saw_status("r2", {"node": "n2", "version": 5, "state": "catching_up"})  # not a holder
    only_them = plan_with_peers(lambda: CatchUpPlan(5, {"w": "abc"}, (Peer("r2", "n2"),)), ["r0", "r2"],
                                ["r0", "r1", "r2"], ask)
    assert asked[-1] == ["r1"] and only_them is not None  # a plan naming only those catching up asks


# ----------------------------------------------------------------------------- real actors


@pytest.fixture(scope="module")
def fleet(ray_session: None, probe_engine_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from cluster import Fleet

    cfg = fleet_config(probe_engine_path, tmp_path_factory.mktemp("catch-up"), replicas=2,
                       durability="disk", timeouts={"request_s": 20, "launch_s": 60, "lease_s": 2})
    f = Fleet.launch(cfg)
    f.cfg = cfg
    f.refit(probe_weights(1.0))
    yield f
    f.shutdown()


def _row(fleet: Any, rid: str) -> dict[str, Any]:
    return next(r for r in fleet.status()["replicas"] if r["id"] == rid)


def _restart(fleet: Any, rid: str) -> tuple[Any, int]:
    handle = ray.get(fleet._coord.member_handles.remote())[rid]
    pid = _row(fleet, rid)["pid"]
    ray.kill(handle, no_restart=False)
    return handle, pid


def _back(fleet: Any, rid: str, pid: int, version: int) -> dict[str, Any] | None:
    row = _row(fleet, rid)
    ok = row.get("pid") not in (None, pid) and row.get("healthy") and row.get("version") == version \
        and (row.get("caught_up_from") or {}).get("version") == version
    return row if ok else None


def test_a_killed_replica_comes_back_from_its_live_peer_under_load(fleet: Any) -> None:
    version = fleet.refit(probe_weights(2.0)).version
    with ClientLoad(fleet, clients=2) as load:
        _, pid = _restart(fleet, "r1")
        row = wait_for(lambda: _back(fleet, "r1", pid, version), 90, "r1 back on the active version")
    load.check(min_responses=1)
    assert row["caught_up_from"]["source"] == PEER and row["caught_up_from"]["peer"] == "r0"
    assert row["caught_up_from"]["same_node"] is True and row["caught_up_from"]["skipped"] == []
    assert converged(fleet)["version"] == version


def test_a_peer_that_cannot_export_is_skipped_and_the_store_serves(fleet: Any) -> None:
    version = fleet.refit(probe_weights(3.0)).version
    r0 = ray.get(fleet._coord.member_handles.remote())["r0"]
    ray.get(r0.arm_failpoint.remote("replica.export", "raise"))
    try:
        _, pid = _restart(fleet, "r1")
        row = wait_for(lambda: _back(fleet, "r1", pid, version), 90, "r1 back on the active version")
    finally:
        ray.get(r0.arm_failpoint.remote("replica.export", None))
    caught = row["caught_up_from"]
    assert caught["source"] == STORE and caught["text"] == "checkpoint store"
    assert len(caught["skipped"]) == 1 and caught["skipped"][0].startswith("r0: ")
    assert "FailpointError" in caught["skipped"][0]
    assert converged(fleet)["version"] == version


def test_a_replica_restarted_while_no_coordinator_answers_serves_nothing_until_one_does(fleet: Any) -> None:
    """Replicas never read the log: without a coordinator a restarted replica cannot know the
    active version, so it must not serve its engine file's; once a coordinator is back it
    catches up from its peer."""
    from cluster import Fleet

    version = fleet.refit(probe_weights(4.0)).version
    handle = ray.get(fleet._coord.member_handles.remote())["r1"]
    pid = _row(fleet, "r1")["pid"]
    ray.kill(fleet._coord, no_restart=True)
    try:
        ray.kill(handle, no_restart=False)
        st = wait_for(lambda: (s := ray.get(handle.status.remote(), timeout=5))["pid"] != pid and s, 60,
                      "r1 restarted")
        assert (st["state"], st["version"], st["healthy"]) == ("loading", 0, False)
        answer = ray.get(handle.infer.remote([probe_input()], 0))
        assert answer["stale"] and answer["reason"] == "loading"
    finally:
        fleet._coord = Fleet.launch(fleet.cfg)._coord  # a new coordinator recovers from the log
    row = wait_for(lambda: _row(fleet, "r1")["healthy"] and _row(fleet, "r1"), 90, "r1 serving again")
    assert row["version"] == version and row["caught_up_from"]["source"] == PEER
    assert converged(fleet)["version"] == version
    assert probe_value(fleet.infer(probe_input()).outputs) == 4.0
