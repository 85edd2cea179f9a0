"""Sample 2 (the seed's gen_model): build the refittable engine file from the conv model's weights.

Like MagicMind's build with ``{"enable_refit": true}``: the engine is exported through
``torch.export`` with ``BuilderConfig(enable_refit=True)`` and saved to one engine file. The
weights file is generated first (gen_pytorch_model.py) if it is missing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _conv import DEFAULT_ENGINE, DEFAULT_WEIGHTS, build_engine_file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS,
                        help="the pytorch model's safetensors weights (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_ENGINE,
                        help="engine file to write (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda[:N] or mlu[:N] (default: %(default)s)")
    args = parser.parse_args(argv)
    build_engine_file(args.weights, args.out, args.device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
