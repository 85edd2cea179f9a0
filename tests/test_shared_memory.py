"""memory_mode: shared: CPU replicas serve straight from the object store's read-only copy.

Against real actors: the replicas hold no copy of their own (they report the version as borrowed),
I1 holds under load through refits and an instant rollback, and a version stays intact in the
store while a replica serves it, even once its owner has freed it and the store has reused memory.
"""

from __future__ import annotations

import gc
import warnings
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from fleet_models import (
    PROBE_WEIGHTS,
    PROBE_WIDTH,
    ClientLoad,
    converged,
    fleet_config,
    probe_input,
    probe_value,
    probe_weights,
)

from cluster import Fleet, FleetConfig
from engines import BuilderConfig, build_engine

MODEL_BYTES = PROBE_WEIGHTS * PROBE_WIDTH * 4


@pytest.fixture(scope="module")
def fleet(ray_session: None, probe_engine_path: Path, tmp_path_factory: pytest.TempPathFactory):
    cfg = fleet_config(probe_engine_path, tmp_path_factory.mktemp("shared"), memory_mode="shared",
                       keep_previous=True)
    f = Fleet.launch(cfg)
    yield f
    f.shutdown()


def _replicas(fleet: Fleet) -> list[dict]:
    return fleet.status()["replicas"]


def test_shared_replicas_serve_the_published_copy_and_hold_none_of_their_own(fleet: Fleet) -> None:
    res = fleet.refit(probe_weights(3.0))
    for r in _replicas(fleet):
        assert r["memory_mode"] == "shared"
        assert r["version"] == res.version
        assert r["borrowed_bytes"] == MODEL_BYTES, r  # the live set is the store's copy
        assert r["staged_bytes"] == 0, r  # nothing pooled
        assert r["previous_bytes"] == MODEL_BYTES, r  # version 0, from the engine file, kept
    assert probe_value(fleet.infer(probe_input()).outputs) == 3.0
    converged(fleet)


def test_i1_holds_in_shared_mode_under_load_through_refits_and_a_rollback(fleet: Fleet) -> None:
    with ClientLoad(fleet) as load:
        for value in (4.0, 5.0, 6.0):
            fleet.refit(probe_weights(value))
        back = fleet.rollback()
    load.check()
    assert probe_value(fleet.infer(probe_input()).outputs) == 5.0
    assert back.version > 0
    for r in _replicas(fleet):
        assert r["borrowed_bytes"] == 2 * MODEL_BYTES, r  # live (v of 5.0) and previous (v of 6.0)
    converged(fleet)


def test_shared_mode_needs_cpu_replicas(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="memory_mode 'shared'.*cuda"):
        FleetConfig(name="x", engine=str(tmp_path / "e"), state_dir=str(tmp_path), device="cuda",
                    memory_mode="shared")


def test_a_borrowed_version_stays_intact_after_its_owner_frees_it(ray_session: None) -> None:
    """What shared mode rests on, end to end in one process: an engine serving arrays fetched
    from the object store keeps them readable and unchanged after the owner drops every reference and
    the store hands out memory again for objects of the same size."""
    width = 64 << 10  # 256 KiB per weight: plasma, not inlined
    model = build_engine(_Scale(width), [torch.ones(width)],
                         BuilderConfig(enable_refit=True, memory_mode="shared", keep_previous=False))
    ref = ray.put({"w": np.full(width, 7.0, np.float32)})
    arrays = ray.get(ref)
    assert not arrays["w"].flags.writeable  # zero-copy: the store's own pages
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model.commit(model.stage({"w": torch.from_numpy(arrays["w"])}, 1, borrow=True))
    address = model.weights()["w"].data_ptr()
    assert address == arrays["w"].ctypes.data  # served from the store's pages, not a copy
    del arrays, ref  # the owner lets go: only the engine's borrowed tensor holds the object
    gc.collect()
    others = [ray.put({"w": np.full(width, float(i), np.float32)}) for i in range(8)]
    fetched = [ray.get(o) for o in others]
    assert all(f["w"].ctypes.data != address for f in fetched), "the store reused a served version's memory"
    out = model.infer(np.ones(width, np.float32))
    assert out.version == 1 and np.all(out.outputs[0] == 7.0)
    del fetched, others


class _Scale(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(width))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (x * self.w,)
