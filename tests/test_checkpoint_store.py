from __future__ import annotations

import errno
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from actors.store import (
    CheckpointCorrupted,
    CheckpointMissing,
    CheckpointStore,
    validate_label,
)
from engines.checksum import ChecksumMismatch, checksums, set_digest


def weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(64, 32, generator=g).to(torch.bfloat16),
        "fc.weight": torch.randn(32, 32, generator=g),
        "fc.bias": torch.randn(32, generator=g).half(),
        "step": torch.tensor(7, dtype=torch.int64),
        "mask": torch.rand(5, generator=g) > 0.5,
        "empty": torch.empty(0, 4),
    }


def data_offset(path: Path, name: str) -> int:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    return 8 + n + header[name]["data_offsets"][0]


def test_round_trip_including_bf16(tmp_path: Path) -> None:
    store = CheckpointStore.in_state_dir(tmp_path)
    assert store.root == tmp_path / "checkpoints"
    w = weights()
    cs = checksums(w)
    path = store.save(3, w, cs)
    assert path == tmp_path / "checkpoints" / "v3.safetensors"
    assert (tmp_path / "checkpoints" / "v3.json").is_file()
    assert store.versions() == [3] and store.has(3) and not store.has(4)
    got = store.load(3)
    assert list(got) == list(w)
    for name, t in w.items():
        assert got[name].dtype == t.dtype, name
        assert got[name].shape == t.shape, name
        assert torch.equal(got[name], t), name
    m = store.manifest(3)
    assert m.version == 3
    assert m.digest == set_digest(cs)
    assert m.checksums == cs
    assert m.tensors["embed.weight"].dtype == "bfloat16"
    assert m.tensors["embed.weight"].shape == [64, 32]
    # A standard safetensors file: the library reads it on its own.
    plain = load_file(path)
    assert torch.equal(plain["embed.weight"], w["embed.weight"])


