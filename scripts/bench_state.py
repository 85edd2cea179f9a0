"""What keeping a fleet's state in object storage costs a refit (issue 15).

The default 2-replica CPU fleet with the seed's conv (36 bytes, so the refit is all fixed cost) is
refitted ``--refits`` times with its state in a local directory, then with its state in moto's
S3 server on 127.0.0.1 (``moto[server]``, the test extra): there each refit's COMMIT record (and
the records before it) is uploaded before it counts, and its checkpoint is written as objects.
Both ``durability`` modes; medians, in one run.

    python scripts/bench_state.py --json benchmarks/results/state-DATE.json
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "tests"))  # the S3 test server

from bench_history import provenance, write_json  # noqa: E402


def measure(engine: Path, weight: str, state: str, options: dict[str, Any], durability: str,
            refits: int) -> float:
    from _conv import kernel

    from cluster import Fleet, FleetConfig

    name = f"state{abs(hash((state, durability))) % 10**8}"
    cfg = FleetConfig(name=name, engine=str(engine), replicas=2, state_dir=state, state_options=options,
                      durability=durability, timeouts={"lease_s": 2})
    fleet = Fleet.launch(cfg)
    try:
        times = []
        for i in range(refits + 3):
            t = time.perf_counter()
            fleet.refit({weight: kernel(float(i))})
            if i >= 3:  # the first refits warm up
                times.append(time.perf_counter() - t)
        return statistics.median(times)
    finally:
        fleet.shutdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--refits", type=int, default=30)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    import ray
    from _conv import build_engine_file, save_zero_weights
    from s3_server import S3Server

    root = Path(tempfile.mkdtemp(prefix="bench-state-"))
    s3 = S3Server()
    rows = []
    try:
        names = list(save_zero_weights(root / "conv.safetensors"))
        build_engine_file(root / "conv.safetensors", root / "conv.engine", "cpu")
        ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="ERROR")
        for durability in ("replicated", "disk"):
            local = measure(root / "conv.engine", names[0], str(root / f"local-{durability}"), {}, durability,
                            args.refits)
            remote = measure(root / "conv.engine", names[0], s3.bucket(f"state-{durability}") + "/fleet",
                             s3.options, durability, args.refits)
            rows.append({"durability": durability, "local_s": local, "s3_s": remote,
                         "s3_over_local": remote / local})
            print(f"{durability:>10}: local {local * 1e3:.1f} ms, s3 {remote * 1e3:.1f} ms "
                  f"({remote / local:.2f}x)", flush=True)
    finally:
        ray.shutdown()
        s3.stop()
        shutil.rmtree(root, ignore_errors=True)
    return write_json(args.json, {**provenance("state"), "model": "conv (36 bytes)", "replicas": 2,
                                  "refits": args.refits, "rows": rows})


if __name__ == "__main__":
    raise SystemExit(main())
