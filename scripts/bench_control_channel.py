"""What one control round costs a coordinator: a fan-out of one call to every replica and the wait
for all replies, through Ray's task path (what the fleet uses: ``.remote`` and ``ray.wait``/``get``)
against a Ray Compiled Graph (shared-memory channels; ``ray.dag``), from an actor to actors with
the replicas' concurrency groups, on one local Ray of its own. Nothing of the fleet runs: this
measures the transport a PREPARE or COMMIT round would ride on (see docs/benchmarks.md, "Where a
conv refit's milliseconds go").

    python scripts/bench_control_channel.py --rounds 400 --sittings 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any


def _actors(ray: Any) -> tuple[Any, Any]:
    @ray.remote(concurrency_groups={"serve": 2, "control": 2})
    class Member:
        @ray.method(concurrency_group="control")
        def handle(self, message: bytes) -> int:
            return len(message)

    @ray.remote(max_concurrency=4)
    class Caller:
        def __init__(self, members: int) -> None:
            self.members = [Member.remote() for _ in range(members)]
            ray.get([m.handle.remote(b"") for m in self.members])
            self.graph: Any = None

        def compile(self) -> None:
            from ray.dag import InputNode, MultiOutputNode

            with InputNode() as message:
                dag = MultiOutputNode([m.handle.bind(message) for m in self.members])
            self.graph = dag.experimental_compile()

        def rounds(self, n: int, compiled: bool, nbytes: int) -> list[float]:
            message = b"x" * nbytes
            out = []
            for _ in range(n):
                t = time.perf_counter()
                if compiled:
                    ray.get(self.graph.execute(message))
                else:
                    ray.get([m.handle.remote(message) for m in self.members])
                out.append(time.perf_counter() - t)
            return out

        def teardown(self) -> None:
            if self.graph is not None:
                self.graph.teardown()

    return Member, Caller


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--members", type=int, default=2, help="replicas the round reaches (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=400, help="rounds per mode and sitting")
    p.add_argument("--sittings", type=int, default=3, help="alternating sittings of both modes")
    p.add_argument("--bytes", type=int, default=200, help="message size (a sealed PREPARE of the conv: ~200)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    import ray

    ray.init(address="local", num_cpus=max(4, args.members + 2), include_dashboard=False,
             log_to_driver=False, logging_level="ERROR")
    try:
        _, caller_cls = _actors(ray)
        caller = caller_cls.remote(args.members)
        ray.get(caller.compile.remote())
        sittings = []
        for sitting in range(args.sittings):
            row: dict[str, Any] = {"sitting": sitting + 1}
            for mode in ("tasks", "compiled"):
                compiled = mode == "compiled"
                ray.get(caller.rounds.remote(max(10, args.rounds // 8), compiled, args.bytes))  # warm up
                times = sorted(ray.get(caller.rounds.remote(args.rounds, compiled, args.bytes)))
                row[mode] = {"median_ms": statistics.median(times) * 1e3,
                             "p90_ms": times[int(0.9 * (len(times) - 1))] * 1e3}
            row["tasks_over_compiled"] = row["tasks"]["median_ms"] / row["compiled"]["median_ms"]
            sittings.append(row)
            print(f"sitting {sitting + 1}: tasks {row['tasks']['median_ms']:.3f} ms, compiled graph "
                  f"{row['compiled']['median_ms']:.3f} ms (median of {args.rounds} rounds to "
                  f"{args.members} members; {row['tasks_over_compiled']:.1f}x)", flush=True)
        ray.get(caller.teardown.remote())
    finally:
        ray.shutdown()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "benchmark": "control round: Ray tasks against a compiled graph",
            "date": time.strftime("%Y-%m-%d"),
            "members": args.members, "rounds": args.rounds, "message_bytes": args.bytes,
            "machine": {"cpus": os.cpu_count(), "loadavg_1m_end": os.getloadavg()[0]},
            "ray": ray.__version__, "sittings": sittings}, indent=1))
        print(f"JSON written: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