def test_the_base_version_copied_from_an_engine_file_byte_for_byte_equals_one_saved_from_tensors(
        tmp_path: Path) -> None:
    """``Launch`` writes version 0 from the engine file's bytes (no torch in the driver)."""
    from engines import BuilderConfig, build_engine
    from engines.checksum import bytes_checksum
    from engines.engine_file import read_engine_file, read_engine_weight_bytes

    class Mixed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Parameter(torch.randn(8, 4).to(torch.bfloat16))
            self.b = torch.nn.Parameter(torch.randn(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.b.sum() + self.a.float().sum()

    engine_path = tmp_path / "mixed.engine"
    build_engine(Mixed(), [torch.ones(3)], BuilderConfig(enable_refit=True)).save(engine_path)
    raw = read_engine_weight_bytes(engine_path)
    tensors = read_engine_file(engine_path).weights
    assert set(raw) == set(tensors)
    from_bytes = CheckpointStore(tmp_path / "raw")
    from_bytes.save_raw(0, raw, {n: bytes_checksum(t.data) for n, t in raw.items()})
    from_tensors = CheckpointStore(tmp_path / "tensors")
    from_tensors.save(0, tensors, checksums(tensors))
    assert from_bytes.manifest(0).checksums == from_tensors.manifest(0).checksums
    assert from_bytes.data_path(0).read_bytes() == from_tensors.data_path(0).read_bytes()
    for name, t in from_bytes.load(0).items():
        assert torch.equal(t, tensors[name]), name


def test_an_engine_file_whose_header_lies_about_a_weight_is_refused_naming_the_file(tmp_path: Path) -> None:
    from engines import BuilderConfig, EngineFileError, build_engine
    from engines.engine_file import read_engine_weight_bytes

    path = tmp_path / "conv.engine"
    build_engine(torch.nn.Conv2d(1, 1, 3, bias=False), [torch.ones(1, 1, 3, 3)],
                 BuilderConfig(enable_refit=True)).save(path)
    blob = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    header["weight"]["shape"] = [1, 1, 3, 4]  # 48 bytes said, 36 stored
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (n - len(text))
    assert len(text) == n
    blob[8:8 + n] = text
    path.write_bytes(bytes(blob))
    with pytest.raises(EngineFileError, match="conv.engine"):
        read_engine_weight_bytes(path)


def test_tied_and_non_contiguous_tensors(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    base = torch.randn(8, 4)
    w = {"a": base, "tied": base, "t": base.T}
    store.save(1, w, checksums(w))
    got = store.load(1)
    assert torch.equal(got["tied"], base) and torch.equal(got["t"], base.T)


def test_save_checks_checksums(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    w = weights()
    cs = checksums(w)
    with pytest.raises(ValueError, match="missing"):
        store.save(1, w, {k: v for k, v in cs.items() if k != "fc.bias"})
    bad = dict(cs, **{"fc.weight": "0" * 16})
    with pytest.raises(ChecksumMismatch, match="fc.weight"):
        store.save(1, w, bad)
    assert store.versions() == []


def test_leftover_temp_file_is_not_a_version_and_is_cleaned(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    w = weights()
    store.save(1, w, checksums(w))
    tmp = tmp_path / ".v2.safetensors.host.123.abcd1234.tmp"
    tmp.write_bytes(b"half a checkpoint")
    orphan = tmp_path / "v2.safetensors"  # crash between the two renames: no manifest
    orphan.write_bytes(b"x")
    assert store.versions() == [1]
    assert not store.has(2)
    with pytest.raises(CheckpointMissing) as ei:
        store.load(2)
    assert ei.value.version == 2 and "v2.json" in str(ei.value)
    reader = CheckpointStore(tmp_path, cleanup=False)
    assert tmp.exists()
    assert reader.versions() == [1]
    CheckpointStore(tmp_path)
    assert not tmp.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v1.json", "v1.safetensors", "v2.safetensors"]


def test_failed_save_leaves_no_temp_file(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    w = {"c": torch.zeros(2, dtype=torch.complex64)}
    with pytest.raises(ValueError, match="'c'"):
        store.save(1, w, checksums(w))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("load", ["load", "load_raw"])
def test_corrupted_byte_raises_checksum_mismatch_naming_tensor(tmp_path: Path, load: str) -> None:
    store = CheckpointStore(tmp_path)
    w = weights()
    path = store.save(5, w, checksums(w))
    off = data_offset(path, "fc.weight") + 17
    raw = bytearray(path.read_bytes())
    raw[off] ^= 0x40
    path.write_bytes(bytes(raw))
    with pytest.raises(ChecksumMismatch) as ei:
        getattr(store, load)(5)
    assert ei.value.name == "fc.weight"
    assert "fc.weight" in str(ei.value) and "v5" in str(ei.value)


@pytest.mark.parametrize("load", ["load", "load_raw"])
def test_truncated_file_raises_corrupted(tmp_path: Path, load: str) -> None:
    store = CheckpointStore(tmp_path)
    w = weights()
    path = store.save(2, w, checksums(w))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 100])
    with pytest.raises(CheckpointCorrupted) as ei:
        getattr(store, load)(2)
    assert ei.value.version == 2 and ei.value.path == str(path)
    assert "truncated" in str(ei.value)
    path.write_bytes(raw[:5])
    with pytest.raises(CheckpointCorrupted):
        getattr(store, load)(2)


@pytest.mark.parametrize("load", ["load", "load_raw"])
def test_corrupted_header_raises_corrupted(tmp_path: Path, load: str) -> None:
    store = CheckpointStore(tmp_path)
    w = weights()
    path = store.save(2, w, checksums(w))
    raw = bytearray(path.read_bytes())
    raw[9] = ord("!")  # inside the JSON header, same size
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointCorrupted, match="v2"):
        getattr(store, load)(2)


@pytest.mark.parametrize("load", ["load", "load_raw"])
def test_corrupted_manifest_raises_corrupted(tmp_path: Path, load: str) -> None:
    store = CheckpointStore(tmp_path)
    w = weights()
    store.save(2, w, checksums(w))
    (tmp_path / "v2.json").write_text("{not json")
    with pytest.raises(CheckpointCorrupted, match="manifest"):
        getattr(store, load)(2)


def test_retention_keeps_the_given_set(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    for v in (1, 2, 4, 7, 9):
        w = weights(v)
        store.save(v, w, checksums(w), fsync=False)
    (tmp_path / "v3.safetensors").write_bytes(b"orphan")
    removed = store.retain({4, 7, 9})
    assert removed == [1, 2, 3]
    assert store.versions() == [4, 7, 9]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"v{v}.{ext}" for v in (4, 7, 9) for ext in ("json", "safetensors")
    )
    assert torch.equal(store.load(7)["fc.weight"], weights(7)["fc.weight"])
    assert store.retain({4, 7, 9, 100}) == []
    assert store.versions() == [4, 7, 9]


def test_retention_below_a_bound_spares_newer_versions(tmp_path: Path) -> None:
    """The coordinator retains in the background: a version newer than the bound may be in flight."""
    store = CheckpointStore(tmp_path)
    for v in (1, 2, 5, 6):
        w = weights(v)
        store.save(v, w, checksums(w), fsync=False)
    assert store.retain({2}, below=5) == [1]
    assert store.versions() == [2, 5, 6]


def test_resave_same_version_overwrites(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    a, b = weights(1), weights(2)
    store.save(1, a, checksums(a))
    store.save(1, b, checksums(b))
    assert torch.equal(store.load(1)["fc.weight"], b["fc.weight"])
    assert store.versions() == [1]


def test_invalid_version_numbers(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    with pytest.raises(ValueError):
        store.has(-1)
    with pytest.raises(ValueError):
        store.data_path(True)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "label",
    ["", "../x", "a/b", "a\\b", "a..b", "..", ".hidden", "-x", "a\0b", "x" * 65, "a b", "ü", "a\n"],
)
def test_bad_labels_rejected(label: str) -> None:
    with pytest.raises(ValueError) as ei:
        validate_label(label)
    assert repr(label) in str(ei.value)


@pytest.mark.parametrize("label", ["a", "v12", "my-fleet_1.prod", "0", "x" * 64])
def test_good_labels_accepted(label: str) -> None:
    assert validate_label(label) == label


def test_creating_the_store_makes_its_directory_entry_durable(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Loose end 10: the ``checkpoints/`` directory's parent was never fsync'd, so a power loss
    could forget the directory with every version in it."""
    import actors.store as store_module

    synced: list[Path] = []
    real = store_module.fsync_dir
    monkeypatch.setattr(store_module, "fsync_dir", lambda p: (synced.append(Path(p)), real(p))[1])
    CheckpointStore.in_state_dir(tmp_path / "state")
    assert tmp_path / "state" in synced
    synced.clear()
    CheckpointStore.in_state_dir(tmp_path / "state")  # it exists now: nothing to make durable
    assert synced == []


@pytest.mark.parametrize(("hook", "errno_name"), [("store.write", "ENOSPC"), ("store.fsync", "EIO")])
def test_a_failed_write_leaves_no_file_and_the_older_versions_intact(tmp_path: Path, hook: str,
                                                                     errno_name: str) -> None:
    from actors.failpoints import Failpoints

    fp = Failpoints()
    store = CheckpointStore.in_state_dir(tmp_path, fp=fp)
    w = weights()
    store.save(1, w, checksums(w))
    before = sorted(p.name for p in store.root.iterdir())
    fp.arm(hook, f"oserror:{errno_name}")
    with pytest.raises(OSError) as info:
        store.save(2, w, checksums(w))
    assert info.value.errno == getattr(errno, errno_name)
    assert sorted(p.name for p in store.root.iterdir()) == before
    assert store.versions() == [1] and set(store.load(1)) == set(w)


def test_load_raw_gives_the_bytes_load_gives_without_torch_tensors(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    w = weights()
    store.save(4, w, checksums(w))
    raw = store.load_raw(4)
    loaded = store.load(4)
    assert list(raw) == list(loaded)
    for name, t in loaded.items():
        assert raw[name].shape == tuple(t.shape), name
        assert raw[name].dtype == str(t.dtype).removeprefix("torch."), name
        assert bytes(raw[name].data) == t.contiguous().view(-1).view(torch.uint8).numpy().tobytes(), name
