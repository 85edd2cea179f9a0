from __future__ import annotations

import pickle

import pytest
import torch
import xxhash

from engines.checksum import (
    ChecksumMismatch,
    ChecksumMissing,
    checksums,
    set_digest,
    tensor_bytes,
    tensor_checksum,
    verify,
)


def test_checksum_is_xxh3_of_raw_bytes() -> None:
    t = torch.arange(16, dtype=torch.float32)
    assert tensor_checksum(t) == xxhash.xxh3_64_hexdigest(t.numpy().tobytes())
    assert len(tensor_checksum(t)) == 16


def test_bf16_hashes_its_own_bytes_without_conversion() -> None:
    t = torch.randn(64, dtype=torch.bfloat16)
    raw = t.view(torch.int16).numpy().tobytes()
    assert len(raw) == 128
    assert tensor_checksum(t) == xxhash.xxh3_64_hexdigest(raw)
    # A conversion to float32 would hash different bytes.
    assert tensor_checksum(t) != tensor_checksum(t.float())


def test_one_ulp_change_changes_checksum() -> None:
    t = torch.randn(1000, dtype=torch.bfloat16)
    u = t.clone()
    u.view(torch.int16)[517] ^= 1
    assert tensor_checksum(t) != tensor_checksum(u)


def test_contiguous_cpu_tensor_is_hashed_without_copy() -> None:
    t = torch.randn(32, 32)
    mv = tensor_bytes(t)
    assert mv.nbytes == t.numel() * 4
    t[0, 0] = 12345.0  # the view sees writes to the tensor: it is the same memory
    assert bytes(mv[:4]) == t[0, 0].numpy().tobytes()


def test_non_contiguous_and_scalar_and_empty() -> None:
    t = torch.randn(8, 6)
    assert not t.T.is_contiguous()
    assert tensor_checksum(t.T) == tensor_checksum(t.T.contiguous())
    assert tensor_checksum(t.T) != tensor_checksum(t)
    assert tensor_checksum(torch.tensor(1.5)) == xxhash.xxh3_64_hexdigest(
        torch.tensor([1.5]).numpy().tobytes()
    )
    assert tensor_checksum(torch.empty(0, 3)) == xxhash.xxh3_64_hexdigest(b"")
    assert tensor_checksum(torch.ones(3, requires_grad=True)) == tensor_checksum(torch.ones(3))


def test_checksums_and_set_digest() -> None:
    ts = {"a": torch.zeros(4), "b": torch.ones(4)}
    cs = checksums(ts)
    assert set(cs) == {"a", "b"}
    assert cs["a"] == tensor_checksum(ts["a"])
    d = set_digest(cs)
    assert d == set_digest(dict(reversed(list(cs.items()))))  # order independent
    assert d != set_digest({"a": cs["b"], "b": cs["a"]})  # names bind to checksums
    assert d != set_digest({"a": cs["a"]})
    assert d != set_digest({**cs, "c": cs["a"]})
    assert set_digest({"ab": "x", "c": "y"}) != set_digest({"a": "bx", "c": "y"})


def test_verify_passes_and_names_the_bad_tensor() -> None:
    ts = {"w1": torch.randn(10), "w2": torch.randn(10, dtype=torch.float16)}
    cs = checksums(ts)
    verify(ts, cs)
    verify({"w2": ts["w2"]}, cs)  # a subset verifies
    bad = {"w1": ts["w1"], "w2": ts["w2"].clone()}
    bad["w2"][3] += 1
    with pytest.raises(ChecksumMismatch, match="'w2'") as ei:
        verify(bad, cs)
    assert ei.value.name == "w2"
    assert ei.value.expected == cs["w2"]
    assert ei.value.actual == tensor_checksum(bad["w2"])


def test_verify_without_expected_checksum_is_a_clear_key_error() -> None:
    with pytest.raises(KeyError) as ei:
        verify({"nope": torch.zeros(1)}, {})
    assert isinstance(ei.value, ChecksumMissing)
    assert ei.value.name == "nope"
    assert "no expected checksum for tensor 'nope'" in str(ei.value)


def test_errors_pickle_round_trip() -> None:
    e = pickle.loads(pickle.dumps(ChecksumMismatch("w", "aa", "bb", "somewhere")))
    assert (e.name, e.expected, e.actual, e.where) == ("w", "aa", "bb", "somewhere")
    assert "somewhere" in str(e)
    m = pickle.loads(pickle.dumps(ChecksumMissing("w")))
    assert m.name == "w"
