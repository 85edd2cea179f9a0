"""How a version travels (``actors.payload``): buckets packing small tensors, inline or put."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actors.payload import (
    PACK_BYTES,
    fetch,
    from_wire,
    packed_non_finite,
    raw_from_wire,
    seal,
    spec_dict,
    to_wire,
    unseal,
)
from cluster import publish
from engines.checksum import tensor_checksum


def _mixed() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {
        "big": torch.randn(PACK_BYTES // 4 + 3, generator=g),  # above PACK_BYTES: its own array
        "odd": torch.randn(3, 5, generator=g),  # 60 bytes: packed, the next one starts aligned
        "half": torch.randn(7, generator=g).to(torch.bfloat16),
        "fp16": torch.randn(2, 2, generator=g).half(),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "ints": torch.arange(11, dtype=torch.int64),
    }


def test_a_bucket_carries_every_tensor_bit_for_bit_with_small_ones_packed_in_one_buffer() -> None:
    tensors = _mixed()
    packed, offsets, arrays = to_wire(tensors)
    assert set(arrays) == {"big"} and set(offsets) == set(tensors) - {"big"}
    assert packed is not None and packed.dtype == np.uint8
    assert all(start % 64 == 0 for start, _ in offsets.values())
    back = from_wire((packed, offsets, arrays), spec_dict(tensors))
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape, name
        assert tensor_checksum(back[name]) == tensor_checksum(t), name


def test_tensors_that_are_not_plain_contiguous_cpu_tensors_are_packed_by_value() -> None:
    base = torch.randn(4, 6)
    tensors = {"transposed": base.t(), "grad": torch.randn(5, requires_grad=True),
               "sliced": base[:, 1], "bf16": torch.randn(3, 3).to(torch.bfloat16)[::2]}
    back = from_wire(to_wire(tensors), spec_dict(tensors))
    for name, t in tensors.items():
        assert torch.equal(back[name], t.detach()), name


def test_the_packed_scan_names_each_non_finite_tensor_and_only_those() -> None:
    tensors = {**{f"f{i}": torch.ones(5) for i in range(6)}, "h": torch.ones(3).half(),
               "b": torch.ones(9).to(torch.bfloat16), "n": torch.arange(4), "last": torch.ones(2)}
    specs = spec_dict(tensors)
    assert packed_non_finite(to_wire(tensors), specs) == set()
    tensors["f3"][2] = float("nan")
    tensors["b"][8] = float("-inf")
    tensors["last"][0] = float("inf")
    assert packed_non_finite(to_wire(tensors), specs) == {"f3", "b", "last"}


def test_a_small_version_travels_sealed_in_one_bytes_object_and_opens_to_its_bucket() -> None:
    tensors = {f"w{i}": torch.full((8,), float(i)) for i in range(20)}
    manifest = spec_dict(tensors)
    pub = publish.publish(tensors, manifest)
    assert len(pub.refs) == 1 and isinstance(pub.refs[0], bytes)
    back = from_wire(fetch(pub.refs, timeout=1)[0], pub.specs)
    assert all(torch.equal(back[n], t) for n, t in tensors.items())
    assert unseal(seal(manifest)) == manifest and unseal(manifest) is manifest


def test_large_contiguous_tensors_travel_without_a_copy() -> None:
    big = torch.ones(PACK_BYTES)
    _, _, arrays = to_wire({"big": big})
    assert arrays["big"].ctypes.data == big.data_ptr()


def test_a_plain_mapping_of_arrays_is_a_bucket_too() -> None:
    tensors = {"a": torch.full((4,), 2.0), "b": torch.ones(2, 2).to(torch.bfloat16)}
    plain = {"a": tensors["a"].numpy(), "b": tensors["b"].view(torch.int16).numpy()}
    back = from_wire(plain, spec_dict(tensors))
    assert torch.equal(back["a"], tensors["a"]) and torch.equal(back["b"], tensors["b"])


def test_buckets_merge_in_order() -> None:
    first = {"a": torch.full((4,), 1.0)}
    second = {"b": torch.full((4,), 2.0)}
    specs = {**spec_dict(first), **spec_dict(second)}
    back = raw_from_wire([to_wire(first), to_wire(second)], specs)
    assert list(back) == ["a", "b"] and back["b"].data.cast("f")[0] == 2.0


@pytest.mark.usefixtures("ray_session")
def test_fetch_takes_inline_buckets_as_they_are_and_gets_the_others_from_the_object_store() -> None:
    import ray

    one, two = to_wire({"a": torch.full((4,), 1.0)}), to_wire({"b": torch.full((4,), 2.0)})
    got = fetch([one, ray.put(two), one], timeout=30)
    assert got[0] is one and got[2] is one
    assert got[1][1] == two[1] and np.array_equal(got[1][0], two[0])


def test_a_bucket_is_checked_once_it_is_in_the_store_while_the_next_one_is_put(monkeypatch) -> None:
    """Bucket k's checks start once it is in the store (they read the stored copy) and run while
    bucket k+1 is put; bucket k+2 is put only once they are started, never further ahead (the
    helper pool runs its jobs in order, so checks queued for every bucket at once would hold the
    puts back)."""
    import cluster.publish as publish

    events: list[str] = []
    real_checks = publish._BucketChecks

    def checks(group, wire, specs, scan):
        events.append("check " + ",".join(group))
        return real_checks(group, wire, specs, scan)

    def put(wire):
        events.append("put " + ",".join(wire[2]))
        return wire

    monkeypatch.setattr(publish, "_BucketChecks", checks)
    monkeypatch.setattr(publish.ray, "put", put)
    tensors = {f"w{i}": torch.full((PACK_BYTES // 4 + 1,), float(i)) for i in range(4)}  # a bucket each
    sums: dict[str, str] = {}
    refs = publish._put_group(tensors, spec_dict(tensors), sums, True, inline=False, bucket_bytes=PACK_BYTES,
                              timings={"checksum_s": 0.0, "put_s": 0.0}, stored=False)
    assert [r[2].keys() for r in refs] == [{n} for n in tensors]
    assert sums == {n: tensor_checksum(t) for n, t in tensors.items()}
    assert sorted(events) == sorted(f"{e} w{k}" for k in range(4) for e in ("put", "check"))
    for k in range(4):
        assert events.index(f"put w{k}") < events.index(f"check w{k}"), events
    for k in range(2):
        assert events.index(f"check w{k}") < events.index(f"put w{k + 2}"), events


@pytest.mark.usefixtures("ray_session")
def test_the_checksums_are_taken_of_the_copy_in_this_nodes_object_store(monkeypatch) -> None:
    """What the replicas of the caller's node read is the stored copy, so that is what is hashed:
    a put that stored other bytes than it was given shows in the checksums (and the publication
    names this node), while a publication hashing the source does not see it."""
    import ray

    import cluster.publish as publish

    tensors = {f"w{i}": torch.full((PACK_BYTES // 4 + 1,), float(i)) for i in range(3)}
    manifest = spec_dict(tensors)
    real_put = ray.put

    def bad_put(wire):
        packed, offsets, arrays = wire
        if "w1" in arrays:
            arrays = {**arrays, "w1": arrays["w1"].copy()}
            arrays["w1"].view(np.uint8)[5] ^= 0x40
        return real_put((packed, offsets, arrays))

    monkeypatch.setattr(publish.ray, "put", bad_put)
    stored = publish.publish(tensors, manifest, bucket_bytes=PACK_BYTES, inline_bytes=0)
    source = publish.publish(tensors, manifest, bucket_bytes=PACK_BYTES, inline_bytes=0, hash_stored=False)
    assert stored.hashed_on == ray.get_runtime_context().get_node_id() and source.hashed_on is None
    assert source.checksums == {n: tensor_checksum(t) for n, t in tensors.items()}
    assert {n for n in tensors if stored.checksums[n] != source.checksums[n]} == {"w1"}
    got = from_wire(ray.get(stored.refs[1]), manifest)["w1"]
    assert tensor_checksum(got) == stored.checksums["w1"]


@pytest.mark.usefixtures("ray_session")
def test_the_checkpoint_writer_hashes_what_it_read_unless_the_checksums_are_of_that_copy(tmp_path) -> None:
    """I4 verifies each object-store copy once: the persistence worker on the caller's node reads
    the copy the caller hashed and writes it without hashing it again; a copy hashed on another
    node (or by nobody) is hashed before it is written, and a mismatch writes nothing."""
    import ray

    import cluster.publish as publish
    from actors.persist import PersistJob, PersistWorker
    from actors.store import CheckpointStore

    tensors = {f"w{i}": torch.full((PACK_BYTES // 4 + 1,), float(i)) for i in range(2)}
    pub = publish.publish(tensors, spec_dict(tensors), bucket_bytes=PACK_BYTES, inline_bytes=0)
    here = ray.get_runtime_context().get_node_id()
    assert pub.hashed_on == here
    worker = PersistWorker.remote()
    wrong = {**pub.checksums, "w1": "0" * 16}

    def persist(version: int, hashed_on: str | None, checksums: dict[str, str]) -> dict[str, float]:
        job = PersistJob(state_dir=str(tmp_path), version=version, refs=pub.refs, specs=pub.specs,
                         checksums=checksums, base_version=None, from_version=None, fsync=False,
                         hashed_on=hashed_on)
        return ray.get(worker.persist.remote(job), timeout=60)

    try:
        assert persist(1, here, pub.checksums)["verified"] == 0.0
        assert persist(2, None, pub.checksums)["verified"] == 1.0
        assert persist(3, "another-node", pub.checksums)["verified"] == 1.0
        with pytest.raises(ray.exceptions.RayTaskError, match="w1"):
            persist(4, "another-node", wrong)
        store = CheckpointStore.in_state_dir(tmp_path, cleanup=False)
        for version in (1, 2, 3):  # every load verifies every checksum
            assert float(store.load(version)["w1"][0]) == 1.0
        assert not store.has(4)
    finally:
        ray.kill(worker)


def test_raw_from_wire_gives_each_tensors_bytes_as_it_lies_and_names_one_that_does_not_fit_its_spec() -> None:
    tensors = {"small": torch.arange(6, dtype=torch.float32).reshape(2, 3),
               "half": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
               "large": torch.full((PACK_BYTES // 4 + 1,), 3.0)}
    specs = spec_dict(tensors)
    raw = raw_from_wire([to_wire(tensors)], specs)
    for name, t in tensors.items():
        assert raw[name].shape == tuple(t.shape) and raw[name].dtype == specs[name]["dtype"], name
        assert bytes(raw[name].data) == t.reshape(-1).view(torch.uint8).numpy().tobytes(), name
    lying = {**specs, "half": {"shape": [3], "dtype": "bfloat16"}}
    with pytest.raises(ValueError, match="'half'"):
        raw_from_wire([to_wire(tensors)], lying)
    unstorable = {**specs, "small": {"shape": [3], "dtype": "complex64"}}
    with pytest.raises(ValueError, match="'small': dtype complex64 cannot be stored"):
        raw_from_wire([to_wire(tensors)], unstorable)
