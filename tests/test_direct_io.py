"""O_DIRECT checkpoint writes: exact bytes whatever the sizes, and the buffered fallback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from actors.direct_io import ALIGN, open_direct, write_views
from actors.store import CheckpointStore
from engines.checksum import checksums


def _direct_supported(directory: Path) -> bool:
    fd = open_direct(directory / ".probe")
    if fd is None:
        return False
    os.close(fd)
    (directory / ".probe").unlink()
    return True


@pytest.mark.parametrize("sizes", [[0], [1], [ALIGN], [ALIGN + 1, 3], [5, 8192 * 3 + 17, 0, 4095]])
def test_write_views_writes_exactly_the_concatenation(tmp_path: Path, sizes: list[int]) -> None:
    if not _direct_supported(tmp_path):
        pytest.skip(f"O_DIRECT is not supported on {tmp_path}'s filesystem")
    g = torch.Generator().manual_seed(sum(sizes))
    parts = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g).numpy().tobytes() for n in sizes]
    fd = open_direct(tmp_path / "f.bin")
    assert fd is not None
    try:
        n = write_views(fd, [memoryview(p) for p in parts], chunk=2 * ALIGN)  # many chunk turns
    finally:
        os.close(fd)
    assert n == sum(sizes)
    assert (tmp_path / "f.bin").read_bytes() == b"".join(parts)


def test_write_views_rejects_an_unaligned_chunk(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="multiple"):
        write_views(0, [b"x"], chunk=ALIGN + 1)


def test_durable_save_goes_direct_where_supported_and_reads_back(tmp_path: Path) -> None:
    if not _direct_supported(tmp_path):
        pytest.skip(f"O_DIRECT is not supported on {tmp_path}'s filesystem")
    g = torch.Generator().manual_seed(3)
    # Sizes that straddle the 4 MiB bounce buffers and end off the block boundary.
    w = {"a": torch.randn(1_500_001, generator=g), "b": torch.randn(7, 3, generator=g).half()}
    store = CheckpointStore(tmp_path)
    path = store.save(1, w, checksums(w))
    assert path.stat().st_size == store.manifest(1).size  # the padding was truncated away
    back = store.load(1)  # verifies every checksum
    assert all(torch.equal(back[k], w[k]) for k in w)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left


def test_platform_without_o_direct_falls_back_to_buffered_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As on macOS, where ``os.O_DIRECT`` does not exist (tmpfs on this kernel accepts O_DIRECT,
    so no local filesystem refuses it)."""
    monkeypatch.delattr(os, "O_DIRECT", raising=False)
    assert open_direct(tmp_path / "x") is None and not (tmp_path / "x").exists()
    w = {"a": torch.arange(10.0)}
    store = CheckpointStore(tmp_path)
    store.save(1, w, checksums(w))
    assert torch.equal(store.load(1)["a"], w["a"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v1.json", "v1.safetensors"]


def test_a_write_error_reaches_the_caller_as_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by the disk-full fault test: the error's traceback kept a view of the bounce buffer
    alive, so closing the buffer raised ``BufferError`` and the ENOSPC was lost."""
    import errno

    import actors.direct_io as direct_io

    if not _direct_supported(tmp_path):
        pytest.skip(f"O_DIRECT is not supported on {tmp_path}'s filesystem")
    writes = [0]
    real_write = os.write

    def full_after_one(fd: int, data: memoryview) -> int:
        writes[0] += 1
        if writes[0] > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(direct_io.os, "write", full_after_one)
    fd = open_direct(tmp_path / "f.bin")
    assert fd is not None
    try:
        with pytest.raises(OSError) as info:
            write_views(fd, [memoryview(bytes(5 * ALIGN))], chunk=2 * ALIGN)
    finally:
        os.close(fd)
    assert info.value.errno == errno.ENOSPC
