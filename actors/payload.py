"""How a weight version travels through Ray's object store.

The caller puts one object holding ``name -> numpy array`` (numpy has no bf16, so 16-bit floats
travel as int16 views and are viewed back by dtype name). Numpy arrays are stored out of band, so
every replica on a node maps the same shared-memory copy without copying it (zero-copy reads).
The refs travel nested in a list so that the coordinator forwards them without fetching the
bytes, and each replica fetches under its own timeout.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from engines.manifest import dtype_name, torch_dtype

# the fetched arrays are read-only shared memory, and nothing writes to them: staged as copies, or
# served as they are in shared mode (a process-wide filter: catch_warnings is not thread-safe)
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning,
                        module=__name__)

_VIEW_AS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.bool: torch.uint8}


def to_wire(tensors: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Numpy views of CPU tensors (no copy for contiguous CPU tensors)."""
    out = {}
    for name, t in tensors.items():
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        view = _VIEW_AS.get(t.dtype)
        out[name] = (t.view(view) if view is not None else t).numpy()
    return out


def from_wire(arrays: Mapping[str, np.ndarray], specs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Tensors sharing memory with the (read-only) arrays, in the dtypes ``specs`` name."""
    out = {}
    for name, arr in arrays.items():
        spec = specs[name]
        dtype = torch_dtype(spec["dtype"] if isinstance(spec, Mapping) else spec.dtype)
        t = torch.from_numpy(arr)
        out[name] = t.view(dtype) if t.dtype != dtype else t
    return out


def spec_dict(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """``name -> {"shape": [...], "dtype": "float32"}``: the manifest as it travels."""
    return {n: {"shape": list(t.shape), "dtype": dtype_name(t.dtype)} for n, t in tensors.items()}


@dataclass
class Publication:
    """A version put into the object store once: refs (nested), specs, checksums, size."""

    refs: list[Any]
    specs: dict[str, dict[str, Any]]
    checksums: dict[str, str]
    nbytes: int
    timings: dict[str, float] = field(default_factory=dict)
