"""Sample 3 (the seed's single_thread): infer, refit the kernel to all 1, infer again.

Input all 1 and kernel all 0 print ``result: 0``; after ``create_refitter()``,
``set_named_weights("conv.weight", ones)`` and ``refit()`` the same engine prints ``result: 9``.
The engine file is built first (gen_model.py) if it is missing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _conv import DEFAULT_ENGINE, WEIGHT_NAME, data_info, example_input, kernel, load_or_build


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", type=Path, default=DEFAULT_ENGINE,
                        help="engine file (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda[:N] or mlu[:N] (default: %(default)s)")
    args = parser.parse_args(argv)

    engine = load_or_build(args.engine, args.device)
    x = example_input()
    inp = x.flatten().tolist()

    r = engine.infer(x)
    before = engine.weights()[WEIGHT_NAME].flatten().tolist()
    print(data_info(inp, before, float(r.outputs[0].flatten()[0])))

    print("--- weight refit ---")
    fit = engine.create_refitter()
    fit.set_named_weights(WEIGHT_NAME, kernel(1))
    fit.refit()

    r = engine.infer(x)
    after = engine.weights()[WEIGHT_NAME].flatten().tolist()
    print(data_info(inp, after, float(r.outputs[0].flatten()[0])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
