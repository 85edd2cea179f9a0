"""Membership changes on a live fleet under load: newcomers catch up first, leavers drain."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
from fleet_models import ClientLoad, converged, fleet_config, probe_input, probe_value, probe_weights

from cluster import Fleet


@pytest.fixture
def fleet(ray_session: None, probe_engine_path: Path, tmp_path: Path):
    f = Fleet.launch(fleet_config(probe_engine_path, tmp_path, replicas=2,
                                  timeouts={"lease_s": 2, "request_s": 15, "launch_s": 60}))
    yield f
    f.shutdown()


def test_scale_up_catches_newcomers_up_before_they_serve(fleet: Fleet) -> None:
    for v in (2.0, 3.0, 4.0):
        fleet.refit(probe_weights(v))
    with ClientLoad(fleet) as load:
        out = fleet.scale(4)
        assert out["added"] == ["r2", "r3"]
        st = converged(fleet)
        assert len(st["replicas"]) == 4
        # the newcomers serve the active version, not the engine file's
        for rid in out["added"]:
            h = ray.get(fleet._coord.member_handles.remote())[rid]
            r = ray.get(h.infer.remote([probe_input()], 0))
            assert not r["stale"] and r["version"] == st["version"]
            assert probe_value(r["outputs"]) == 4.0
        res = fleet.refit(probe_weights(5.0))
        assert set(res.replicas) == {"r0", "r1", "r2", "r3"}
    load.check()


def test_scale_down_drains_and_keeps_serving(fleet: Fleet) -> None:
    fleet.scale(3)
    fleet.refit(probe_weights(6.0))
    with ClientLoad(fleet, clients=3) as load:
        out = fleet.scale(1)
        assert out["removed"] == ["r2", "r1"]
        st = converged(fleet)
        assert [r["id"] for r in st["replicas"]] == ["r0"]
        res = fleet.refit(probe_weights(7.0))
        assert set(res.replicas) == {"r0"}
        assert {probe_value(fleet.infer(probe_input()).outputs) for _ in range(4)} == {7.0}
    load.check()
    history = [h for h in fleet.history() if h["status"] == "committed"]
    assert history[-1]["version"] == res.version
