"""Behaviour probes: inputs run on a *staged* weight set before it may become live, with what its
outputs must be. A set can pass every check of its form (names, shapes, dtypes, finiteness,
checksums) and still be wrong: a transposed square matrix, q/k/v in the wrong order, a scale off
by 1/sqrt(d), weights that overflow to Inf in the outputs. A probe catches what its inputs reach.

``Probe(name, inputs, expected=None, atol=, rtol=, finite=True, max_drift=None)``:
- ``expected``: every output must be close to it (``|out - expected| <= atol + rtol * |expected|``
  elementwise, numpy's ``allclose`` rule), with the same shape.
- ``max_drift``: every output may differ from the *live* set's output on the same inputs by at
  most this much (max |diff|); suits steps of the size an RL loop takes.
- ``finite``: every output must be finite.

``check_probe_outputs`` turns outputs into ``None`` (passed) or the reason, naming the probe, the
output index, the max |diff| and the tolerance. ``save_probes``/``load_probes`` keep probes in one
safetensors file (the fleet config's ``probes:`` key); its format is in ``docs/guarantees.md``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import EngineError

__all__ = ["Probe", "ProbeFailed", "check_probe_outputs", "load_probes", "save_probes"]


class ProbeFailed(EngineError):
    """A staged weight set's outputs on a probe's inputs are not what the probe allows."""

    def __init__(self, probe: str, message: str) -> None:
        super().__init__(message)
        self.probe = probe


def _arrays(name: str, what: str, values: Any) -> list[np.ndarray]:
    if isinstance(values, np.ndarray) or not isinstance(values, Sequence):
        values = [values]
    out = []
    for i, v in enumerate(values):
        try:
            a = np.asarray(v.detach().cpu().float().numpy() if hasattr(v, "detach") else v)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"probe {name!r}: {what} {i} is not an array: {exc}") from None
        if a.dtype == object or a.dtype.kind not in "biuf":
            raise ValueError(f"probe {name!r}: {what} {i} has dtype {a.dtype}, not a number type")
        out.append(a)
    if not out:
        raise ValueError(f"probe {name!r}: no {what}s")
    return out


@dataclass
class Probe:
    """See the module docstring."""

    name: str
    inputs: list[np.ndarray]
    expected: list[np.ndarray] | None = None
    atol: float = 1e-5
    rtol: float = 1e-4
    finite: bool = True
    max_drift: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a probe needs a non-empty name, got {self.name!r}")
        self.inputs = _arrays(self.name, "input", self.inputs)
        if self.expected is not None:
            self.expected = _arrays(self.name, "expected output", self.expected)
        for what in ("atol", "rtol") + (("max_drift",) if self.max_drift is not None else ()):
            value = getattr(self, what)
            if not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
                raise ValueError(f"probe {self.name!r}: {what} must be a finite number >= 0, got {value!r}")
        if self.expected is None and self.max_drift is None and not self.finite:
            raise ValueError(f"probe {self.name!r} checks nothing: give expected, max_drift or finite=True")

    @property
    def needs_live(self) -> bool:
        return self.max_drift is not None


def check_probe_outputs(probe: Probe, outputs: Sequence[np.ndarray],
                        live: Sequence[np.ndarray] | None = None) -> str | None:
    """None when ``outputs`` pass ``probe``, else why not (probe, output index, max |diff|, tolerance)."""
    head = f"probe {probe.name!r}"
    for i, out in enumerate(outputs):
        out = np.asarray(out, dtype=np.float64)
        if probe.finite and not np.isfinite(out).all():
            bad = int(out.size - np.isfinite(out).sum())
            return f"{head} output {i}: {bad} of {out.size} values are not finite (finite=True)"
    if probe.expected is not None:
        if len(outputs) != len(probe.expected):
            return f"{head}: the engine gives {len(outputs)} outputs, the probe expects {len(probe.expected)}"
        for i, (out, want) in enumerate(zip(outputs, probe.expected, strict=True)):
            if out.shape != want.shape:
                return f"{head} output {i}: shape {list(out.shape)}, expected {list(want.shape)}"
            diff = np.abs(np.asarray(out, np.float64) - np.asarray(want, np.float64))
            allowed = probe.atol + probe.rtol * np.abs(np.asarray(want, np.float64))
            if not (diff <= allowed).all():
                return (f"{head} output {i}: max |diff| {float(np.nanmax(diff)):.6g} exceeds the tolerance "
                        f"(atol {probe.atol:g} + rtol {probe.rtol:g} x |expected|)")
    if probe.max_drift is not None and live is not None:
        for i, (out, was) in enumerate(zip(outputs, live, strict=True)):
            drift = float(np.nanmax(np.abs(np.asarray(out, np.float64) - np.asarray(was, np.float64))))
            if not drift <= probe.max_drift:
                return (f"{head} output {i}: max |diff| {drift:.6g} from the live version exceeds "
                        f"max_drift {probe.max_drift:g}")
    return None


_META = "weight_refit_probes"


def save_probes(probes: Sequence[Probe], path: str | os.PathLike) -> None:
    """One safetensors file: tensors ``<probe>.input.<i>`` and ``<probe>.expected.<i>``; the
    metadata key ``weight_refit_probes`` holds ``{probe: {atol, rtol, finite, max_drift}}`` as JSON."""
    from safetensors.numpy import save_file

    tensors: dict[str, np.ndarray] = {}
    meta: dict[str, dict[str, Any]] = {}
    for p in probes:
        if "." in p.name:
            raise ValueError(f"probe {p.name!r}: a probe saved to a file has no '.' in its name")
        for i, a in enumerate(p.inputs):
            tensors[f"{p.name}.input.{i}"] = np.ascontiguousarray(a)
        for i, a in enumerate(p.expected or []):
            tensors[f"{p.name}.expected.{i}"] = np.ascontiguousarray(a)
        meta[p.name] = {"atol": p.atol, "rtol": p.rtol, "finite": p.finite, "max_drift": p.max_drift}
    save_file(tensors, str(path), metadata={_META: json.dumps(meta)})


def load_probes(path: str | os.PathLike) -> list[Probe]:
    """The probes of a file ``save_probes`` wrote; ValueError naming the file and what is wrong."""
    from safetensors import safe_open

    where = f"probes file {str(path)!r}"
    if not Path(path).is_file():
        raise ValueError(f"{where} does not exist or is not a regular file")
    try:
        with safe_open(str(path), framework="numpy") as fh:
            meta = json.loads((fh.metadata() or {})[_META])
            arrays = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118  (a safe_open handle)
    except KeyError:
        raise ValueError(f"{where} has no {_META!r} metadata (write it with save_probes)") from None
    except Exception as exc:
        raise ValueError(f"{where} is not a readable probes file: {exc}") from None
    probes = []
    for name, opts in meta.items():
        def numbered(kind: str, name: str = name) -> list[np.ndarray]:
            found = sorted((int(k.rsplit(".", 1)[1]), a) for k, a in arrays.items()
                           if k.startswith(f"{name}.{kind}."))
            return [a for _, a in found]

        expected = numbered("expected")
        probes.append(Probe(name, numbered("input"), expected or None, atol=opts.get("atol", 1e-5),
                            rtol=opts.get("rtol", 1e-4), finite=opts.get("finite", True),
                            max_drift=opts.get("max_drift")))
    return probes
