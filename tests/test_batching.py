"""Batched serving: concurrent requests joined along the engine's dynamic batch dim.

``Batcher`` alone (no Ray: a recording run function), then through a fleet of real actors under
concurrent clients and refits: every response equals its own request's eager output, names one
version per batch (I1 per batch), and requests were in fact joined. A fleet asked to batch an
engine without a dynamic batch dim is refused at launch, naming the input."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from actors.batcher import Batcher, BatchingError
from engines import BuilderConfig, InputError, build_engine


class Recorder:
    """A run function: doubles its inputs, remembers every batch size, answers a version; the
    first ``hold`` calls wait on ``gate`` so that requests pile up behind them."""

    def __init__(self, hold: int = 0) -> None:
        self.sizes: list[int] = []
        self.version = 7
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.hold = hold

    def __call__(self, joined: list[np.ndarray]) -> tuple[list[np.ndarray], int]:
        self.sizes.append(int(joined[0].shape[0]))
        if len(self.sizes) <= self.hold:
            self.entered.set()
            self.gate.wait(30)
        return [j * 2 for j in joined], self.version


def _submit_all(batcher: Batcher, requests: list[list[np.ndarray]]) -> list[Any]:
    with ThreadPoolExecutor(len(requests)) as pool:
        return [f.result(timeout=30) for f in [pool.submit(batcher.submit, r) for r in requests]]


def _pile_up(batcher: Batcher, run: Recorder, requests: list[list[np.ndarray]]) -> list[Any]:
    """Hold the batcher in a first run (a full batch: it runs at once), queue ``requests`` behind
    it, then let go."""
    with ThreadPoolExecutor(len(requests) + 1) as pool:
        first = pool.submit(batcher.submit, [np.zeros((batcher.max_batch_size, 2), np.float32)])
        assert run.entered.wait(30)
        futures = [pool.submit(batcher.submit, r) for r in requests]
        while len(batcher._queue) < len(requests):  # every request queued (no sleep: polled)
            threading.Event().wait(0.001)
        run.gate.set()
        first.result(timeout=30)
        return [f.result(timeout=30) for f in futures]


def test_requests_that_arrive_together_run_as_one_batch_and_each_gets_its_own_rows() -> None:
    run = Recorder(hold=1)
    batcher = Batcher(run, max_batch_size=8, max_wait_s=30.0)
    requests = [[np.full((1, 2), float(i), np.float32)] for i in range(8)]
    answers = _pile_up(batcher, run, requests)
    assert run.sizes == [8, 8]  # the held run, then all eight at once (a full batch needs no wait)
    for i, (outputs, version) in enumerate(answers):
        assert version == 7
        assert outputs[0].shape == (1, 2) and np.all(outputs[0] == 2.0 * i)
    assert batcher.stats.as_dict() == {"batches": 2, "requests": 9, "largest": 8}
    batcher.stop()


def test_a_batch_never_exceeds_max_batch_size_and_keeps_arrival_order() -> None:
    run = Recorder(hold=1)
    batcher = Batcher(run, max_batch_size=8, max_wait_s=0.0)
    requests = [[np.full((3, 2), float(i), np.float32)] for i in range(5)]
    answers = _pile_up(batcher, run, requests)
    assert run.sizes[1:] == [6, 6, 3]  # 3+3, 3+3, 3: never 9
    for i, (outputs, _) in enumerate(answers):
        assert outputs[0].shape == (3, 2) and np.all(outputs[0] == 2.0 * i)


def test_requests_of_other_shapes_or_dtypes_beyond_the_batch_dim_are_not_joined() -> None:
    run = Recorder(hold=1)
    batcher = Batcher(run, max_batch_size=16, max_wait_s=0.0)
    requests = [[np.ones((1, 2), np.float32)], [np.ones((1, 3), np.float32)],
                [np.ones((1, 2), np.float64)], [np.ones((2, 2), np.float32)]]
    answers = _pile_up(batcher, run, requests)
    assert sorted(run.sizes[1:]) == [1, 1, 3]  # (1,2)+(2,2) float32 together; the others alone
    assert [a[0][0].shape for a in answers] == [(1, 2), (1, 3), (1, 2), (2, 2)]


def test_a_request_alone_runs_after_max_wait_and_one_above_the_batch_size_runs_alone() -> None:
    run = Recorder()
    batcher = Batcher(run, max_batch_size=4, max_wait_s=0.001)
    outputs, version = batcher.submit([np.ones((1, 2), np.float32)])
    assert outputs[0].shape == (1, 2) and version == 7
    outputs, _ = batcher.submit([np.ones((9, 2), np.float32)])
    assert outputs[0].shape == (9, 2) and run.sizes == [1, 9]


def test_what_a_batch_raises_reaches_every_request_in_it() -> None:
    def fails(joined: list[np.ndarray]) -> tuple[list[np.ndarray], int]:
        raise RuntimeError("the card fell over")

    batcher = Batcher(fails, max_batch_size=4, max_wait_s=0.01)
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(batcher.submit, [np.ones((1, 2), np.float32)]) for _ in range(3)]
        for f in futures:
            with pytest.raises(RuntimeError, match="fell over"):
                f.result(timeout=30)


def test_an_output_without_the_batch_dim_fails_its_batch_saying_so() -> None:
    batcher = Batcher(lambda joined: ([np.float32(1.0) * np.ones(())], 1), max_batch_size=4, max_wait_s=0.0)
    with pytest.raises(BatchingError, match="output 0 has shape \\[\\]: no batch dim 0"):
        batcher.submit([np.ones((2, 2), np.float32)])


def test_bad_batcher_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        Batcher(Recorder(), max_batch_size=0, max_wait_s=0.01)


# ----------------------------------------------------------------------------- through the fleet

WIDTH = 64


class BatchProbe(torch.nn.Module):
    """Rows of x times four weights read at different points: all equal in a version, so a row
    whose outputs disagree is torn, and a row's value says which version produced it."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(WIDTH)) for _ in range(4)])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = []
        h = x
        for w in self.w:
            h = torch.tanh(h) * 0 + x
            outs.append(h * w)
        return tuple(outs)


