"""Dynamic shapes: engines built with dynamic dims serve every size in their ranges, record their
input specs, and refuse an input that does not fit before anything runs (``InputError``), on one
engine and through the fleet (at once, not retried elsewhere, no replica marked unhealthy)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.export import Dim

from engines import BuilderConfig, DimSpec, InputError, build_engine, load_engine
from engines.engine_file import read_engine_file, read_engine_metadata, write_engine_file


class Masked(torch.nn.Module):
    """A linear layer over a sequence, masked: two inputs sharing batch and sequence dims."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.proj(x) * mask.unsqueeze(-1)


def _inputs(batch: int, seq: int = 5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(batch * 100 + seq)
    x = rng.standard_normal((batch, seq, 4)).astype(np.float32)
    return x, (rng.random((batch, seq)) > 0.3).astype(np.float32)


def _eager(module: torch.nn.Module, *inputs: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(*(torch.from_numpy(x) for x in inputs)).numpy()


@pytest.fixture(scope="module")
def batch_engine() -> Any:
    return build_engine(Masked(), [torch.ones(1, 5, 4), torch.ones(1, 5)],
                        BuilderConfig(enable_refit=True, dynamic_batch=(1, 64)))


def test_a_dynamic_batch_engine_serves_every_batch_size_in_its_range_as_the_eager_model_does(
        batch_engine: Any) -> None:
    model = Masked().eval()
    for batch in (1, 3, 64):
        x, mask = _inputs(batch)
        r = batch_engine.infer(x, mask)
        assert r.outputs[0].shape == (batch, 5, 3)
        assert np.max(np.abs(r.outputs[0] - _eager(model, x, mask))) <= 1e-5
    specs = batch_engine.input_specs()
    assert [s.name for s in specs] == ["x", "mask"]
    assert specs[0].shape == (DimSpec(dim="batch", min=1, max=64), 5, 4)
    assert specs[1].describe() == "float32[batch[1..64], 5]"


def test_torch_exports_own_dynamic_shapes_spec_is_taken_and_its_dims_keep_their_names() -> None:
    batch, seq = Dim("batch", min=1, max=8), Dim("seq", min=2, max=128)
    engine = build_engine(Masked(), [torch.ones(2, 5, 4), torch.ones(2, 5)], BuilderConfig(enable_refit=True),
                          dynamic_shapes={"x": {0: batch, 1: seq}, "mask": {0: batch, 1: seq}})
    assert [s.describe() for s in engine.input_specs()] == ["float32[batch[1..8], seq[2..128], 4]",
                                                            "float32[batch[1..8], seq[2..128]]"]
    x, mask = _inputs(8, 100)
    assert np.max(np.abs(engine.infer(x, mask).outputs[0] - _eager(Masked().eval(), x, mask))) <= 1e-5


def _refusal(engine: Any, *inputs: Any) -> InputError:
    before = engine.version, {n: t.clone() for n, t in engine.weights().items()}
    with pytest.raises(InputError) as info:
        engine.infer(*inputs)
    assert isinstance(info.value, ValueError)
    assert "Guard failed" not in str(info.value)  # refused by the engine, not by the program
    assert engine.version == before[0]
    assert all(torch.equal(t, before[1][n]) for n, t in engine.weights().items())
    return info.value


F32 = np.float32
MASK1 = np.ones((1, 5), F32)


@pytest.mark.parametrize("case, inputs, name, said", [
    ("batch above the range", _inputs(65), "x", "dim 0 (batch) is 65, outside 1..64"),
    ("a fixed dim of another size", _inputs(4, 6), "x", "dim 1 is 6, expected 5"),
    ("wrong rank", (np.ones((4, 5), F32), np.ones((4, 5), F32)), "x", "rank 2, expected rank 3"),
    ("wrong dtype", (np.ones((4, 5, 4)), np.ones((4, 5), F32)), "x", "dtype float64 (no implicit casts)"),
    ("inputs disagree on batch", (_inputs(4)[0], _inputs(3)[1]), "mask", "but input 'x' has batch = 4"),
    ("a string", ("hello", MASK1), "x", "got a str"),
    ("a dict", ({"x": 1}, MASK1), "x", "got a dict"),
    ("an object array", (np.array([object()]), MASK1), "x", "dtype object"),
    ("one input too few", (np.ones((1, 5, 4), F32),), "(inputs)", "expected 2 input(s) (x, mask), got 1"),
])
def test_inputs_outside_the_spec_are_refused_naming_the_input_the_spec_and_what_was_given(
        batch_engine: Any, case: str, inputs: tuple[Any, ...], name: str, said: str) -> None:
    err = _refusal(batch_engine, *inputs)
    assert err.name == name, case
    assert said in str(err), (case, str(err))
    if name != "(inputs)":
        assert "expected float32[batch[1..64]" in str(err)


def test_a_static_engine_refuses_another_batch_with_an_input_error_not_a_guard_failure() -> None:
    """The issue's own example: built with a batch-1 example, called with a batch of 4."""
    engine = build_engine(Masked(), [torch.ones(1, 5, 4), torch.ones(1, 5)], BuilderConfig(enable_refit=True))
    err = _refusal(engine, *_inputs(4))
    assert str(err) == "input 'x': expected float32[1, 5, 4], got shape [4, 5, 4]: dim 0 is 4, expected 1"


def test_the_engine_file_records_the_input_specs_and_a_loaded_engine_checks_them(batch_engine: Any,
                                                                                 tmp_path: Path) -> None:
    path = tmp_path / "masked.engine"
    batch_engine.save(path)
    recorded = read_engine_metadata(path).inputs
    assert recorded is not None and recorded[0]["shape"][0] == {"dim": "batch", "min": 1, "max": 64}
    loaded = load_engine(path)
    assert loaded.input_specs() == batch_engine.input_specs()
    assert loaded.infer(*_inputs(17)).outputs[0].shape == (17, 5, 3)
    _refusal(loaded, *_inputs(65))


def _with_recorded_inputs(engine: Any, path: Path, inputs: list[dict] | None) -> Path:
    """``engine`` saved to ``path``, its file's recorded input specs replaced by ``inputs``."""
    engine.save(path)
    ef = read_engine_file(path)
    ef.inputs = inputs
    write_engine_file(path, ef)
    return path


def test_an_engine_file_without_recorded_inputs_reads_them_from_its_program(batch_engine: Any,
                                                                             tmp_path: Path) -> None:
    path = _with_recorded_inputs(batch_engine, tmp_path / "masked.engine", None)  # as written before
    loaded = load_engine(path)
    specs = loaded.input_specs()
    assert [s.name for s in specs] == ["x", "mask"]
    dim = specs[0].shape[0]
    assert isinstance(dim, DimSpec) and (dim.min, dim.max) == (1, 64)  # named after its symbol
    assert specs[1].shape[0] == dim
    _refusal(loaded, *_inputs(65))


def test_an_engine_file_whose_recorded_inputs_are_malformed_is_refused_naming_it(batch_engine: Any,
                                                                                  tmp_path: Path) -> None:
    from engines import EngineFileError

    path = _with_recorded_inputs(batch_engine, tmp_path / "masked.engine",
                                 [{"name": "x", "dtype": "float32", "shape": [{"dim": "batch", "min": -1}]}])
    with pytest.raises(EngineFileError, match="metadata 'inputs'"):
        load_engine(path)


def test_refits_keep_working_on_a_dynamic_engine(batch_engine: Any) -> None:
    manifest = batch_engine.manifest()
    doubled = {n: t * 2 for n, t in batch_engine.weights().items()}
    version = batch_engine.version + 1
    batch_engine.commit(batch_engine.stage(doubled, version))
    assert batch_engine.manifest() == manifest  # the weights' shapes stay fixed
    x, mask = _inputs(9)
    model = Masked().eval()
    model.load_state_dict({n: t for n, t in doubled.items()})
    assert np.max(np.abs(batch_engine.infer(x, mask).outputs[0] - _eager(model, x, mask))) <= 1e-5


@pytest.mark.parametrize("bounds", [(0, 4), (5, 4)])
def test_a_dynamic_batch_range_must_start_at_one_or_more_and_not_be_empty(bounds: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="dynamic_batch"):
        BuilderConfig(dynamic_batch=bounds)


# ----------------------------------------------------------------------------- through the fleet


@pytest.fixture(scope="module")
def dynamic_fleet(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from fleet_models import fleet_config

    from cluster import Fleet

    root = tmp_path_factory.mktemp("dynamic")
    build_engine(Masked(), [torch.ones(1, 5, 4), torch.ones(1, 5)],
                 BuilderConfig(enable_refit=True, dynamic_batch=(1, 64))).save(root / "masked.engine")
    fleet = Fleet.launch(fleet_config(root / "masked.engine", root))
    yield fleet
    fleet.shutdown()


def test_the_fleet_serves_every_batch_size_and_reports_the_input_specs(dynamic_fleet: Any) -> None:
    model = Masked().eval()
    for batch in (1, 8, 64):
        x, mask = _inputs(batch)
        r = dynamic_fleet.infer(x, mask)
        assert np.max(np.abs(r.outputs[0] - _eager(model, x, mask))) <= 1e-5
    for replica in dynamic_fleet.status()["replicas"]:
        assert replica["inputs"] == [{"name": "x", "spec": "float32[batch[1..64], 5, 4]"},
                                     {"name": "mask", "spec": "float32[batch[1..64], 5]"}]


def test_a_bad_input_reaches_the_caller_as_its_input_error_at_once_without_retries_or_unhealthy_marks(
        dynamic_fleet: Any) -> None:
    from cluster import Fleet

    handle = Fleet.connect(dynamic_fleet.name, dynamic_fleet.namespace)
    router = handle.router
    picked: list[str] = []
    pick = router._pick

    def counting(skip: set[str], group: Any = None) -> Any:
        out = pick(skip, group)
        picked.append(out[0])
        return out

    router._pick = counting  # type: ignore[method-assign]
    with pytest.raises(InputError, match="dim 0 \\(batch\\) is 65, outside 1..64") as info:
        handle.infer(*_inputs(65))
    assert info.value.name == "x"
    assert len(picked) == 1, picked  # not retried on another replica
    assert router._unhealthy_until == {}
    assert all(r["healthy"] for r in dynamic_fleet.status()["replicas"])
    assert handle.infer(*_inputs(2)).outputs[0].shape == (2, 5, 3)
    status_json = json.dumps(dynamic_fleet.status())
    assert "batch[1..64]" in status_json
