"""Sample 1 (the seed's gen_pytorch_model.py): save the one-conv model's weights (all 0).

One Conv2d, 1 in / 1 out channel, kernel 3x3, stride 1, no bias, weights all 0; input shape
(1, 1, 3, 3). The weights go into a safetensors file (no pickle), which gen_model.py builds from.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _conv import DEFAULT_WEIGHTS, INPUT_SHAPE, save_zero_weights


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_WEIGHTS,
                        help="safetensors file to write (default: %(default)s)")
    args = parser.parse_args(argv)
    state = save_zero_weights(args.out)
    for name, t in state.items():
        print(f"{name}: shape {tuple(t.shape)} dtype {str(t.dtype).removeprefix('torch.')} "
              f"all {t.flatten()[0].item():g}")
    print(f"input shape {INPUT_SHAPE}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
