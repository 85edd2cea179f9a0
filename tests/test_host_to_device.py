"""Host-to-card copies through two pinned buffers (``engines.host_to_device``): the chunked path
on the CPU (two ordinary buffers, no stream) everywhere, the pinned one on a CUDA GPU."""

from __future__ import annotations

import pytest
import torch

from cluster.config import FleetConfig
from cluster.launch import replica_settings
from engines import BuilderConfig, build_engine, load_engine
from engines.host_to_device import PinnedPipe


def _filled(n: int, dtype: torch.dtype) -> torch.Tensor:
    return (torch.arange(n, dtype=torch.int64) % 251).to(dtype)


@pytest.mark.parametrize(("numel", "dtype", "chunk"), [
    (1, torch.float32, 1 << 20),
    ((1 << 18) - 1, torch.float32, 1 << 20),  # less than one chunk
    (1 << 18, torch.float32, 1 << 20),  # exactly one chunk
    ((5 << 18) + 3, torch.float32, 1 << 20),  # five chunks and a ragged tail
    ((3 << 20) + 1, torch.bfloat16, 1 << 20),  # two-byte elements across chunk edges
    ((40 << 20) + 3, torch.uint8, 16 << 20),  # each chunk's host copy split over the helper threads
])
def test_the_pipe_copies_every_byte_whatever_the_size_against_the_chunk(numel: int, dtype: torch.dtype,
                                                                         chunk: int) -> None:
    src = _filled(numel, dtype)
    dst = torch.full((numel,), 7, dtype=dtype)
    pipe = PinnedPipe("cpu", chunk_bytes=chunk)
    pipe.copy(dst, src)
    assert torch.equal(dst, src)
    src2 = _filled(numel, dtype).flip(0).contiguous()  # the same pipe, its buffers reused
    pipe.copy(dst, src2)
    assert torch.equal(dst, src2)


def test_the_pipe_copies_across_shapes_with_the_same_number_of_elements() -> None:
    src = _filled(6 << 18, torch.float32).reshape(6, 1 << 18)
    dst = torch.zeros(3, 2 << 18)
    PinnedPipe("cpu", chunk_bytes=1 << 20).copy(dst, src)
    assert torch.equal(dst.reshape(-1), src.reshape(-1))


@pytest.mark.parametrize(("dst", "src", "words"), [
    (torch.zeros(8), torch.zeros(8, dtype=torch.float64), "float64"),
    (torch.zeros(8), torch.zeros(9), "9"),
    (torch.zeros(8), torch.zeros(16)[::2], "contiguous"),
])
def test_a_copy_the_pipe_cannot_make_is_a_value_error_and_changes_nothing(
        dst: torch.Tensor, src: torch.Tensor, words: str) -> None:
    before = dst.clone()
    with pytest.raises(ValueError, match=words):
        PinnedPipe("cpu").copy(dst, src)
    assert torch.equal(dst, before)


def test_a_chunk_size_that_is_not_positive_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="chunk_bytes"):
        PinnedPipe("cpu", chunk_bytes=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback where torch sees no GPU")
def test_a_card_pipe_without_a_card_makes_plain_copies() -> None:
    pipe = PinnedPipe("cuda:0")
    assert not pipe.pinned
    src, dst = _filled(1 << 20, torch.float32), torch.zeros(1 << 20)
    pipe.copy(dst, src)
    assert torch.equal(dst, src)


def test_the_fleet_config_hands_host_to_device_to_each_replicas_engine(tmp_path) -> None:
    cfg = FleetConfig(name="h2d", engine=str(tmp_path / "m.engine"), state_dir=str(tmp_path / "st"),
                      host_to_device="pageable")
    assert replica_settings(cfg, None).host_to_device == "pageable"
    pinned = cfg.model_copy(update={"host_to_device": "pinned"})
    assert replica_settings(pinned, None).host_to_device == "pinned"

    class M(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.w

    build_engine(M(), [torch.ones(4)], BuilderConfig(enable_refit=True)).save(tmp_path / "m.engine")
    engine = load_engine(tmp_path / "m.engine", host_to_device="pageable")
    assert engine.config.host_to_device == "pageable"
    with pytest.raises(ValueError, match="host_to_device"):
        load_engine(tmp_path / "m.engine", host_to_device="dma")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch sees none)")
@pytest.mark.parametrize("numel", [(9 << 20) + 5, 1 << 10])
def test_on_a_card_the_pipe_copies_through_pinned_buffers_and_the_stage_holds_every_byte(numel: int) -> None:
    src = _filled(numel, torch.float32)
    dst = torch.zeros(numel, device="cuda")
    pipe = PinnedPipe("cuda", chunk_bytes=4 << 20)
    pipe.copy(dst, src)
    torch.cuda.synchronize()
    assert pipe.pinned
    assert torch.equal(dst.cpu(), src)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch sees none)")
@pytest.mark.parametrize("host_to_device", ["pinned", "pageable"])
def test_an_engine_on_a_card_stages_large_tensors_either_way_and_serves_them(host_to_device: str) -> None:
    class M(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(3 << 20))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.w[:4]

    engine = build_engine(M(), [torch.ones(4)], BuilderConfig(enable_refit=True, device="cuda",
                                                              host_to_device=host_to_device))
    new = _filled(3 << 20, torch.float32)
    engine.commit(engine.stage({"w": new}, version=1))
    assert torch.equal(engine.weights()["w"].cpu(), new)
    assert engine.infer(torch.ones(4).numpy()).outputs[0].tolist() == new[:4].tolist()
    assert (engine._pipe is not None and engine._pipe.pinned) == (host_to_device == "pinned")
