"""What the seed samples share: the one-conv model, its weight name, default paths, the printout.

The model is the seed's: one Conv2d, 1 input and 1 output channel, kernel 3x3, stride 1, no bias,
weights all 0, input shape (1, 1, 3, 3). With an all-ones input the result is the sum of the kernel.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = REPO_ROOT / "out"
DEFAULT_WEIGHTS = OUT_DIR / "conv.safetensors"
DEFAULT_ENGINE = OUT_DIR / "conv.engine"

INPUT_SHAPE = (1, 1, 3, 3)
KERNEL_SHAPE = (1, 1, 3, 3)
WEIGHT_NAME = "conv.weight"


class ConvModel(torch.nn.Module):
    """One 3x3 convolution, 1 -> 1 channel, stride 1, no bias, weights initialised to 0."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, kernel_size=3, stride=1, bias=False)
        torch.nn.init.zeros_(self.conv.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def example_input() -> torch.Tensor:
    """The samples' input: all ones, shape (1, 1, 3, 3)."""
    return torch.ones(INPUT_SHAPE)


def kernel(value: float) -> torch.Tensor:
    """A kernel with every element ``value`` (float32, the model's dtype)."""
    return torch.full(KERNEL_SHAPE, float(value), dtype=torch.float32)


def _fmt(values: Sequence[float]) -> str:
    return " ".join(f"{v:g}" for v in values)


def data_info(inp: Sequence[float], kern: Sequence[float] | None, result: float) -> str:
    """The C++ samples' ``print_data_info``: the 3x3 input, the 3x3 kernel (optional), the result."""
    inp, rows = list(inp), []
    if kern is None:
        rows.append(f"input: {_fmt(inp[0:3])}  result: {result:g}")
        rows += [f"       {_fmt(inp[i:i + 3])}" for i in (3, 6)]
    else:
        kern = list(kern)
        rows.append(f"input: {_fmt(inp[0:3])}  conv kernel: {_fmt(kern[0:3])}  result: {result:g}")
        rows += [f"       {_fmt(inp[i:i + 3])}               {_fmt(kern[i:i + 3])} " for i in (3, 6)]
    return "\n".join(rows)


def save_zero_weights(path: Path) -> dict[str, torch.Tensor]:
    """Save a fresh ``ConvModel``'s state dict (all zeros) as safetensors; returns it."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in ConvModel().state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return state


def build_engine_file(weights: Path, out: Path, device: str) -> None:
    """Build the refittable engine from a weights file (made first if missing) and save it."""
    from safetensors.torch import load_file

    from engines import BuilderConfig, build_engine

    if not weights.is_file():
        save_zero_weights(weights)
        print(f"wrote {weights} (the pytorch model's weights were missing)")
    model = ConvModel()
    model.load_state_dict(load_file(str(weights)), strict=True)
    engine = build_engine(model, [example_input()], BuilderConfig(enable_refit=True, device=device))
    out.parent.mkdir(parents=True, exist_ok=True)
    engine.save(out)
    names = ", ".join(f"{n} {tuple(s.shape)} {s.dtype}" for n, s in engine.manifest().items())
    print(f"wrote {out} (device {device}, refittable: {names})")


def load_or_build(engine_path: Path, device: str):
    """Load the engine file onto ``device``, building it (and the weights) first if missing."""
    from engines import load_engine

    if not engine_path.is_file():
        build_engine_file(engine_path.with_suffix(".safetensors"), engine_path, device)
    return load_engine(engine_path, device=device)
