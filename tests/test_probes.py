"""Behaviour probes: outputs of the *staged* set checked in PREPARE, before the vote. Wrong weights
of the right form (a transposed square matrix, weights that overflow to Inf, a step too large)
are refused naming the probe, and the fleet is unchanged (I2, I4); a correct refit passes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fleet_models import ClientLoad, converged, fleet_config

from engines import BuilderConfig, Probe, ProbeFailed, build_engine, load_probes, save_probes
from engines.probes import check_probe_outputs

N = 8


def _square(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((N, N)).astype(np.float32) * 0.3


def _x(seed: int = 0, rows: int = 4) -> np.ndarray:
    return np.random.default_rng(100 + seed).standard_normal((rows, N)).astype(np.float32)


def _expects(w: np.ndarray, name: str = "square") -> Probe:
    x = _x()
    return Probe(name, [x], expected=[x @ w.T], atol=1e-5, rtol=1e-4)


def _engine() -> Any:
    lin = torch.nn.Linear(N, N, bias=False)
    return build_engine(torch.nn.Sequential(lin), [torch.ones(2, N)],
                        BuilderConfig(enable_refit=True, dynamic_batch=(1, 8)))


# ----------------------------------------------------------------------------- without Ray


def test_a_probe_names_the_output_the_max_diff_and_the_tolerance() -> None:
    w = _square(1)
    probe = _expects(w)
    assert check_probe_outputs(probe, [_x() @ w.T]) is None
    why = check_probe_outputs(probe, [_x() @ w])  # transposed
    assert why is not None and why.startswith("probe 'square' output 0: max |diff| ")
    assert "atol 1e-05 + rtol 0.0001" in why
    assert "not finite" in (check_probe_outputs(Probe("f", [_x()]), [np.array([1.0, np.inf])]) or "")
    drift = Probe("drift", [_x()], max_drift=0.1, finite=False)
    assert check_probe_outputs(drift, [np.zeros(3)], live=[np.full(3, 0.05)]) is None
    assert "max_drift 0.1" in (check_probe_outputs(drift, [np.zeros(3)], live=[np.ones(3)]) or "")


@pytest.mark.parametrize("kwargs, says", [
    ({"name": ""}, "non-empty name"),
    ({"inputs": []}, "probe 'p': no inputs"),
    ({"inputs": [np.array(["a"])]}, "probe 'p': input 0 has dtype <U1"),
    ({"atol": -1.0}, "probe 'p': atol must be a finite number >= 0"),
    ({"max_drift": float("nan")}, "probe 'p': max_drift must be"),
    ({"finite": False}, "probe 'p' checks nothing"),
])
def test_bad_probes_are_refused_naming_the_probe(kwargs: dict, says: str) -> None:
    fields = {"name": "p", "inputs": [_x()], **kwargs}
    with pytest.raises(ValueError, match=says):
        Probe(**fields)


def test_probes_survive_a_file(tmp_path: Path) -> None:
    w = _square(2)
    saved = [_expects(w), Probe("overflow", [np.full((1, N), 1e10, np.float32)]),
             Probe("drift", [_x(3)], max_drift=0.5, finite=False)]
    save_probes(saved, tmp_path / "probes.safetensors")
    loaded = load_probes(tmp_path / "probes.safetensors")
    assert [p.name for p in loaded] == ["square", "overflow", "drift"]
    assert np.array_equal(loaded[0].expected[0], saved[0].expected[0]) and loaded[2].max_drift == 0.5
    assert loaded[2].finite is False and loaded[1].expected is None
    (tmp_path / "plain.safetensors").write_bytes((tmp_path / "probes.safetensors").read_bytes()[:40])
    with pytest.raises(ValueError, match="plain.safetensors"):
        load_probes(tmp_path / "plain.safetensors")


def test_an_engine_probes_the_staged_set_never_the_live_one() -> None:
    engine = _engine()
    good, bad = _square(4), _square(5)
    engine.refit_now({"0.weight": good})
    staged = engine.stage({"0.weight": bad.T.copy()}, version=2)
    with pytest.raises(ProbeFailed, match="probe 'square' output 0: max"):
        engine.check_probes(staged, [_expects(bad)])
    engine.check_probes(staged, [_expects(bad.T.copy())])  # what was staged, not what is live
    engine.discard(staged)
    assert engine.version == 1 and np.allclose(engine.infer(_x()).outputs[0], _x() @ good.T, atol=1e-6)


# ----------------------------------------------------------------------------- through the fleet


@pytest.fixture(scope="module")
def probed_fleet(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from cluster import Fleet

    root = tmp_path_factory.mktemp("probes")
    _engine().save(root / "square.engine")
    # the config's probes file: outputs of a large input must stay finite
    save_probes([Probe("overflow", [np.full((1, N), 1e10, np.float32)])], root / "probes.safetensors")
    fleet = Fleet.launch(fleet_config(root / "square.engine", root, probes=str(root / "probes.safetensors")))
    fleet.refit({"0.weight": _square(10)})
    yield fleet
    fleet.shutdown()


def _refused(fleet: Any, weights: np.ndarray, probes: list[Probe] | None, says: str) -> None:
    from cluster import RefitAborted

    before = converged(fleet)
    out_before = fleet.infer(_x()).outputs[0]
    with ClientLoad(fleet, inputs=np.zeros((1, N), np.float32)) as load, \
            pytest.raises(RefitAborted, match=says) as info:
        fleet.refit({"0.weight": weights}, probes=probes)
    load.check(min_responses=1)
    assert all(v.startswith("NO") or v.startswith("YES") for v in info.value.votes.values())
    after = converged(fleet)
    assert after["version"] == before["version"]
    assert np.array_equal(fleet.infer(_x()).outputs[0], out_before)
    assert all(r["staged_bytes"] == 0 for r in after["replicas"])  # staged sets freed


def test_transposed_square_weights_are_refused_by_an_expected_probe(probed_fleet: Any) -> None:
    w = _square(11)
    _refused(probed_fleet, w.T.copy(), [_expects(w)],
             r"probe 'square' output 0: max \|diff\| [0-9.e+-]+ exceeds the tolerance \(atol 1e-05")


def test_weights_whose_outputs_overflow_are_refused_by_the_configs_finite_probe(probed_fleet: Any) -> None:
    _refused(probed_fleet, np.full((N, N), 1e30, np.float32), None,
             "probe 'overflow' output 0: 8 of 8 values are not finite")


def test_a_step_beyond_max_drift_is_refused_and_a_small_one_passes(probed_fleet: Any) -> None:
    live = converged(probed_fleet)["version"]
    current = _square(10)  # what the fixture refit
    drift = Probe("drift", [_x(7)], max_drift=0.05, finite=False)
    _refused(probed_fleet, current + 0.5, [drift], "probe 'drift' output 0: max |diff| .* from the live "
             "version exceeds max_drift 0.05")
    res = probed_fleet.refit({"0.weight": current + 0.001}, probes=[drift])
    assert res.version > live


def test_a_correct_refit_passes_every_probe_and_serves(probed_fleet: Any) -> None:
    w = _square(12)
    with ClientLoad(probed_fleet, inputs=np.zeros((1, N), np.float32)) as load:
        res = probed_fleet.refit({"0.weight": w}, probes=[_expects(w)])
    load.check(min_responses=1)
    assert converged(probed_fleet)["version"] == res.version
    assert np.allclose(probed_fleet.infer(_x()).outputs[0], _x() @ w.T, atol=1e-5)
    timings = [t for t in res.replicas.values() if "probes_s" in t]
    assert timings, res.replicas  # the verifying replica ran them


def test_a_fleet_whose_probes_file_cannot_be_read_is_refused_at_launch_naming_it(
        ray_session: None, tmp_path: Path) -> None:
    from cluster import Fleet

    _engine().save(tmp_path / "square.engine")
    (tmp_path / "probes.safetensors").write_bytes(b"not a safetensors file")
    cfg = fleet_config(tmp_path / "square.engine", tmp_path, probes=str(tmp_path / "probes.safetensors"))
    with pytest.raises(ValueError, match="probes file .*probes.safetensors"):
        Fleet.launch(cfg)
    assert not (tmp_path / cfg.name).exists()  # refused before the state dir was made
