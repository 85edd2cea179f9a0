"""Prometheus metrics through Ray's metrics API, read back from the node's export endpoint."""

from __future__ import annotations

import os
import re
import urllib.request
from pathlib import Path

import pytest
import ray
from fleet_models import fleet_config, probe_input, probe_weights, wait_for

from cluster import Fleet, RefitAborted


def _scrape() -> str:
    port = os.environ["WEIGHT_REFIT_TEST_METRICS_PORT"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def _value(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(re.search(rf'{k}="{re.escape(v)}"', line) for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


@pytest.fixture(scope="module")
def fleet(ray_session: None, probe_engine_path: Path, tmp_path_factory: pytest.TempPathFactory):
    f = Fleet.launch(fleet_config(probe_engine_path, tmp_path_factory.mktemp("state"), replicas=2,
                                  name="metricsfleet"))
    yield f
    f.shutdown()


def test_refit_duration_version_gauge_requests_and_failures(fleet: Fleet) -> None:
    res = fleet.refit(probe_weights(2.0))
    served_by: set[str] = set()
    for _ in range(200):  # at least 5 requests, and until both replicas served one
        served_by.add(fleet.infer(probe_input()).replica)
        if len(served_by) == 2 and _ >= 4:
            break
    assert served_by == {"r0", "r1"}
    handles = ray.get(fleet._coord.member_handles.remote())
    ray.get(handles["r1"].arm_failpoint.remote("replica.before_vote", "raise"))
    with pytest.raises(RefitAborted):
        fleet.refit(probe_weights(3.0))
    ray.get(handles["r1"].arm_failpoint.remote("replica.before_vote", None))

    def exported() -> str | None:
        # every process exports on its own schedule: wait until each value asserted below is in
        text = _scrape()
        ok = (_value(text, "ray_weight_refit_refit_duration_seconds_count", fleet="metricsfleet",
                     outcome="committed")
              and _value(text, "ray_weight_refit_refit_duration_seconds_count", fleet="metricsfleet",
                         outcome="aborted")
              and _value(text, "ray_weight_refit_prepare_failures_total", fleet="metricsfleet")
              and all(_value(text, "ray_weight_refit_active_version", replica=r, fleet="metricsfleet")
                      == res.version for r in ("r0", "r1"))
              and _value(text, "ray_weight_refit_request_latency_seconds_count", fleet="metricsfleet",
                         replica="r0") is not None
              and sum(_value(text, "ray_weight_refit_requests_total", fleet="metricsfleet",
                             replica=r) or 0 for r in ("r0", "r1")) >= 5)
        return text if ok else None

    text = wait_for(exported, 60, "metrics export")
    assert _value(text, "ray_weight_refit_refit_duration_seconds_count", fleet="metricsfleet",
                  outcome="aborted") >= 1
    assert _value(text, "ray_weight_refit_active_version", replica="r0", fleet="metricsfleet") == res.version
    assert _value(text, "ray_weight_refit_prepare_failures_total", fleet="metricsfleet",
                  reason="FailpointError") >= 1
    served = sum(_value(text, "ray_weight_refit_requests_total", fleet="metricsfleet", replica=r) or 0
                 for r in ("r0", "r1"))
    assert served >= 5
    assert _value(text, "ray_weight_refit_request_latency_seconds_count", fleet="metricsfleet",
                  replica="r0") is not None


def test_request_metrics_carry_the_replicas_cohort_never_a_version(fleet: Fleet) -> None:
    from cluster import Canary

    res = fleet.refit(probe_weights(4.0), canary=Canary(replicas=1, traffic=0.5))
    handles = ray.get(fleet._coord.member_handles.remote())

    def labelled() -> str | None:
        for rid in ("r0", "r1"):  # the cohort reaches a replica with its next lease renewal
            ray.get(handles[rid].infer.remote([probe_input()], 0))
        text = _scrape()
        ok = (_value(text, "ray_weight_refit_requests_total", fleet="metricsfleet", replica="r0",
                     cohort="canary")
              and _value(text, "ray_weight_refit_requests_total", fleet="metricsfleet", replica="r1",
                         cohort="main"))
        return text if ok else None

    try:
        text = wait_for(labelled, 60, "requests labelled by cohort")
    finally:
        fleet.promote()
    assert res.canary is not None and res.canary["cohort"] == ["r0"]
    lines = [ln for ln in text.splitlines() if ln.startswith("ray_weight_refit_request")]
    assert lines and not any(re.search(r'[{,]version="', ln) for ln in lines)
    assert all('cohort="' in ln for ln in lines if 'fleet="metricsfleet"' in ln)
