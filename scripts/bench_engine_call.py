"""What one ``Engine.infer`` call costs beyond the model's arithmetic, on one thread, for the seed's
conv and a stack of 8 ``Linear(256)`` layers: the median over ``--rounds`` rounds of ``--calls``
calls each, after a warm-up; and a standalone ``refit_now`` of new weights, for comparison. Run it
from two checkouts alternately to compare them (this machine is shared: compare within a sitting).

    python scripts/bench_engine_call.py --json benchmarks/results/engine-call.json
    cd /tmp/before && PYTHONPATH=. python /path/to/scripts/bench_engine_call.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from engines import BuilderConfig, build_engine


class Layers(torch.nn.Module):
    def __init__(self, n: int = 8, width: int = 256) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def measure(model: torch.nn.Module, example: torch.Tensor, calls: int, rounds: int,
            refits: int) -> dict[str, float | list[float]]:
    engine = build_engine(model.eval(), [example], BuilderConfig(enable_refit=True))
    args = [example.numpy()]
    for _ in range(min(calls, 300)):
        engine.infer(args)
    per_call = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(calls):
            engine.infer(args)
        per_call.append((time.perf_counter() - t) / calls)
    new = [{n: torch.randn_like(w) for n, w in engine.weights().items()} for _ in range(refits)]
    t = time.perf_counter()
    for weights in new:
        engine.refit_now(weights)
    return {"infer_us": statistics.median(per_call) * 1e6, "infer_us_rounds": [x * 1e6 for x in per_call],
            "refit_now_ms": (time.perf_counter() - t) / max(refits, 1) * 1e3}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=1000, help="calls per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--refits", type=int, default=50)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    models = {"conv": (torch.nn.Conv2d(1, 1, 3, bias=False), torch.ones(1, 1, 3, 3)),
              "8xLinear256": (Layers(), torch.ones(1, 256))}
    result: dict[str, dict] = {name: measure(m, x, args.calls, args.rounds, args.refits)
                               for name, (m, x) in models.items()}
    for name, r in result.items():
        print(f"{name}: infer {r['infer_us']:.1f} us a call (median of {args.rounds} x {args.calls}); "
              f"refit_now {r['refit_now_ms']:.2f} ms")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"benchmark": "engine call", "date": time.strftime("%Y-%m-%d"),
                                         "torch": torch.__version__, "results": result}, indent=1))
        print(f"JSON written: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
