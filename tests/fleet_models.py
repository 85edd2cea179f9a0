"""Small models and fleet helpers for the fleet tests (not a test module)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engines import BuilderConfig, build_engine

PROBE_WEIGHTS = 4
PROBE_WIDTH = 256


class Probe(torch.nn.Module):
    """``weights`` weights read at different points of one forward; all equal in a version."""

    def __init__(self, weights: int = PROBE_WEIGHTS, width: int = PROBE_WIDTH) -> None:
        super().__init__()
        self.w = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.zeros(width)) for _ in range(weights)])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = []
        h = x
        for w in self.w:
            h = torch.tanh(h) * 0 + x  # some work between the reads
            outs.append(h * w)
        return tuple(outs)


def build_conv_engine(path: Path) -> None:
    conv = torch.nn.Sequential()
    conv.add_module("conv", torch.nn.Conv2d(1, 1, 3, bias=False))
    torch.nn.init.zeros_(conv.conv.weight)
    build_engine(conv, [torch.ones(1, 1, 3, 3)], BuilderConfig(enable_refit=True)).save(path)


def build_probe_engine(path: Path, weights: int = PROBE_WEIGHTS, width: int = PROBE_WIDTH) -> None:
    build_engine(Probe(weights, width), [torch.ones(width)], BuilderConfig(enable_refit=True)).save(path)


def probe_weights(value: float, weights: int = PROBE_WEIGHTS,
                  width: int = PROBE_WIDTH) -> dict[str, np.ndarray]:
    return {f"w.{i}": np.full(width, value, np.float32) for i in range(weights)}


def probe_input(width: int = PROBE_WIDTH) -> np.ndarray:
    return np.ones(width, np.float32)


def probe_value(outputs: list[np.ndarray]) -> float | None:
    """The one value every output element holds, or None for a torn (mixed) response."""
    first = float(outputs[0].ravel()[0])
    for o in outputs:
        if not np.all(o == first):
            return None
    return first


def fleet_config(engine: Path, state_root: Path, **over: Any) -> Any:
    from cluster import FleetConfig

    name = over.pop("name", f"t{uuid.uuid4().hex[:8]}")
    fields: dict[str, Any] = {
        "name": name, "engine": str(engine), "replicas": 2, "state_dir": str(state_root / name),
        "timeouts": {"prepare_s": 20, "commit_s": 10, "activate_s": 10, "request_s": 20, "launch_s": 60},
    }
    fields.update(over)
    return FleetConfig(**fields)


class ClientLoad:
    """Client threads, each with its own fleet handle, inferring until stopped.

    Records every failure and every response (version, value); ``check()`` asserts none failed,
    none was torn, and no handle saw its versions go backwards.
    """

    def __init__(self, fleet: Any, clients: int = 2, inputs: np.ndarray | None = None) -> None:
        import threading

        from cluster import Fleet

        self._inputs = probe_input() if inputs is None else inputs
        self._stop = threading.Event()
        self.failures: list[str] = []
        self.responses: list[list[tuple[int, float | None]]] = []
        self._handles = [Fleet.connect(fleet.name, fleet.namespace) for _ in range(clients)]
        self._threads = [threading.Thread(target=self._run, args=(h,), daemon=True) for h in self._handles]

    def _run(self, handle: Any) -> None:
        mine: list[tuple[int, float | None]] = []
        self.responses.append(mine)
        while not self._stop.is_set():
            try:
                r = handle.infer(self._inputs)
            except Exception as exc:  # noqa: BLE001  (every failure is a finding)
                self.failures.append(f"{type(exc).__name__}: {exc}")
                continue
            mine.append((r.version, probe_value(r.outputs)))

    def __enter__(self) -> ClientLoad:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)

    def check(self, min_responses: int = 10) -> None:
        assert not self.failures, self.failures[:5]
        total = sum(len(m) for m in self.responses)
        assert total >= min_responses, f"only {total} responses under load"
        for mine in self.responses:
            versions = [v for v, _ in mine]
            assert versions == sorted(versions), "a client handle saw its versions go backwards"
            assert all(val is not None for _, val in mine), "torn response"


def wait_for(predicate: Any, timeout_s: float = 60.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns a truthy value (for state that converges in the
    background: a restarted actor, a re-admitted replica); fail with ``what`` at the deadline."""
    import time

    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except Exception as exc:  # noqa: BLE001  (an actor still restarting)
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


def serving_again(handle: Any, rid: str, timeout_s: float = 60.0) -> None:
    """Wait until a restarted replica serves again: it answers, and it has caught up (a replica
    starts serving nothing, ``loading``, until the coordinator told it which version to serve)."""
    import ray

    wait_for(lambda: ray.get(handle.status.remote(), timeout=2)["state"] == "serving", timeout_s,
             what=f"{rid} restarted and serving")


def converged(fleet: Any) -> dict[str, Any]:
    """Every member on the coordinator's active version with equal checksums (I5); returns status."""
    import ray

    st = fleet.status()
    members = ray.get(fleet._coord.member_handles.remote())
    assert set(members) == {r["id"] for r in st["replicas"]}, st["replicas"]
    assert all(r["version"] == st["version"] for r in st["replicas"]), st["replicas"]
    sums = [ray.get(h.weight_checksums.remote()) for h in members.values()]
    assert all(s == sums[0] for s in sums), "members hold different weights"
    return st
