#!/usr/bin/env python
"""What background work alone does to serving latency on this machine (no refit at all).

A 2-replica fleet of the refit benchmark's model serves clients (``bench_refit``'s, closed-loop or
open-loop with ``--rate``); between idle windows, a separate process runs one kind of load for
``--window-s`` seconds, and the latencies of the requests inside each window are compared:

- ``copy``: memcpy of 8 MiB blocks over 256 MiB buffers (what a refit's puts and copies do), at
  ``--duty`` (the share of the time it copies; it sleeps in between, as a paced refit would);
- ``copy-cached``: the same copy loop over 256 KiB buffers, which stay in the core's own L2 cache
  (the copy's CPU time without its traffic through the shared L3 cache and memory);
- ``cpu``: a pure-Python loop (CPU time without memory traffic);
- each at nice 19 (``nice``) or at ``SCHED_IDLE`` (``idle``), on any core or pinned to the last
  one (``pinned``), one or two processes.

It answers whether a refit's tail during serving can be fixed by CPU priority, core affinity or
pacing: if background work at the lowest priority still slows requests while it runs, only less
work (or none) while requests run can.

Usage::

    python scripts/bench_background_load.py --json benchmarks/results/background-load.json
    python scripts/bench_background_load.py --rate 100 --json out.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench_refit as bench  # noqa: E402  (the model, the clients and the machine facts)

LOAD = r"""
import os, sys, time
import numpy as np
kind, policy, where, duty = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
if where == "pinned":
    os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
if policy == "idle":
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
else:
    os.nice(19)
print("go", flush=True)
if kind == "cpu":
    while True:
        sum(range(1000))
a = np.ones(256 << 10 if kind == "copy-cached" else 256 << 20, np.uint8)
b = np.empty_like(a)
block = min(8 << 20, a.size)
i = 0
while True:
    t = time.perf_counter()
    at = (i * block) % a.size
    np.copyto(b[at:at + block], a[at:at + block])
    i += 1
    if duty < 1:
        time.sleep((time.perf_counter() - t) * (1 - duty) / duty)
"""

# (label, kind, policy, where, duty, processes)
PLAN = [
    ("copy, nice 19", "copy", "nice", "any", 1.0, 1),
    ("copy, SCHED_IDLE", "copy", "idle", "any", 1.0, 1),
    ("copy, nice 19, pinned", "copy", "nice", "pinned", 1.0, 1),
    ("copy, SCHED_IDLE, pinned", "copy", "idle", "pinned", 1.0, 1),
    ("2 copies, nice 19", "copy", "nice", "any", 1.0, 2),
    ("2 copies, SCHED_IDLE", "copy", "idle", "any", 1.0, 2),
    ("copy, nice 19, duty 0.5", "copy", "nice", "any", 0.5, 1),
    ("copy, nice 19, duty 0.25", "copy", "nice", "any", 0.25, 1),
    ("cached copy, nice 19", "copy-cached", "nice", "any", 1.0, 1),
    ("cached copy, SCHED_IDLE, pinned", "copy-cached", "idle", "pinned", 1.0, 1),
    ("cpu loop, nice 19", "cpu", "nice", "any", 1.0, 1),
    ("cpu loop, SCHED_IDLE", "cpu", "idle", "any", 1.0, 1),
]


def latencies(samples: np.ndarray, a: float, b: float) -> dict[str, Any]:
    inside = (samples[:, 0] >= a) & (samples[:, 1] <= b) & (samples[:, 6] == 0)
    ms = (samples[inside, 1] - samples[inside, 0]) * 1e3
    if not len(ms):
        return {"n": 0}
    return {"n": int(len(ms)), "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2), "max_ms": round(float(ms.max()), 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=float, default=None,
                   help="open-loop load in requests/s (default: closed loop, as bench_refit)")
    p.add_argument("--concurrency", type=int, default=2, help="client threads (default 2)")
    p.add_argument("--window-s", type=float, default=8.0, help="each window's length (default 8 s)")
    p.add_argument("--loads", nargs="+", metavar="LABEL", choices=[row[0] for row in PLAN],
                   help="only these loads, in this order (default: every one): " +
                        "; ".join(repr(row[0]) for row in PLAN))
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    plan = [next(row for row in PLAN if row[0] == label) for label in args.loads] if args.loads else PLAN
    if args.rate is not None and args.rate <= 0:
        p.error(f"--rate {args.rate:g}: expected requests per second above 0")
    import ray

    from cluster import Fleet, FleetConfig

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench-background-"))
    ray.init(address="local", num_cpus=6, object_store_memory=512 << 20, include_dashboard=False,
             log_to_driver=False)
    rows, _ = bench.model_shape(64, 8)
    engine = work / "model.engine"
    bench.build_model_engine(engine, 8, rows)
    fleet = Fleet.launch(FleetConfig(name="background-load", engine=str(engine), replicas=2,
                                     state_dir=str(work / "state"), torch_threads=1))
    clients = bench.Clients("background-load", ray.get_runtime_context().gcs_address, args.concurrency,
                            work / "samples.npz", args.rate)
    windows: list[tuple[str, float, float]] = []

    def window(label: str) -> None:
        time.sleep(min(1.0, args.window_s))  # the load starts (or ends) outside the window
        a = time.monotonic()
        time.sleep(args.window_s)
        windows.append((label, a, time.monotonic()))

    try:
        window("idle")
        for label, kind, policy, where, duty, processes in plan:
            loads = [subprocess.Popen([sys.executable, "-c", LOAD, kind, policy, where, str(duty)],
                                      stdout=subprocess.PIPE, text=True) for _ in range(processes)]
            try:
                for load in loads:
                    load.stdout.readline()
                window(label)
            finally:
                for load in loads:
                    load.kill()
                    load.wait()
            window("idle")
            bench.log(f"{label}: done")
    finally:
        samples, _ = clients.stop()
        fleet.shutdown()
        ray.shutdown()
    results = [{"load": label, **latencies(samples, a, b)} for label, a, b in windows]
    idle_p99 = float(np.median([r["p99_ms"] for r in results if r["load"] == "idle"]))
    for r in results:
        r["p99_over_idle"] = round(r["p99_ms"] / idle_p99, 2) if r.get("p99_ms") else None
        print(f"{r['load']:28s} n {r['n']:5d}  p50 {r.get('p50_ms', 0):6.2f}  "
              f"p99 {r.get('p99_ms', 0):6.2f} ms  ({r['p99_over_idle']}x the idle windows' median p99)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "benchmark": "serving latency beside background load (issue 12)",
            "date": _dt.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]),
            "machine": bench.machine_info(), "code": bench.code_version(),
            "config": {"rate": args.rate, "concurrency": args.concurrency, "window_s": args.window_s,
                       "kernel": os.uname().release},
            "idle_p99_ms": idle_p99, "windows": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
