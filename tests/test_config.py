"""FleetConfig: YAML round trip, strictness, field-naming errors, shipped configs. No Ray."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from cluster.config import ConfigError, FleetConfig, PlacementConfig, RoutingConfig, TimeoutConfig

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ["local-cpu", "cuda", "mlu"]


def _cfg(**overrides: object) -> FleetConfig:
    fields: dict[str, object] = {"name": "t", "engine": "e.engine"}
    fields.update(overrides)
    return FleetConfig(**fields)


def _error_locs(exc: ValidationError) -> list[str]:
    return [".".join(str(p) for p in err["loc"]) for err in exc.errors()]


def test_defaults() -> None:
    cfg = _cfg()
    assert cfg.namespace == "weight-refit"
    assert cfg.address is None
    assert cfg.replicas == 2
    assert cfg.device == "cpu"
    assert cfg.commit_policy == "strict" and cfg.max_exclude == 0
    assert cfg.memory_mode == "swap" and cfg.keep_previous is True
    assert cfg.torch_threads == 1 and cfg.memory_budget_bytes is None
    assert cfg.failpoints == {} and cfg.ray_init == {} and cfg.persist_fsync is True
    assert cfg.control_channel is True
    assert cfg.placement == PlacementConfig()
    assert cfg.placement.cpus_per_replica == 0.01 and cfg.placement.strategy == "SPREAD"
    assert cfg.timeouts == TimeoutConfig(
        prepare_s=60, commit_s=10, activate_s=10, request_s=30, lease_s=10, launch_s=120
    )
    assert cfg.routing == RoutingConfig(
        policy="least_outstanding", max_queue_per_replica=64, retries_on_stale=3, refresh_s=2.0
    )


def test_default_state_dir_is_expanded_and_named() -> None:
    cfg = _cfg(name="fleet-a")
    assert cfg.state_dir == os.path.join(os.path.expanduser("~"), ".weight-refit", "fleet-a")
    assert os.path.isabs(cfg.state_dir)


def test_relative_paths_resolve_against_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = _cfg(engine="out/x.engine", state_dir="out/state")
    assert cfg.engine == str(tmp_path / "out" / "x.engine")
    assert cfg.state_dir == str(tmp_path / "out" / "state")
    assert _cfg(state_dir="~/s").state_dir == os.path.join(os.path.expanduser("~"), "s")


def test_yaml_round_trip(tmp_path: Path) -> None:
    cfg = _cfg(
        name="rt.1",
        replicas=3,
        device="cuda",
        placement={"gpu_fraction": 0.5, "cards_per_node": 2, "strategy": "PACK"},
        timeouts={"prepare_s": 1.5},
        routing={"max_queue_per_replica": 2, "retries_on_stale": 0, "refresh_s": 0.5},
        commit_policy="exclude",
        max_exclude=1,
        memory_mode="copy",
        keep_previous=False,
        torch_threads=4,
        memory_budget_bytes=1 << 30,
        failpoints={"replica.before_vote": "raise"},
        ray_init={"num_cpus": 2, "object_store_memory": 512 << 20},
        persist_fsync=False,
        address="auto",
    )
    path = tmp_path / "sub" / "fleet.yaml"
    cfg.to_yaml(path)
    assert FleetConfig.from_yaml(path) == cfg
    # Written absolute: reading from another cwd gives the same config.
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        assert FleetConfig.from_yaml(path) == cfg
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize(
    ("fields", "key"),
    [
        ({"replica": 2}, "replica"),
        ({"placement": {"cards": 2}}, "placement.cards"),
        ({"timeouts": {"prepare": 1}}, "timeouts.prepare"),
        ({"routing": {"polcy": "x"}}, "routing.polcy"),
    ],
)
def test_unknown_keys_rejected_naming_the_key(fields: dict[str, object], key: str) -> None:
    with pytest.raises(ValidationError) as ei:
        _cfg(**fields)
    assert key in _error_locs(ei.value)
    assert key.split(".")[-1] in str(ei.value)
    assert "Extra inputs are not permitted" in str(ei.value)


def test_unknown_key_in_yaml_names_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: a\nengine: e\nreplicsa: 3\n")
    with pytest.raises(ConfigError) as ei:
        FleetConfig.from_yaml(path)
    assert "replicsa" in str(ei.value) and str(path) in str(ei.value)
    assert isinstance(ei.value, ValueError)


@pytest.mark.parametrize(
    ("fields", "loc"),
    [
        ({"replicas": 0}, "replicas"),
        ({"replicas": "many"}, "replicas"),
        ({"device": "tpu"}, "device"),
        ({"placement": {"gpu_fraction": 0}}, "placement.gpu_fraction"),
        ({"placement": {"gpu_fraction": 1.5}}, "placement.gpu_fraction"),
        ({"placement": {"cpus_per_replica": -1}}, "placement.cpus_per_replica"),
        ({"placement": {"strategy": "STRICT_SPREAD"}}, "placement.strategy"),
        ({"placement": {"cards_per_node": 0}}, "placement.cards_per_node"),
        ({"timeouts": {"prepare_s": 0}}, "timeouts.prepare_s"),
        ({"timeouts": {"lease_s": -1}}, "timeouts.lease_s"),
        ({"timeouts": {"launch_s": 0}}, "timeouts.launch_s"),
        ({"routing": {"policy": "random"}}, "routing.policy"),
        ({"routing": {"max_queue_per_replica": 0}}, "routing.max_queue_per_replica"),
        ({"routing": {"retries_on_stale": -1}}, "routing.retries_on_stale"),
        ({"routing": {"refresh_s": 0}}, "routing.refresh_s"),
        ({"commit_policy": "majority"}, "commit_policy"),
        ({"max_exclude": -1}, "max_exclude"),
        ({"memory_mode": "mmap"}, "memory_mode"),
        ({"host_to_device": "dma"}, "host_to_device"),
        ({"torch_threads": 0}, "torch_threads"),
        ({"memory_budget_bytes": 0}, "memory_budget_bytes"),
        ({"failpoints": {"x": 1}}, "failpoints.x"),
        ({"ray_init": {"address": "auto"}}, "ray_init"),
        ({"state_dir": ""}, "state_dir"),
        ({"engine": ""}, "engine"),
        ({"namespace": ""}, "namespace"),
        ({"address": "  "}, "address"),
        ({"control_channel": "maybe"}, "control_channel"),
    ],
)
def test_bad_values_name_the_field(fields: dict[str, object], loc: str) -> None:
    with pytest.raises(ValidationError) as ei:
        _cfg(**fields)
    assert loc in _error_locs(ei.value), ei.value


def test_missing_required_fields_named() -> None:
    with pytest.raises(ValidationError) as ei:
        FleetConfig()  # type: ignore[call-arg]
    locs = _error_locs(ei.value)
    assert "name" in locs and "engine" in locs
    assert "state_dir" not in locs  # only the real cause is reported


def test_max_exclude_must_be_below_replicas() -> None:
    assert _cfg(replicas=3, commit_policy="exclude", max_exclude=2).max_exclude == 2
    with pytest.raises(ValidationError, match=r"max_exclude \(2\).*replicas \(2\)"):
        _cfg(replicas=2, max_exclude=2)


def test_the_former_evict_words_still_load_as_exclude() -> None:
    cfg = _cfg(replicas=3, commit_policy="evict", max_evict=2)
    assert cfg.commit_policy == "exclude" and cfg.max_exclude == 2
    assert "max_evict" not in cfg.model_dump() and cfg.model_dump()["max_exclude"] == 2


@pytest.mark.parametrize(
    "name", ["../etc", "a/b", "a\\b", "", ".hidden", "-x", "a b", "x" * 65, "名前", "a:b", "~root", "abc\n"]
)
def test_bad_names_rejected(name: str) -> None:
    with pytest.raises(ValidationError) as ei:
        _cfg(name=name)
    assert _error_locs(ei.value) == ["name"]


@pytest.mark.parametrize("name", ["a", "local-cpu", "Fleet_1.v2", "0", "x" * 64])
def test_good_names_accepted(name: str) -> None:
    assert _cfg(name=name).name == name


def test_impossible_placement() -> None:
    with pytest.raises(ValidationError) as ei:
        _cfg(device="mlu", replicas=9, placement={"cards_per_node": 8})
    msg = str(ei.value)
    assert "impossible placement" in msg and "replicas=9" in msg and "cards_per_node=8" in msg
    with pytest.raises(ValidationError, match="impossible placement"):
        _cfg(device="cuda", replicas=2, placement={"cards_per_node": 1})
    # Fits exactly, shares cards, cpu ignores cards, or a multi-node cluster decides at launch.
    assert _cfg(device="mlu", replicas=8, placement={"cards_per_node": 8}).replicas == 8
    assert _cfg(device="cuda", replicas=4, placement={"cards_per_node": 1, "gpu_fraction": 0.25})
    assert _cfg(device="cpu", replicas=9, placement={"cards_per_node": 1})
    assert _cfg(device="mlu", replicas=16, address="auto", placement={"cards_per_node": 8})
    assert _cfg(device="mlu", replicas=100)  # cards discovered later
    with pytest.raises(ValidationError, match="impossible placement"):
        _cfg(device="cuda", replicas=5, placement={"cards_per_node": 1, "gpu_fraction": 0.25})


def test_from_yaml_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        FleetConfig.from_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        FleetConfig.from_yaml(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        FleetConfig.from_yaml(broken)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("name: a\nengine: e\ntimeouts:\n  commit_s: -2\n")
    with pytest.raises(ConfigError, match=r"timeouts\.commit_s"):
        FleetConfig.from_yaml(wrong)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_load(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    cfg = FleetConfig.from_yaml(REPO / "configs" / f"{name}.yaml")
    assert cfg.name == name
    assert cfg.engine == str(REPO / "out" / "conv.engine")
    assert cfg.state_dir == str(REPO / "out" / "state" / name)


def test_shipped_config_contents(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    cpu = FleetConfig.from_yaml(REPO / "configs" / "local-cpu.yaml")
    assert (cpu.device, cpu.replicas) == ("cpu", 2)
    assert cpu.ray_init == {"num_cpus": 2, "object_store_memory": 512 * 1024 * 1024}
    assert cpu.prefill_buffers
    cuda = FleetConfig.from_yaml(REPO / "configs" / "cuda.yaml")
    assert (cuda.device, cuda.replicas, cuda.placement.gpu_fraction) == ("cuda", 4, 0.25)
    assert cuda.host_to_device == "pinned"
    mlu = FleetConfig.from_yaml(REPO / "configs" / "mlu.yaml")
    assert (mlu.device, mlu.replicas, mlu.placement.cards_per_node) == ("mlu", 8, None)
