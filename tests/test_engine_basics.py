"""Build, save, load, infer, versions, bf16, weight sources and name mapping of the engine.

Real engines on the CPU, real files in tmp_path; nothing is mocked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from engines import (
    BuilderConfig,
    DtypeMismatchError,
    EngineFileError,
    UnknownWeightError,
    build_engine,
    load_engine,
)


class _SmallNet(torch.nn.Module):
    """Conv -> ReLU -> Linear, with a persistent buffer: parameters and buffers are both weights."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(1, 2, 3, bias=True)
        self.fc = torch.nn.Linear(8, 3)
        self.register_buffer("scale", torch.tensor([2.0, 3.0, 4.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).flatten(1)
        return self.fc(h) * self.scale


X = torch.linspace(-1, 1, 16).reshape(1, 1, 4, 4)


def _build(module: torch.nn.Module | None = None, **cfg) -> tuple[torch.nn.Module, object]:
    module = module or _SmallNet()
    engine = build_engine(module, [X], BuilderConfig(enable_refit=True, **cfg))
    return module, engine


def _expected(module: torch.nn.Module, x: torch.Tensor = X) -> np.ndarray:
    with torch.no_grad():
        return module(x).numpy()


def _scaled_state(module: torch.nn.Module, factor: float) -> dict[str, torch.Tensor]:
    return {k: (v * factor).contiguous() for k, v in module.state_dict().items()}


# ------------------------------------------------------------------------- build / save / load


def test_infer_on_cpu_matches_the_module_and_returns_numpy():
    module, engine = _build()
    r = engine.infer(X.numpy())  # numpy in
    assert r.version == 0
    assert len(r.outputs) == 1
    assert isinstance(r.outputs[0], np.ndarray)
    assert r.outputs[0].dtype == np.float32
    np.testing.assert_allclose(r.outputs[0], _expected(module), rtol=1e-6, atol=1e-6)
    r2 = engine.infer(X)  # torch in, same answer
    np.testing.assert_array_equal(r2.outputs[0], r.outputs[0])


def test_manifest_lists_every_parameter_and_buffer():
    module, engine = _build()
    m = engine.manifest()
    assert set(m) == set(module.state_dict())
    assert m["conv.weight"].shape == (2, 1, 3, 3)
    assert m["scale"].shape == (3,)
    assert all(spec.dtype == "float32" for spec in m.values())
    assert engine.create_refitter().get_all_names() == list(m)


def test_save_load_round_trip_same_outputs_manifest_and_version(tmp_path):
    module, engine = _build()
    engine.refit_now(_scaled_state(module, 0.5))
    engine.refit_now(_scaled_state(module, 2.0))
    assert engine.version == 2
    before = engine.infer(X)
    path = tmp_path / "net.engine"
    engine.save(path)

    loaded = load_engine(path)
    after = loaded.infer(X)
    assert loaded.version == 2
    assert after.version == 2
    np.testing.assert_array_equal(after.outputs[0], before.outputs[0])
    assert loaded.manifest() == engine.manifest()
    assert loaded.config.enable_refit is True
    # the loaded engine is refittable and numbers on from the saved version
    assert loaded.refit_now(_scaled_state(module, 1.0)) == 3
    np.testing.assert_allclose(loaded.infer(X).outputs[0], _expected(module), rtol=1e-6, atol=1e-6)


def test_load_overrides_builder_config(tmp_path):
    _, engine = _build()
    engine.save(tmp_path / "a.engine")
    loaded = load_engine(tmp_path / "a.engine", device="cpu", memory_mode="copy", keep_previous=False)
    assert loaded.config.memory_mode.value == "copy"
    assert loaded.config.keep_previous is False


def test_load_never_needs_the_model_class(tmp_path):
    module, engine = _build()
    path = tmp_path / "net.engine"
    engine.save(path)
    code = textwrap.dedent(f"""
        import json, sys
        import torch
        from engines import load_engine
        e = load_engine({str(path)!r}, device="cpu")
        x = torch.linspace(-1, 1, 16).reshape(1, 1, 4, 4)
        r = e.infer(x)
        leaked = [m for m in sys.modules if "test_engine" in m or "_SmallNet" in m]
        print(json.dumps({{"out": r.outputs[0].tolist(), "version": r.version, "leaked": leaked,
                           "names": sorted(e.manifest())}}))
    """)
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["leaked"] == []
    assert got["version"] == 0
    assert got["names"] == sorted(module.state_dict())
    np.testing.assert_allclose(np.array(got["out"], dtype=np.float32), _expected(module), rtol=1e-6)


def test_engine_file_is_not_a_pickle(tmp_path):
    _, engine = _build()
    path = tmp_path / "net.engine"
    engine.save(path)
    data = path.read_bytes()
    assert not data.startswith(b"PK")  # not torch.save's zip
    # a safetensors file: 8 bytes of header length, then that JSON header (the first byte may be
    # 0x80, a pickle's first byte, by chance: the header's length decides it)
    header_len = int.from_bytes(data[:8], "little")
    assert 8 + header_len <= len(data)
    header = json.loads(data[8:8 + header_len])
    assert data[8:9] == b"{"
    assert header["__metadata__"]["format"] == "weight-refit-engine"


@pytest.mark.parametrize("cut", [0.5, 0.05])
def test_truncated_engine_file_raises_engine_file_error(tmp_path, cut):
    _, engine = _build()
    path = tmp_path / "net.engine"
    engine.save(path)
    data = path.read_bytes()
    bad = tmp_path / "cut.engine"
    bad.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(EngineFileError, match="cut.engine"):
        load_engine(bad)


def test_random_or_foreign_engine_files_raise_engine_file_error(tmp_path):
    rnd = tmp_path / "random.engine"
    rnd.write_bytes(np.random.default_rng(1).bytes(4096))
    with pytest.raises(EngineFileError):
        load_engine(rnd)

    pickled = tmp_path / "pickled.engine"
    torch.save(_SmallNet().state_dict(), pickled)
    with pytest.raises(EngineFileError):
        load_engine(pickled)

    plain = tmp_path / "plain.engine"  # a valid safetensors file without the engine's format tag
    save_file({"w": torch.zeros(3)}, str(plain))
    with pytest.raises(EngineFileError, match="format"):
        load_engine(plain)

    with pytest.raises(EngineFileError, match="does not exist"):
        load_engine(tmp_path / "missing.engine")


# ------------------------------------------------------------------------- versions


def test_versions_grow_with_refit():
    module, engine = _build()
    seen = [engine.infer(X).version]
    for i in range(1, 4):
        fit = engine.create_refitter()
        for name, t in _scaled_state(module, float(i)).items():
            fit.set_named_weights(name, t)
        assert fit.get_missing_names() == []
        assert fit.refit() == i
        seen.append(engine.infer(X).version)
    assert seen == [0, 1, 2, 3]
    assert engine.version == 3
    with torch.no_grad():
        expected = _SmallNet()
        expected.load_state_dict(_scaled_state(module, 3.0))
    np.testing.assert_allclose(engine.infer(X).outputs[0], _expected(expected), rtol=1e-5, atol=1e-6)


def test_refitter_reports_missing_names_and_refits_a_subset():
    module, engine = _build()
    fit = engine.create_refitter()
    assert set(fit.get_missing_names()) == set(module.state_dict())
    fit.set_named_weights("scale", torch.tensor([1.0, 1.0, 1.0]))
    assert "scale" not in fit.get_missing_names()
    assert set(fit.get_missing_names()) == set(module.state_dict()) - {"scale"}
    assert fit.refit() == 1
    module.scale.copy_(torch.ones(3))
    np.testing.assert_allclose(engine.infer(X).outputs[0], _expected(module), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------- bf16


class _Bf16Linear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 3, bias=True).to(torch.bfloat16)
        with torch.no_grad():
            self.fc.weight.fill_(0.5)
            self.fc.bias.fill_(0.25)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


XB = torch.ones(2, 4, dtype=torch.bfloat16)


def test_bf16_manifest_infer_and_refit_with_torch_tensors():
    engine = build_engine(_Bf16Linear(), [XB], BuilderConfig(enable_refit=True))
    m = engine.manifest()
    assert m["fc.weight"].dtype == "bfloat16"
    assert m["fc.bias"].dtype == "bfloat16"
    r = engine.infer(XB)
    assert r.outputs[0].dtype == np.float32  # widened for numpy
    np.testing.assert_array_equal(r.outputs[0], np.full((2, 3), 4 * 0.5 + 0.25, np.float32))

    fit = engine.create_refitter()
    fit.set_named_weights("fc.weight", torch.full((3, 4), 1.5, dtype=torch.bfloat16))
    fit.set_named_weights("fc.bias", torch.full((3,), -0.5, dtype=torch.bfloat16))
    assert fit.refit() == 1
    r = engine.infer(XB)
    assert r.version == 1
    np.testing.assert_array_equal(r.outputs[0], np.full((2, 3), 4 * 1.5 - 0.5, np.float32))
    assert engine.weights()["fc.weight"].dtype == torch.bfloat16


def test_bf16_refit_from_safetensors_file_and_round_trip(tmp_path):
    engine = build_engine(_Bf16Linear(), [XB], BuilderConfig(enable_refit=True))
    wfile = tmp_path / "bf16.safetensors"
    save_file({"fc.weight": torch.full((3, 4), 2.0, dtype=torch.bfloat16),
               "fc.bias": torch.full((3,), 1.0, dtype=torch.bfloat16)}, str(wfile))
    assert engine.refit_now(wfile) == 1
    np.testing.assert_array_equal(engine.infer(XB).outputs[0], np.full((2, 3), 9.0, np.float32))

    engine.save(tmp_path / "bf16.engine")
    loaded = load_engine(tmp_path / "bf16.engine")
    assert loaded.manifest()["fc.weight"].dtype == "bfloat16"
    assert loaded.version == 1
    np.testing.assert_array_equal(loaded.infer(XB).outputs[0], np.full((2, 3), 9.0, np.float32))


def test_bf16_weights_refuse_float32_without_a_cast():
    engine = build_engine(_Bf16Linear(), [XB], BuilderConfig(enable_refit=True))
    with pytest.raises(DtypeMismatchError, match="fc.weight") as info:
        engine.create_refitter().set_named_weights("fc.weight", np.ones((3, 4), np.float32))
    assert info.value.name == "fc.weight"
    assert engine.version == 0


# ------------------------------------------------------------------------- weight sources


def _write_source(kind: str, tensors: dict[str, torch.Tensor], tmp_path):
    if kind == "numpy":
        return {k: v.numpy() for k, v in tensors.items()}
    if kind == "torch":
        return tensors
    if kind == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file(tensors, str(path))
        return path
    if kind == "pt":
        path = tmp_path / "w.pt"
        torch.save(tensors, path)
        return str(path)  # a str path works too
    if kind == "npz":
        path = tmp_path / "w.npz"
        np.savez(path, **{k: v.numpy() for k, v in tensors.items()})
        return path
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["numpy", "torch", "safetensors", "pt", "npz"])
def test_weights_from_every_source(kind, tmp_path):
    module, engine = _build()
    new = _scaled_state(module, -1.5)
    assert engine.refit_now(_write_source(kind, new, tmp_path)) == 1
    for name, t in engine.weights().items():
        torch.testing.assert_close(t, new[name], rtol=0, atol=0)
    module.load_state_dict(new)
    np.testing.assert_allclose(engine.infer(X).outputs[0], _expected(module), rtol=1e-6, atol=1e-6)


class _Wrapper(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = _SmallNet()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def test_strip_prefix_maps_a_wrapped_models_state_dict(tmp_path):
    module, engine = _build()
    wrapped = _Wrapper()
    with torch.no_grad():
        for p in wrapped.parameters():
            p.mul_(3.0)
    state = {k: v.contiguous() for k, v in wrapped.state_dict().items()}
    assert all(k.startswith("inner.") for k in state)
    path = tmp_path / "wrapped.safetensors"
    save_file(state, str(path))

    with pytest.raises(UnknownWeightError, match="inner.") as info:
        engine.stage(path, version=1)
    assert info.value.name.startswith("inner.")
    assert engine.memory().staged_bytes == 0

    staged = engine.stage(path, version=1, strip_prefix="inner.")
    assert set(staged.names) == set(module.state_dict())
    engine.commit(staged)
    np.testing.assert_allclose(engine.infer(X).outputs[0], _expected(wrapped), rtol=1e-5, atol=1e-6)


def test_explicit_mapping_and_add_prefix():
    module, engine = _build()
    new = _scaled_state(module, 0.25)
    renamed = {("w:" + k): v for k, v in new.items()}
    staged = engine.stage(renamed, version=1, mapping={"w:" + k: k for k in new})
    engine.commit(staged)
    for name, t in engine.weights().items():
        torch.testing.assert_close(t, new[name], rtol=0, atol=0)
    bare = {k.removeprefix("fc."): v for k, v in new.items() if k.startswith("fc.")}
    assert engine.refit_now(bare, add_prefix="fc.") == 2
