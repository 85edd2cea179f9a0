"""The engine and the multi-thread sample on a CUDA GPU. Skipped where torch sees no GPU."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from engines import BuilderConfig, build_engine, load_engine

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch sees none)"),
]

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
K, N = 4, 1 << 16


class _Layers(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        for i in range(K):
            setattr(self, f"w{i}", torch.nn.Parameter(torch.zeros(N)))

    def forward(self, x: torch.Tensor):
        outs, h = [], x
        for i in range(K):
            h = torch.tanh(h) + 1.0
            outs.append(x * getattr(self, f"w{i}"))
        outs.append(h)
        return outs


NAMES = [f"w{i}" for i in range(K)]
X = torch.ones(N)


@pytest.fixture
def fast_switching():
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


@pytest.mark.parametrize("mode", ["swap", "copy"])
def test_build_refit_save_load_on_cuda(mode, tmp_path):
    engine = build_engine(_Layers(), [X], BuilderConfig(enable_refit=True, device="cuda", memory_mode=mode))
    assert all(t.device.type == "cuda" for t in engine.weights().values())
    r = engine.infer(X.numpy())
    assert r.version == 0
    assert all(np.all(o == 0) for o in r.outputs[:K])
    fit = engine.create_refitter()
    for n in NAMES:
        fit.set_named_weights(n, torch.full((N,), 3.0))  # host tensors, copied to the device
    assert fit.refit() == 1
    r = engine.infer(X)
    assert r.version == 1
    assert all(np.all(o == 3.0) for o in r.outputs[:K])
    staged = engine.stage({"w0": torch.full((N,), 5.0, device="cuda")}, version=2)
    assert staged.nbytes == N * 4
    assert engine.infer(X).version == 1
    engine.commit(staged)
    assert float(engine.infer(X).outputs[0][0]) == 5.0
    engine.save(tmp_path / "gpu.engine")
    loaded = load_engine(tmp_path / "gpu.engine", device="cuda")
    assert loaded.version == 2
    np.testing.assert_array_equal(loaded.infer(X).outputs[0], engine.infer(X).outputs[0])
    on_cpu = load_engine(tmp_path / "gpu.engine", device="cpu")
    np.testing.assert_array_equal(on_cpu.infer(X).outputs[0], engine.infer(X).outputs[0])


@pytest.mark.parametrize("mode", ["swap", "copy"])
def test_concurrency_smoke_on_cuda(fast_switching, mode):
    engine = build_engine(_Layers(), [X], BuilderConfig(enable_refit=True, device="cuda", memory_mode=mode))
    refits, readers = 60, 3
    done = threading.Event()
    errors: list[BaseException] = []
    torn: list[tuple[int, list[float]]] = []
    versions: list[list[int]] = [[] for _ in range(readers)]

    def reader(idx: int) -> None:
        try:
            while True:
                final = done.is_set()
                r = engine.infer(X)
                if any(not np.all(o == float(r.version)) for o in r.outputs[:K]):
                    torn.append((r.version, [float(o[0]) for o in r.outputs[:K]]))
                versions[idx].append(r.version)
                if final:
                    return
        except BaseException as exc:
            errors.append(exc)

    def refitter() -> None:
        try:
            for v in range(1, refits + 1):
                engine.commit(engine.stage({n: torch.full((N,), float(v)) for n in NAMES}, version=v))
        except BaseException as exc:
            errors.append(exc)
        finally:
            done.set()

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(readers)]
    threads.append(threading.Thread(target=refitter))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert torn == [], torn[:3]
    for seen in versions:
        assert seen == sorted(seen)
        assert seen[-1] == refits


def test_multi_thread_sample_on_cuda(tmp_path):
    engine = tmp_path / "conv.engine"
    subprocess.run([sys.executable, str(SCRIPTS / "gen_model.py"),
                    "--weights", str(tmp_path / "w.safetensors"), "--out", str(engine), "--device", "cuda"],
                   check=True, cwd=tmp_path, timeout=300)
    proc = subprocess.run([sys.executable, str(SCRIPTS / "multi_thread.py"), "--interval", "0.05",
                           "--engine", str(engine), "--device", "cuda"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    print(proc.stdout)  # quoted in the closing note of the engine issue
    assert proc.returncode == 0, proc.stdout + proc.stderr
    seen = [float(m) for m in re.findall(r"result: (-?[\d.]+)", proc.stdout)]
    assert seen == [9.0 * k for k in range(10)]
