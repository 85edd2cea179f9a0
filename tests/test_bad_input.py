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
from cluster import Fleet, FleetConfig, RefitAborted
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


def test_bytes_flipped_after_checksumming_are_refused_by_every_replica(fleet: Fleet, unchanged: None) -> None:
    tensors = {n: torch.from_numpy(a) for n, a in probe_weights(4.0).items()}
    sums = checksums(tensors)
    wire = to_wire(tensors)
    wire["w.1"] = wire["w.1"].copy()
    wire["w.1"].view(np.uint8)[5] ^= 0x40  # one bit flipped "in transit"
    ref = ray.put(wire)
    out = ray.get(fleet._coord.refit.remote([ref], spec_dict(tensors), sums, None))
    assert out.status == "aborted"
    assert all("ChecksumMismatch" in v and "w.1" in v for v in out.votes.values()), out.votes


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
        with pytest.raises(ValueError, match="label"):
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
