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
    """``PROBE_WEIGHTS`` weights read at different points of one forward; all equal in a version."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.zeros(PROBE_WIDTH)) for _ in range(PROBE_WEIGHTS)])

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


def build_probe_engine(path: Path) -> None:
    build_engine(Probe(), [torch.ones(PROBE_WIDTH)], BuilderConfig(enable_refit=True)).save(path)


def probe_weights(value: float) -> dict[str, np.ndarray]:
    return {f"w.{i}": np.full(PROBE_WIDTH, value, np.float32) for i in range(PROBE_WEIGHTS)}


def probe_input() -> np.ndarray:
    return np.ones(PROBE_WIDTH, np.float32)


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
