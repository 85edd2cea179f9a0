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
    build_probe_engine,
    converged,
    fleet_config,
    probe_input,
    probe_value,
    probe_weights,
)

from cluster import Fleet, FleetConfig
from engines import BuilderConfig, build_engine

WIDTH = 32 * PROBE_WIDTH  # 4 weights of 32 KiB: versions travel through the object store, not inline
MODEL_BYTES = PROBE_WEIGHTS * WIDTH * 4


def weights(value: float) -> dict[str, np.ndarray]:
    return probe_weights(value, width=WIDTH)


def wide_input() -> np.ndarray:
    return probe_input(WIDTH)


@pytest.fixture(scope="module")
def fleet(ray_session: None, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("shared")
    build_probe_engine(root / "wide.engine", width=WIDTH)
    cfg = fleet_config(root / "wide.engine", root, memory_mode="shared", keep_previous=True, prefetch=True)
    f = Fleet.launch(cfg)
    yield f
    f.shutdown()


def _replicas(fleet: Fleet) -> list[dict]:
    return fleet.status()["replicas"]


def test_shared_replicas_serve_the_published_copy_and_hold_none_of_their_own(fleet: Fleet) -> None:
    res = fleet.refit(weights(3.0))
    for r in _replicas(fleet):
        assert r["memory_mode"] == "shared"
        assert r["version"] == res.version
        assert r["borrowed_bytes"] == MODEL_BYTES, r  # the live set is the store's copy
        assert r["staged_bytes"] == 0, r  # nothing pooled
        assert r["previous_bytes"] == MODEL_BYTES, r  # version 0, from the engine file, kept
    assert probe_value(fleet.infer(wide_input()).outputs) == 3.0
    converged(fleet)


def test_i1_holds_in_shared_mode_under_load_through_refits_and_a_rollback(fleet: Fleet) -> None:
    with ClientLoad(fleet, inputs=wide_input()) as load:
        for value in (4.0, 5.0, 6.0):
            fleet.refit(weights(value))
        back = fleet.rollback()
    load.check()
    assert probe_value(fleet.infer(wide_input()).outputs) == 5.0
    assert back.version > 0
    for r in _replicas(fleet):
        assert r["borrowed_bytes"] == 2 * MODEL_BYTES, r  # live (v of 5.0) and previous (v of 6.0)
    converged(fleet)


def test_one_replica_per_node_hashes_the_copy_they_share_and_a_flipped_bit_is_still_refused(
        fleet: Fleet) -> None:
    """Both replicas run on this one node and serve one object-store copy: after a first refit
    has named their node, one of them hashes it and the other stages it as it is (in every memory
    mode; here the shared one), unless the caller took its checksums of that very copy, as a
    fleet's refit does: then neither hashes it. Bytes flipped after the caller's checksums are
    refused all the same (by that verifier), and nothing changes."""
    from actors.payload import spec_dict, to_wire
    from engines.checksum import checksums

    fleet.refit(weights(7.0))  # the votes name the node
    res = fleet.refit(weights(8.0))
    assert len(res.replicas) == 2 and all(t["verified"] == 0.0 for t in res.replicas.values()), res.replicas
    tensors = {n: torch.from_numpy(a) for n, a in weights(7.5).items()}  # the caller hashed its source
    ref = ray.put(to_wire(tensors))
    out = ray.get(fleet._coord.refit.remote([ref], spec_dict(tensors), checksums(tensors), None))
    assert out.status == "committed", out.reason
    hashed = sorted(rid for rid, t in out.replicas.items() if t.get("verified", 1.0) == 1.0)
    assert len(out.replicas) == 2 and len(hashed) == 1, out.replicas
    fleet.refit(weights(8.0))
    before = fleet.status()
    tensors = {n: torch.from_numpy(a) for n, a in weights(9.0).items()}
    sums = checksums(tensors)
    packed, offsets, arrays = to_wire(tensors)
    packed = packed.copy()
    packed[offsets["w.1"][0] + 5] ^= 0x40  # one bit flipped "in transit"
    ref = ray.put((packed, offsets, arrays))
    out = ray.get(fleet._coord.refit.remote([ref], spec_dict(tensors), sums, None))
    assert out.status == "aborted"
    assert "ChecksumMismatch" in out.votes[hashed[0]] and "w.1" in out.votes[hashed[0]], out.votes
    after = converged(fleet)
    assert after["version"] == before["version"]
    assert {probe_value(fleet.infer(wide_input()).outputs) for _ in range(6)} == {8.0}


def test_a_replica_named_the_verifier_of_a_node_it_is_not_on_votes_no(fleet: Fleet) -> None:
    st = fleet.status()
    r0 = ray.get(fleet._coord.member_handles.remote())["r0"]
    vote = ray.get(r0.prepare.remote(st["epoch"], "moved", st["last_version"] + 5, [], {}, {}, None, None,
                                     {"a-node-it-left": "r0"}))
    assert not vote.yes and "named the verifier of node a-node-it-left" in vote.reason
    assert ray.get(r0.status.remote())["pending"] == []


def test_announced_buckets_are_hashed_ahead_and_nothing_stays_held_after_the_refits(fleet: Fleet) -> None:
    """prefetch: the fleet announces each bucket as it is put; its node's verifier hashes it ahead
    of the PREPARE, and what the PREPARE takes is not held afterwards."""
    before = {r["id"]: r["prefetch"]["prefetched"] for r in _replicas(fleet)}
    with ClientLoad(fleet, inputs=wide_input()) as load:
        for k in range(3):
            res = fleet.refit(weights(20.0 + k))
    load.check()
    st = converged(fleet)
    assert st["version"] == res.version
    assert sum(r["prefetch"]["prefetched"] - before[r["id"]] for r in st["replicas"]) >= 3
    assert all(r["prefetch"]["buckets"] == 0 and r["prefetch"]["bytes"] == 0 for r in st["replicas"])
    assert probe_value(fleet.infer(wide_input()).outputs) == 22.0


def test_a_flipped_bit_in_an_announced_bucket_is_refused_by_its_verifier(fleet: Fleet) -> None:
    from actors.payload import spec_dict, to_wire
    from engines.checksum import checksums

    before = fleet.refit(weights(30.0))
    tensors = {n: torch.from_numpy(a) for n, a in weights(31.0).items()}
    sums = checksums(tensors)
    packed, offsets, arrays = to_wire(tensors)
    packed = packed.copy()
    packed[offsets["w.2"][0] + 9] ^= 0x10  # "in transit", after the caller's checksums
    ref = ray.put((packed, offsets, arrays))
    assert ray.get(fleet._coord.announce.remote("flipped", [ref], spec_dict(tensors)))
    out = ray.get(fleet._coord.refit.remote([ref], spec_dict(tensors), sums, None))
    assert out.status == "aborted"
    assert any("ChecksumMismatch" in why and "w.2" in why for why in out.votes.values()), out.votes
    st = converged(fleet)
    assert st["version"] == before.version
    assert all(r["staged_bytes"] == 0 and r["prefetch"]["buckets"] == 0 for r in st["replicas"])
    assert {probe_value(fleet.infer(wide_input()).outputs) for _ in range(6)} == {30.0}


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
