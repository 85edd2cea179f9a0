"""I4 against a real fleet: every kind of bad input is refused with an error naming the thing, and
the fleet keeps serving its version with equal checksums."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pydantic
import pytest
import ray
import torch
from fleet_models import converged, fleet_config, probe_input, probe_value, probe_weights

from actors.payload import spec_dict, to_wire
from cluster import (
    Fleet,
    FleetConfig,
    FleetConfigMismatch,
    FleetNotFound,
    RefitAborted,
    RemoteError,
)
from cluster.errors import EngineNotRefittable
from engines import (
    BuilderConfig,
    DtypeMismatchError,
    MissingWeightsError,
    NonFiniteWeightError,
    ShapeMismatchError,
    UnknownWeightError,
    WeightFileError,
    build_engine,
)
from engines.checksum import checksums


@pytest.fixture(scope="module")
def fleet(ray_session: None, probe_engine_path: Path, tmp_path_factory: pytest.TempPathFactory):
    f = Fleet.launch(fleet_config(probe_engine_path, tmp_path_factory.mktemp("state"), replicas=2))
    f.refit(probe_weights(3.0))
    yield f
    f.shutdown()


@pytest.fixture
def unchanged(fleet: Fleet):
    """Asserts, after the test body, that the fleet still serves the same version and weights."""
    before = converged(fleet)
    last = before["last_version"]
    yield
    after = converged(fleet)
    assert after["version"] == before["version"]
    assert {probe_value(fleet.infer(probe_input()).outputs) for _ in range(4)} == {3.0}
    assert after["last_version"] <= last + 1  # at most one aborted transaction began
    assert all(r["staged_bytes"] == 0 for r in after["replicas"])


def test_missing_names_in_a_complete_refit(fleet: Fleet, unchanged: None) -> None:
    w = probe_weights(4.0)
    del w["w.2"]
    with pytest.raises(MissingWeightsError, match="w.2"):
        fleet.refit(w, complete=True)


def test_extra_names(fleet: Fleet, unchanged: None) -> None:
    with pytest.raises(UnknownWeightError, match="w.9"):
        fleet.refit({**probe_weights(4.0), "w.9": np.zeros(256, np.float32)})


def test_wrong_shape_and_dtype(fleet: Fleet, unchanged: None) -> None:
    with pytest.raises(ShapeMismatchError, match="w.0"):
        fleet.refit({"w.0": np.zeros((16, 16), np.float32)})
    with pytest.raises(DtypeMismatchError, match="w.1"):
        fleet.refit({"w.1": np.zeros(256, np.float64)})
    with pytest.raises(DtypeMismatchError, match="w.1"):
        fleet.refit({"w.1": torch.zeros(256, dtype=torch.bfloat16)})


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values(fleet: Fleet, unchanged: None, bad: float) -> None:
    w = probe_weights(4.0)
    w["w.3"][17] = bad
    with pytest.raises(NonFiniteWeightError, match="w.3"):
        fleet.refit(w)


def test_bytes_flipped_after_checksumming_are_refused_and_change_nothing(fleet: Fleet,
                                                                        unchanged: None) -> None:
    tensors = {n: torch.from_numpy(a) for n, a in probe_weights(4.0).items()}
    sums = checksums(tensors)
    packed, offsets, arrays = to_wire(tensors)
    if "w.1" in arrays:
        arrays = {**arrays, "w.1": arrays["w.1"].copy()}
        arrays["w.1"].view(np.uint8)[5] ^= 0x40  # one bit flipped "in transit"
    else:
        packed = packed.copy()
        packed[offsets["w.1"][0] + 5] ^= 0x40
    ref = ray.put((packed, offsets, arrays))
    out = ray.get(fleet._coord.refit.remote([ref], spec_dict(tensors), sums, None))
    assert out.status == "aborted"
    # the replicas of this one node read one object-store copy: at least its verifier refuses it
    refused = [v for v in out.votes.values() if "ChecksumMismatch" in v and "w.1" in v]
    assert refused and all(v == "YES" or v in refused for v in out.votes.values()), out.votes


def test_truncated_and_malformed_safetensors(fleet: Fleet, unchanged: None, tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    good = tmp_path / "good.safetensors"
    save_file(probe_weights(4.0), str(good))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(WeightFileError, match="truncated.safetensors"):
        fleet.refit(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(WeightFileError, match="garbage.safetensors"):
        fleet.refit(garbage)


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pt_file_with_a_pickle_payload_is_refused_not_executed(fleet: Fleet, unchanged: None,
                                                               tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as fh:
        torch.save({"w.0": torch.zeros(256), "x": _Payload(str(marker))}, fh, pickle_module=pickle)
    with pytest.raises(WeightFileError, match="refused"):
        fleet.refit(evil)
    assert not marker.exists()


def test_names_with_path_characters(fleet: Fleet, unchanged: None, probe_engine_path: Path) -> None:
    for name in ("../etc", "a/b", "..", "x\x00y"):
        with pytest.raises(pydantic.ValidationError, match="name"):
            FleetConfig(name=name, engine=str(probe_engine_path))
        with pytest.raises(ValueError, match="fleet name"):
            Fleet.connect(name)
    with pytest.raises(RefitAborted, match="not a committed version"):
        fleet.rollback(to=987654)


def test_memory_budget_too_small_is_refused_before_staging(ray_session: None, probe_engine_path: Path,
                                                           tmp_path: Path) -> None:
    f = Fleet.launch(fleet_config(probe_engine_path, tmp_path, replicas=2, memory_budget_bytes=1024,
                                  keep_previous=False))
    try:
        before = converged(f)
        with pytest.raises(RefitAborted) as info:
            f.refit(probe_weights(4.0))
        votes = info.value.votes
        assert all("MemoryBudgetError" in v and "4096" in v and "1024" in v for v in votes.values()), votes
        after = converged(f)
        assert after["version"] == before["version"]
        assert all(r["staged_bytes"] == 0 for r in after["replicas"])
    finally:
        f.shutdown()


def test_engine_built_without_refit_is_refused_at_launch(ray_session: None, tmp_path: Path) -> None:
    frozen = tmp_path / "frozen.engine"
    build_engine(torch.nn.Linear(4, 4), [torch.ones(1, 4)], BuilderConfig(enable_refit=False)).save(frozen)
    with pytest.raises(EngineNotRefittable, match="enable_refit"):
        Fleet.launch(fleet_config(frozen, tmp_path))


def test_unknown_config_keys_are_refused(probe_engine_path: Path) -> None:
    with pytest.raises(pydantic.ValidationError, match="replicaz"):
        FleetConfig(name="ok", engine=str(probe_engine_path), replicaz=3)
    with pytest.raises(pydantic.ValidationError, match="prepare_s"):
        FleetConfig(name="ok", engine=str(probe_engine_path), timeouts={"prepare_s": -1})


@pytest.mark.slow
def test_version_larger_than_the_object_store_is_refused_with_the_numbers(ray_session: None,
                                                                          tmp_path: Path) -> None:
    class Big(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(112 << 20))  # 448 MiB > 80% of 512 MiB

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.w[:4]

    path = tmp_path / "big.engine"
    build_engine(Big(), [torch.ones(4)], BuilderConfig(enable_refit=True)).save(path)
    f = Fleet.launch(fleet_config(path, tmp_path, replicas=1, keep_previous=False))
    try:
        from cluster.errors import ObjectStoreTooSmall

        with pytest.raises(ObjectStoreTooSmall, match=str(112 << 22)):
            f.refit({"w": np.ones(112 << 20, np.float32)})
        assert converged(f)["version"] == 0
    finally:
        f.shutdown()
        os.remove(path)


# ----------------------------------------------------------------------------- operator edges


def _named_actors(fleet_name: str) -> list[str]:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"{fleet_name}.")]


def test_a_bad_inference_input_gets_the_replicas_own_error_at_once(fleet: Fleet, unchanged: None) -> None:
    from engines import InputError

    handle = Fleet.connect(fleet.name, fleet.namespace)
    with pytest.raises(InputError) as info:
        handle.infer(np.ones((3, 3), np.float32))
    text = str(info.value)
    assert text == "input 'x': expected float32[256], got shape [3, 3] (rank 2, expected rank 1)", text
    assert handle.router._unhealthy_until == {}  # not retried elsewhere, no replica blamed


def test_a_corrupted_checkpoint_reaches_the_caller_as_its_own_error(fleet: Fleet, unchanged: None) -> None:
    from actors.store import CheckpointCorrupted

    manifest = Path(fleet._cfg["state_dir"]) / "checkpoints" / "v0.json"
    good = manifest.read_bytes()
    manifest.write_bytes(b"{ not json")
    try:
        with pytest.raises(CheckpointCorrupted, match="checkpoint v0 is corrupted") as info:
            Fleet.connect(fleet.name, fleet.namespace).manifest()
        assert "ray::" not in str(info.value) and "pid=" not in str(info.value)
    finally:
        manifest.write_bytes(good)


def test_rollback_to_the_active_version_is_a_noop(fleet: Fleet, unchanged: None) -> None:
    st = fleet.status()
    res = fleet.rollback(to=st["version"])
    assert res.noop and res.version == st["version"]
    assert fleet.status()["last_version"] == st["last_version"]


def test_config_values_of_the_wrong_kind_are_refused_naming_the_field(probe_engine_path: Path) -> None:
    cases = [({"replicas": True}, "replicas"), ({"replicas": 2.0}, "replicas"),
             ({"timeouts": {"launch_s": float("inf")}}, "launch_s"),
             ({"timeouts": {"prepare_s": True}}, "prepare_s"),
             ({"failpoints": {"replica.nope": "raise"}}, "replica.nope"),
             ({"failpoints": {"replica.before_vote": "sleep:soon"}}, "sleep"),
             ({"routing": {"max_queue_per_replica": False}}, "max_queue_per_replica")]
    for fields, named in cases:
        with pytest.raises(pydantic.ValidationError, match=named) as info:
            FleetConfig(name="ok", engine=str(probe_engine_path), **fields)
        assert isinstance(info.value, ValueError)


def test_fleet_names_follow_one_rule_and_a_name_it_accepts_works_everywhere(
        ray_session: None, probe_engine_path: Path, tmp_path: Path) -> None:
    for name in ("a..b", "-x", "x" * 65):
        with pytest.raises(pydantic.ValidationError, match="invalid fleet name"):
            FleetConfig(name=name, engine=str(probe_engine_path))
        with pytest.raises(ValueError, match="invalid fleet name"):
            Fleet.connect(name)
    f = Fleet.launch(fleet_config(probe_engine_path, tmp_path, name="ok.name_1-x", replicas=1))
    try:
        other = Fleet.connect("ok.name_1-x", f.namespace)
        assert other.status()["name"] == "ok.name_1-x"
    finally:
        f.shutdown()
    with pytest.raises(FleetNotFound):
        Fleet.connect("ok.name_1-x", f.namespace)


@pytest.mark.parametrize("kind", ["a file", "under /proc"])
def test_a_state_dir_that_cannot_be_used_is_refused_before_anything_starts(
        ray_session: None, probe_engine_path: Path, tmp_path: Path, kind: str) -> None:
    if kind == "a file":
        state = tmp_path / "state"
        state.write_text("not a directory")
        words = "is not a directory"
    else:
        state = Path("/proc/weight-refit-state")
        words = "cannot be used"
    cfg = fleet_config(probe_engine_path, tmp_path, state_dir=str(state))
    with pytest.raises(ValueError, match=words) as info:
        Fleet.launch(cfg)
    assert str(state) in str(info.value)
    assert _named_actors(cfg.name) == []


def test_a_failed_launch_leaves_no_actors_no_placement_group_and_no_fleet(
        ray_session: None, probe_engine_path: Path, tmp_path: Path) -> None:
    """A replica that dies in ``__init__`` used to fail the launch while ``status`` still showed
    the fleet (0 replicas) and its coordinator and other replicas kept running."""
    from ray.util.placement_group import placement_group_table

    cfg = fleet_config(probe_engine_path, tmp_path, replicas=3, failpoints={"replica.on_start": "r1/raise"})
    with pytest.raises(RemoteError, match="replica r1") as info:
        Fleet.launch(cfg)
    assert "could not start" in str(info.value) and "FailpointError" in str(info.value)
    assert _named_actors(cfg.name) == []
    with pytest.raises(FleetNotFound):
        Fleet.connect(cfg.name, cfg.namespace)
    live = [g for g in placement_group_table().values()
            if g.get("name", "").startswith(cfg.name) and g.get("state") != "REMOVED"]
    assert live == []
    fixed = cfg.model_copy(update={"failpoints": {}})
    f = Fleet.launch(fixed)  # the same name and state dir launch cleanly afterwards
    try:
        assert converged(f)["version"] == 0
    finally:
        f.shutdown()


def test_a_relaunch_with_another_config_is_refused_naming_what_differs(fleet: Fleet, unchanged: None) -> None:
    cfg = FleetConfig(**fleet._cfg)
    changed = cfg.model_copy(update={"timeouts": cfg.timeouts.model_copy(update={"request_s": 7.0}),
                                     "torch_threads": 2})
    with pytest.raises(FleetConfigMismatch) as info:
        Fleet.launch(changed)
    assert set(info.value.fields) == {"timeouts.request_s", "torch_threads"}
    assert "request_s" in str(info.value) and isinstance(info.value, ValueError)
    assert Fleet.connect(fleet.name, fleet.namespace)._cfg == fleet._cfg  # the running one is as it was
    again = Fleet.launch(cfg)  # the same config re-attaches
    assert again.status()["version"] == fleet.status()["version"]


# ----------------------------------------------------------------------------- hostile tensors and files


HOSTILE = {
    "meta": lambda: torch.empty(256, device="meta"),
    "sparse": lambda: torch.zeros(256).to_sparse(),
    "object array": lambda: np.array([object()] * 256, dtype=object),
}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_a_hostile_tensor_is_refused_naming_it_before_any_transfer(fleet: Fleet, unchanged: None,
                                                                   kind: str) -> None:
    last = fleet.status()["last_version"]
    with pytest.raises(WeightFileError, match="w.2") as info:
        fleet.refit({**probe_weights(4.0), "w.2": HOSTILE[kind]()})
    assert isinstance(info.value, ValueError)
    assert fleet.status()["last_version"] == last


def test_a_big_endian_array_is_read_as_its_values(fleet: Fleet, tmp_path: Path) -> None:
    weights = {n: a.astype(">f4") for n, a in probe_weights(8.0).items()}
    res = fleet.refit(weights)
    assert {probe_value(fleet.infer(probe_input()).outputs) for _ in range(4)} == {8.0}
    assert converged(fleet)["version"] == res.version
    fleet.refit(probe_weights(3.0))  # back to what the other tests expect


@pytest.mark.parametrize("kind", ["directory", "fifo", "device"])
def test_a_weights_path_that_is_not_a_regular_file_is_refused_saying_what_it_is(
        fleet: Fleet, unchanged: None, tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"w-{kind}.safetensors"
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")
    says = {"directory": "is a directory", "fifo": "is a FIFO", "device": "is a device"}[kind]
    with pytest.raises(WeightFileError, match=says) as info:
        fleet.refit(path)
    assert str(path) in str(info.value)


def test_a_compressed_archive_that_would_decompress_to_hundreds_of_megabytes_is_refused_from_its_header(
        fleet: Fleet, unchanged: None, tmp_path: Path) -> None:
    """Today's code decompressed the member before finding its name unknown (+2 GiB, 10 s, for a
    1 GiB member); the header says enough."""
    from memory_probe import peak_growth

    bomb = tmp_path / "bomb.npz"
    np.savez_compressed(bomb, **{"w.0": np.zeros(64 << 20, np.float32)})  # 256 MiB -> ~250 KiB
    assert bomb.stat().st_size < 4 << 20

    def refit() -> None:
        with pytest.raises(ShapeMismatchError, match="w.0"):
            fleet.refit(bomb)

    grown = peak_growth(refit)
    assert grown < 32 << 20, f"peak memory grew by {grown >> 20} MiB"


def test_a_malformed_engine_file_is_refused_at_launch_naming_it(ray_session: None, probe_engine_path: Path,
                                                                tmp_path: Path) -> None:
    from engines import EngineFileError

    broken = tmp_path / "broken.engine"
    raw = probe_engine_path.read_bytes()
    broken.write_bytes(raw[: len(raw) // 2])  # truncated
    cfg = fleet_config(broken, tmp_path)
    with pytest.raises(EngineFileError, match="broken.engine") as info:
        Fleet.launch(cfg)
    assert isinstance(info.value, ValueError) or "engine" in str(info.value)
    assert _named_actors(cfg.name) == []
