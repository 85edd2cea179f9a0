"""The ``magicmind`` backend.

The hardware tests need Cambricon's MagicMind SDK (``magicmind``), an MLU card and the ``onnx`` /
``onnxscript`` packages; they skip with a reason elsewhere. One test runs everywhere: without the
SDK, building an engine with ``backend="magicmind"`` raises BackendUnavailableError naming it.
"""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import torch

import engines.backends.magicmind as magicmind_backend  # importable without the SDK
from engines import BackendUnavailableError, BuilderConfig, build_engine

SKIP_REASON = "MagicMind SDK (magicmind) not installed: needs Cambricon hardware and SDK"
HAVE_MAGICMIND = importlib.util.find_spec("magicmind") is not None
MLU = "mlu:0"

needs_magicmind = pytest.mark.skipif(not HAVE_MAGICMIND, reason=SKIP_REASON)


def sample_conv() -> torch.nn.Module:
    """The seed sample: Conv2d 1 -> 1 channel, 3x3, stride 1, no bias, weights all 0."""
    conv = torch.nn.Conv2d(1, 1, kernel_size=3, stride=1, bias=False)
    torch.nn.init.zeros_(conv.weight)
    return conv.eval()


def ones() -> torch.Tensor:
    return torch.ones(1, 1, 3, 3)


def result(engine, version: int | None = None) -> float:
    r = engine.infer(ones())
    if version is not None:
        assert r.version == version
    return float(np.asarray(r.outputs[0]).reshape(-1)[0])


def test_without_sdk_build_raises_backend_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    # Hide the SDK even where it is installed, so this guard is checked on every machine.
    for name in ("magicmind", "magicmind.python", magicmind_backend.SDK_MODULE):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(BackendUnavailableError, match="magicmind"):
        build_engine(sample_conv(), [ones()], BuilderConfig(enable_refit=True, backend="magicmind"))


@pytest.fixture
def mlu_engine():
    engine = build_engine(sample_conv(), [ones()],
                          BuilderConfig(enable_refit=True, backend="magicmind", device=MLU))
    yield engine
    engine.backend.close()


@pytest.mark.hardware
@needs_magicmind
def test_infer_zeros_then_stage_and_commit_ones(mlu_engine) -> None:
    engine = mlu_engine
    assert engine.backend.name == "magicmind"
    (name,) = engine.manifest()
    assert result(engine, version=0) == 0.0

    staged = engine.stage({name: torch.ones(1, 1, 3, 3)}, version=1)
    assert result(engine, version=0) == 0.0  # staged: invisible until commit
    assert engine.commit(staged) == 1
    assert result(engine, version=1) == 9.0


@pytest.mark.hardware
@needs_magicmind
def test_discard_keeps_serving_old_weights(mlu_engine) -> None:
    engine = mlu_engine
    (name,) = engine.manifest()
    staged = engine.stage({name: torch.full((1, 1, 3, 3), 2.0)}, version=1)
    engine.discard(staged)
    assert result(engine, version=0) == 0.0


@pytest.mark.hardware
@needs_magicmind
def test_refits_from_zero_to_nine_never_decrease(mlu_engine) -> None:
    engine = mlu_engine
    (name,) = engine.manifest()
    seen = []
    for k in range(1, 10):
        engine.commit(engine.stage({name: torch.full((1, 1, 3, 3), float(k))}, version=k))
        seen.append(result(engine, version=k))
    assert seen == [9.0 * k for k in range(1, 10)]


@pytest.mark.hardware
@needs_magicmind
def test_shadow_engine_path_without_refitter_extension(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(magicmind_backend.REFITTER_ENV, "0")
    engine = build_engine(sample_conv(), [ones()],
                          BuilderConfig(enable_refit=True, backend="magicmind", device=MLU))
    try:
        assert engine.backend.extension is None
        (name,) = engine.manifest()
        engine.commit(engine.stage({name: torch.ones(1, 1, 3, 3)}, version=1))
        assert result(engine, version=1) == 9.0
    finally:
        engine.backend.close()