def _weights(value: float) -> dict[str, np.ndarray]:
    return {f"w.{i}": np.full(WIDTH, value, np.float32) for i in range(4)}


@pytest.fixture(scope="module")
def batch_engine_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("batching") / "probe.engine"
    build_engine(BatchProbe(), [torch.ones(1, WIDTH)],
                 BuilderConfig(enable_refit=True, dynamic_batch=(1, 32))).save(path)
    return path


@pytest.fixture(scope="module")
def batching_fleet(ray_session: None, batch_engine_path: Path, tmp_path_factory: pytest.TempPathFactory):
    from fleet_models import fleet_config

    from cluster import Fleet

    cfg = fleet_config(batch_engine_path, tmp_path_factory.mktemp("fleet"),
                       batching={"max_batch_size": 16, "max_wait_ms": 20})
    fleet = Fleet.launch(cfg)
    yield fleet
    fleet.shutdown()


def test_concurrent_requests_are_joined_and_every_answer_is_its_own_under_refits(batching_fleet: Any) -> None:
    from cluster import Fleet

    stop = threading.Event()
    problems: list[str] = []
    seen: list[tuple[int, float]] = []

    def client(k: int) -> None:
        handle = Fleet.connect(batching_fleet.name, batching_fleet.namespace)
        rows = 1 + k % 3
        x = np.tile(np.arange(1, rows + 1, dtype=np.float32)[:, None], (1, WIDTH))
        last = 0
        while not stop.is_set():
            try:
                r = handle.infer(x)
            except Exception as exc:  # noqa: BLE001  (every failure is a finding)
                problems.append(f"{type(exc).__name__}: {exc}")
                continue
            outs = np.stack(r.outputs)  # (4 weights, rows, WIDTH)
            value = float(outs[0, 0, 0])
            if outs.shape != (4, rows, WIDTH) or not np.all(outs == outs[:, :, :1] * 0 + outs[:1, :, :1]):
                problems.append(f"torn or misshapen answer {outs.shape}")
            elif not np.allclose(outs[0, :, 0], value * np.arange(1, rows + 1)):
                problems.append("rows of another request")
            if r.version < last:
                problems.append("versions went backwards")
            last = r.version
            seen.append((r.version, value))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(12)]
    for t in threads:
        t.start()
    values: dict[int, float] = {}
    try:
        for step in range(1, 6):
            res = batching_fleet.refit(_weights(float(step)))
            values[res.version] = float(step)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not problems, problems[:5]
    for version, value in seen:  # a batch ran on one weight set: its value is its version's
        assert value == values.get(version, 0.0), (version, value)
    assert len(seen) > 50
    stats = [r["batching"] for r in batching_fleet.status()["replicas"]]
    assert all(s["max_batch_size"] == 16 for s in stats)
    assert sum(s["requests"] for s in stats) > sum(s["batches"] for s in stats)  # joined
    assert max(s["largest"] for s in stats) > 3  # more than one request's rows in a run


def test_a_bad_request_gets_its_own_input_error_and_does_not_fail_the_others(batching_fleet: Any) -> None:
    from cluster import Fleet

    handle = Fleet.connect(batching_fleet.name, batching_fleet.namespace)
    with ThreadPoolExecutor(6) as pool:
        good = [pool.submit(handle.infer, np.ones((2, WIDTH), np.float32)) for _ in range(5)]
        bad = pool.submit(handle.infer, np.ones((2, WIDTH + 1), np.float32))
        with pytest.raises(InputError, match="input 'x'"):
            bad.result(timeout=60)
        assert all(f.result(timeout=60).outputs[0].shape == (2, WIDTH) for f in good)


@pytest.mark.parametrize("dynamic, batching, said", [
    (None, {"max_batch_size": 4}, "input 'x' of .* has dim 0 fixed at 1"),
    ((1, 8), {"max_batch_size": 16}, r"max_batch_size=16 exceeds input 'x': its dim 0 \(batch\) takes 1..8"),
])
def test_batching_an_engine_without_a_dynamic_batch_dim_is_refused_at_launch_naming_the_input(
        ray_session: None, tmp_path: Path, dynamic: Any, batching: dict, said: str) -> None:
    from fleet_models import fleet_config

    from cluster import BatchingUnsupported, Fleet

    path = tmp_path / "probe.engine"
    build_engine(BatchProbe(), [torch.ones(1, WIDTH)],
                 BuilderConfig(enable_refit=True, dynamic_batch=dynamic)).save(path)
    with pytest.raises(BatchingUnsupported, match=said) as info:
        Fleet.launch(fleet_config(path, tmp_path, batching=batching))
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("batching, field", [({"max_batch_size": 0}, "max_batch_size"),
                                             ({"max_batch_size": 4, "max_wait_ms": -1}, "max_wait_ms"),
                                             ({"max_batch_size": 4, "wait": 1}, "wait")])
def test_a_bad_batching_config_is_refused_naming_the_field(tmp_path: Path, batching: dict,
                                                           field: str) -> None:
    from fleet_models import fleet_config

    with pytest.raises(ValueError, match=field):
        fleet_config(tmp_path / "any.engine", tmp_path, batching=batching)
