"""Placement planning and card assignment without a Ray cluster."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.config import FleetConfig
from cluster.placement import (
    CONNECT_RETRY,
    MLU_VISIBLE_DEVICES,
    SPILL_THRESHOLD,
    PlacementError,
    actor_options,
    assign_card_indexes,
    check_capacity,
    discover_mlu_cards,
    local_ray_init_kwargs,
    mlu_env,
    plan_placement,
    ray_has_mlu_manager,
    replica_ids,
)


def _cfg(**overrides: object) -> FleetConfig:
    fields: dict[str, object] = {"name": "t", "engine": "e.engine"}
    fields.update(overrides)
    return FleetConfig(**fields)


# ------------------------------------------------------------------ discovery


def test_discover_mlu_cards(tmp_path: Path) -> None:
    assert discover_mlu_cards(tmp_path) == 0
    for name in [
        "cambricon_dev0",
        "cambricon_dev1",
        "cambricon_dev12",
        "cambricon_ctl",
        "cambricon_devx",
        "null",
    ]:
        (tmp_path / name).touch()
    assert discover_mlu_cards(tmp_path) == 3
    assert discover_mlu_cards(str(tmp_path)) == 3
    assert discover_mlu_cards(tmp_path / "missing") == 0


def test_upstream_ray_has_no_mlu_manager() -> None:
    # Upstream Ray (2.60 here) ships no Cambricon accelerator manager.
    assert ray_has_mlu_manager() is False


def test_mlu_env() -> None:
    assert mlu_env(3) == {MLU_VISIBLE_DEVICES: "3"}
    assert MLU_VISIBLE_DEVICES == "MLU_VISIBLE_DEVICES"
    with pytest.raises(ValueError):
        mlu_env(-1)


# ------------------------------------------------------------------ assign_card_indexes


def _check_unique(assign: dict[str, int], nodes: dict[str, str], cards: dict[str, int]) -> None:
    for node, n in cards.items():
        used = [assign[r] for r, nd in nodes.items() if nd == node]
        assert len(used) == len(set(used))
        assert all(0 <= i < n for i in used)


def test_assign_unique_per_node() -> None:
    nodes = {"r0": "A", "r1": "B", "r2": "A", "r3": "B", "r4": "A"}
    cards = {"A": 4, "B": 2}
    got = assign_card_indexes(nodes, cards)
    assert got == {"r0": 0, "r2": 1, "r4": 2, "r1": 0, "r3": 1}
    _check_unique(got, nodes, cards)


def test_assign_natural_order() -> None:
    nodes = {f"r{i}": "A" for i in range(12)}
    got = assign_card_indexes(nodes, {"A": 12})
    assert got == {f"r{i}": i for i in range(12)}


def test_assign_stable_with_previous() -> None:
    nodes = {"r0": "A", "r1": "A", "r2": "A"}
    cards = {"A": 4}
    first = assign_card_indexes(nodes, cards, previous={"r1": 3})
    assert first["r1"] == 3
    _check_unique(first, nodes, cards)
    # r0 restarts: the others keep theirs, r0 gets a free one.
    prev = {k: v for k, v in first.items() if k != "r0"}
    again = assign_card_indexes(nodes, cards, previous=prev)
    assert again["r1"] == first["r1"] and again["r2"] == first["r2"]
    _check_unique(again, nodes, cards)
    # Reassigning with the full previous map changes nothing.
    assert assign_card_indexes(nodes, cards, previous=first) == first
    # A new replica joins without moving anyone.
    nodes2 = {**nodes, "r3": "A"}
    grown = assign_card_indexes(nodes2, cards, previous=first)
    assert {k: grown[k] for k in first} == first
    _check_unique(grown, nodes2, cards)


def test_assign_previous_conflict_or_out_of_range() -> None:
    # r3 moved to node A where r0 holds index 0; r5's old index is beyond A's cards.
    nodes = {"r0": "A", "r3": "A", "r5": "A"}
    got = assign_card_indexes(nodes, {"A": 3}, previous={"r0": 0, "r3": 0, "r5": 7})
    assert got["r0"] == 0
    _check_unique(got, nodes, {"A": 3})


def test_assign_overflow_names_node() -> None:
    with pytest.raises(PlacementError, match=r"impossible placement: node B has 3 replicas.*2 card"):
        assign_card_indexes({"r0": "B", "r1": "B", "r2": "B"}, {"B": 2})
    with pytest.raises(PlacementError, match="node C"):
        assign_card_indexes({"r0": "C"}, {"A": 8})


def test_assign_shared_cards() -> None:
    nodes = {f"r{i}": "A" for i in range(4)}
    got = assign_card_indexes(nodes, {"A": 2}, replicas_per_card=2)
    assert sorted(got.values()) == [0, 0, 1, 1]
    with pytest.raises(PlacementError):
        assign_card_indexes({**nodes, "r4": "A"}, {"A": 2}, replicas_per_card=2)


# ------------------------------------------------------------------ plan_placement


def test_replica_ids() -> None:
    assert replica_ids(3) == ["r0", "r1", "r2"]


def test_plan_cpu() -> None:
    plan = plan_placement(_cfg(replicas=3, torch_threads=2))
    assert plan.device == "cpu" and not plan.uses_placement_group and plan.card_env_var is None
    assert [r.replica_id for r in plan.replicas] == ["r0", "r1", "r2"]
    for rp in plan.replicas:
        assert rp.actor_options == {"num_cpus": 0.01, "scheduling_strategy": "SPREAD"}
        assert rp.env == {}  # the thread count is the replica's own: no runtime_env, so no new worker
        assert rp.bundle_index is None
    assert plan.demand() == {"CPU": pytest.approx(0.03)}
    opts = actor_options(plan.replicas[0])
    assert opts == {"num_cpus": 0.01, "scheduling_strategy": "SPREAD"}
    packed = plan_placement(_cfg(placement={"strategy": "PACK"}))
    assert packed.replicas[0].actor_options["scheduling_strategy"] == "DEFAULT"


def test_plan_cuda() -> None:
    plan = plan_placement(_cfg(device="cuda", replicas=4, placement={"gpu_fraction": 0.25}))
    assert plan.resource_name == "GPU" and plan.replicas_per_card == 4
    assert not plan.uses_placement_group and plan.card_env_var is None
    for rp in plan.replicas:
        assert rp.actor_options == {"num_gpus": 0.25, "num_cpus": 0.01, "scheduling_strategy": "SPREAD"}
    assert plan.demand() == {"CPU": pytest.approx(0.04), "GPU": pytest.approx(1.0)}


def test_plan_mlu_without_manager() -> None:
    plan = plan_placement(_cfg(device="mlu", replicas=3), mlu_manager=False)
    assert plan.uses_placement_group and plan.strategy == "SPREAD"
    assert plan.card_env_var == MLU_VISIBLE_DEVICES and plan.resource_name == "MLU"
    assert plan.bundles == ({"MLU": 1.0, "CPU": 0.01},) * 3
    assert [rp.bundle_index for rp in plan.replicas] == [0, 1, 2]
    for rp in plan.replicas:
        assert rp.actor_options == {"resources": {"MLU": 1.0}, "num_cpus": 0.01, "scheduling_strategy": None}
    with pytest.raises(ValueError, match="placement group"):
        actor_options(plan.replicas[0])
    packed = plan_placement(
        _cfg(
            device="mlu", placement={"strategy": "PACK", "mlu_resource": "cambricon", "cpus_per_replica": 0}
        ),
        mlu_manager=False,
    )
    assert packed.strategy == "PACK" and packed.bundles == ({"cambricon": 1.0},) * 2


def test_actor_options_with_placement_group_and_card() -> None:
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    plan = plan_placement(_cfg(device="mlu", replicas=2), mlu_manager=False)
    fake_pg = object()
    opts = actor_options(plan.replicas[1], placement_group=fake_pg, card_index=5)  # type: ignore[arg-type]
    strat = opts["scheduling_strategy"]
    assert isinstance(strat, PlacementGroupSchedulingStrategy)
    assert strat.placement_group is fake_pg and strat.placement_group_bundle_index == 1
    assert opts["runtime_env"] == {"env_vars": {MLU_VISIBLE_DEVICES: "5"}}
    assert opts["resources"] == {"MLU": 1.0}
    # The plan itself is not mutated.
    assert plan.replicas[1].actor_options["scheduling_strategy"] is None


def test_plan_mlu_with_manager() -> None:
    plan = plan_placement(_cfg(device="mlu", replicas=2), mlu_manager=True)
    assert not plan.uses_placement_group and plan.card_env_var is None
    for rp in plan.replicas:
        assert rp.actor_options == {
            "resources": {"MLU": 1.0},
            "num_cpus": 0.01,
            "scheduling_strategy": "SPREAD",
        }


# ------------------------------------------------------------------ capacity and local Ray


def test_check_capacity_mlu() -> None:
    plan = plan_placement(_cfg(device="mlu", replicas=8), mlu_manager=False)
    nodes = [{"CPU": 4.0, "MLU": 4.0}, {"CPU": 4.0, "MLU": 4.0}]
    check_capacity(plan, nodes)
    with pytest.raises(
        PlacementError, match="impossible placement: 8 replicas asked for, 6 MLU cards available"
    ):
        check_capacity(plan, [{"CPU": 4.0, "MLU": 4.0}, {"CPU": 4.0, "MLU": 2.0}])
    with pytest.raises(PlacementError, match="0 MLU cards"):
        check_capacity(plan, [{"CPU": 16.0}])


def test_check_capacity_per_node_fractions() -> None:
    # Half a GPU each: 1.5 GPUs on one node hold 3 replicas, 0.4 on another hold none.
    plan = plan_placement(_cfg(device="cuda", replicas=4, placement={"gpu_fraction": 0.5}))
    with pytest.raises(PlacementError, match="4 replicas asked for"):
        check_capacity(plan, [{"CPU": 8.0, "GPU": 1.5}, {"CPU": 8.0, "GPU": 0.4}])
    check_capacity(plan, [{"CPU": 8.0, "GPU": 2.0}])


def test_check_capacity_cpu() -> None:
    plan = plan_placement(_cfg(replicas=3))
    check_capacity(plan, [{"CPU": 2.0}])  # logical: 0.01 each
    heavy = plan_placement(_cfg(replicas=3, placement={"cpus_per_replica": 1}))
    with pytest.raises(PlacementError, match="3 replicas asked for at 1 CPU each, 2 CPUs"):
        check_capacity(heavy, [{"CPU": 2.0}])


def test_local_ray_init_kwargs(tmp_path: Path) -> None:
    def without_spill(kwargs: dict) -> dict:
        assert kwargs.pop("_system_config") == {"object_spilling_threshold": SPILL_THRESHOLD, **CONNECT_RETRY}
        return kwargs

    cpu = _cfg(ray_init={"num_cpus": 2})
    assert without_spill(local_ray_init_kwargs(cpu)) == {"num_cpus": 2}
    cuda = _cfg(device="cuda", placement={"cards_per_node": 2})
    assert without_spill(local_ray_init_kwargs(cuda)) == {"num_gpus": 2}
    mlu = _cfg(device="mlu", replicas=2, placement={"cards_per_node": 2}, ray_init={"resources": {"X": 1}})
    assert without_spill(local_ray_init_kwargs(mlu, mlu_manager=False)) == {"resources": {"X": 1, "MLU": 2}}
    for i in range(3):
        (tmp_path / f"cambricon_dev{i}").touch()
    discovered = _cfg(device="mlu", replicas=2)
    assert without_spill(local_ray_init_kwargs(discovered, mlu_manager=False, dev_dir=tmp_path)) == \
        {"resources": {"MLU": 3}}
    nowhere = tmp_path / "none"
    assert without_spill(local_ray_init_kwargs(discovered, mlu_manager=False, dev_dir=nowhere)) == {}
    explicit = _cfg(device="mlu", replicas=2, ray_init={"resources": {"MLU": 1}})
    assert without_spill(local_ray_init_kwargs(explicit, mlu_manager=False, dev_dir=tmp_path)) == \
        {"resources": {"MLU": 1}}


def test_a_local_ray_spills_late_unless_the_config_says_otherwise() -> None:
    mine = _cfg(ray_init={"_system_config": {"object_spilling_threshold": 0.5,
                                             "preallocate_plasma_memory": True}})
    assert local_ray_init_kwargs(mine)["_system_config"] == {
        "object_spilling_threshold": 0.5, "preallocate_plasma_memory": True, **CONNECT_RETRY}
    other = _cfg(ray_init={"_system_config": {"preallocate_plasma_memory": True}})
    assert local_ray_init_kwargs(other)["_system_config"] == {
        "object_spilling_threshold": SPILL_THRESHOLD, "preallocate_plasma_memory": True, **CONNECT_RETRY}
    assert 0.8 < SPILL_THRESHOLD < 1.0  # above Ray's default 0.8


def test_a_local_ray_retries_its_connections_ten_times_a_second_within_rays_own_budget() -> None:
    # Ray's default: 10 tries, 1000 ms apart (the raylet's connection to its object store loses
    # that race now and then: a whole second lost at start)
    assert CONNECT_RETRY["raylet_client_connect_timeout_milliseconds"] <= 100
    budget_ms = CONNECT_RETRY["raylet_client_connect_timeout_milliseconds"] * \
        CONNECT_RETRY["raylet_client_num_connect_attempts"]
    assert budget_ms >= 10 * 1000
    mine = _cfg(ray_init={"_system_config": {"raylet_client_num_connect_attempts": 300}})
    assert local_ray_init_kwargs(mine)["_system_config"]["raylet_client_num_connect_attempts"] == 300


def test_a_head_the_cli_starts_gets_every_ray_init_key_as_a_flag_or_a_refusal_naming_it() -> None:
    from cluster.ray_session import head_start_flags

    mlu = local_ray_init_kwargs(_cfg(device="mlu", replicas=2, placement={"cards_per_node": 2},
                                     ray_init={"num_cpus": 4, "_plasma_directory": "/mnt/huge",
                                               "include_dashboard": False, "log_to_driver": False}),
                                mlu_manager=False)
    flags = head_start_flags(mlu)
    assert "--resources={\"MLU\": 2}" in flags and "--num-cpus=4" in flags
    assert "--plasma-directory=/mnt/huge" in flags and "--include-dashboard=false" in flags
    assert any(f.startswith("--system-config=") and "object_spilling_threshold" in f for f in flags)
    assert not any("log_to_driver" in f or "log-to-driver" in f for f in flags)  # the driver's own output
    with pytest.raises(ValueError, match="ray_init local_mode, runtime_env: a Ray head"):
        head_start_flags({**mlu, "runtime_env": {}, "local_mode": True})
