"""Shared fixtures: one local Ray per test session, engines built on the CPU, fleets per module.

Ray's failure detection is tuned down so that fault tests finish in seconds, not minutes.
Tests that need another cluster shape (multi-node, `ray start --head`) run in subprocesses.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from cluster.placement import CONNECT_RETRY  # noqa: E402

RAY_SYSTEM_CONFIG = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 500,
    "health_check_timeout_ms": 500,
    "health_check_failure_threshold": 3,
    "metrics_report_interval_ms": 500,
    **CONNECT_RETRY,  # a Ray start that loses a connection race waits 0.1 s, not 1 s
}


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """A local Ray shared by every in-process fleet test (start-up costs seconds)."""
    import ray

    if not ray.is_initialized():
        from ray_head import free_port

        os.environ["WEIGHT_REFIT_TEST_METRICS_PORT"] = str(port := free_port())
        ray.init(address="local", num_cpus=4, object_store_memory=512 << 20, include_dashboard=False,
                 log_to_driver=False, _system_config=RAY_SYSTEM_CONFIG, _metrics_export_port=port)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def conv_engine_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The seed's sample: Conv2d 1->1, 3x3, no bias, zero weights, as an engine file."""
    from fleet_models import build_conv_engine

    path = tmp_path_factory.mktemp("engines") / "conv.engine"
    build_conv_engine(path)
    return path


@pytest.fixture(scope="session")
def probe_engine_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model whose outputs reveal a mixed read: every output is x * w_i, all w_i = version."""
    from fleet_models import build_probe_engine

    path = tmp_path_factory.mktemp("engines") / "probe.engine"
    build_probe_engine(path)
    return path


@pytest.fixture(autouse=True)
def _few_threads() -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
