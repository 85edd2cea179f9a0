"""Launch time of the default fleet (configs/local-cpu.yaml, the seed's conv), from the spawn of a
fresh command to its first response, Ray start included; optionally for several checkouts of
the project, run alternately in one sitting (this machine is shared: compare within a run).

Each run is a new Python process that imports ``cluster``, calls ``Fleet.launch`` (a private
Ray of its own), infers once and shuts the fleet down. The steps are ``Fleet.launch_timings``.
With ``--first-refit disk|replicated`` (the fleet's ``durability``) it also refits once right
after the first response, untimed in the launch: ``first_refit_s`` (the call), ``first_checkpoint_s``
(from the call until its checkpoint is durable) and the persistence worker's memory then
(``persist_worker_rss_anon_kib``, ``persist_worker_rss_file_kib``, ``persist_worker_torch``: whether
it has torch loaded).

    python scripts/bench_launch.py --reps 5 --json benchmarks/results/launch.json
    git worktree add /tmp/before REV
    python scripts/bench_launch.py --reps 5 --tree before=/tmp/before --tree after=.
    python scripts/bench_launch.py --reps 3 --first-refit disk --tree before=/tmp/before --tree after=.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, time
spawned, work, repo, durability = float(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
started = time.time()
sys.path.insert(0, repo)
from cluster import Fleet, FleetConfig
imported = time.time()
cfg = FleetConfig.from_yaml(repo + "/configs/local-cpu.yaml")
cfg = cfg.model_copy(update={"name": "launch-bench", "engine": work + "/conv.engine",
                             "state_dir": work + "/state-%d" % time.time_ns(),
                             **({"durability": durability} if durability else {})})
fleet = Fleet.launch(cfg)
launched = time.time()
import numpy as np
fleet.infer(np.ones((1, 1, 3, 3), np.float32))
served = time.time()
first = {}
if durability:
    import os
    import ray
    t = time.perf_counter()
    res = fleet.refit({"conv.weight": np.full((1, 1, 3, 3), 2.0, np.float32)})
    first["first_refit_s"] = time.perf_counter() - t
    fleet.wait_persisted(res.version, 120)
    first["first_checkpoint_s"] = time.perf_counter() - t
    worker = ray.get(fleet._coord.persist_worker.remote())
    pid = ray.get(worker.__ray_call__.remote(lambda self: os.getpid()))
    rss = {ln.split(":")[0]: float(ln.split()[1]) for ln in open("/proc/%d/status" % pid)
           if ln.startswith(("RssAnon", "RssFile"))}
    first.update(persist_worker_rss_anon_kib=rss["RssAnon"], persist_worker_rss_file_kib=rss["RssFile"],
                 persist_worker_torch=float(any("libtorch" in ln for ln in open("/proc/%d/maps" % pid))))
fleet.shutdown()
print("RESULT " + json.dumps({"process_start_s": started - spawned, "imports_s": imported - started,
                              "fleet_launch_s": launched - imported, "first_response_s": served - launched,
                              "total_s": served - spawned, **fleet.launch_timings, **first}))
"""


def build_engine_file(work: Path) -> None:
    sys.path[:0] = [str(REPO), str(REPO / "scripts")]
    import torch
    from _conv import ConvModel

    from engines import BuilderConfig, build_engine

    engine = build_engine(ConvModel(), [torch.ones(1, 1, 3, 3)], BuilderConfig(enable_refit=True))
    engine.save(work / "conv.engine")


def one_launch(tree: Path, work: Path, first_refit: str = "") -> dict[str, float]:
    spawned = time.time()
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "-c", CHILD, str(spawned), str(work), str(tree), first_refit],
                         capture_output=True, text=True, cwd=work, env=env, timeout=300)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"launch in {tree} failed (exit {out.returncode}): {out.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5, help="launches per tree")
    p.add_argument("--tree", action="append", default=[], metavar="NAME=PATH",
                   help="a checkout of the project to time (repeatable); default: this one")
    p.add_argument("--first-refit", choices=["disk", "replicated"], default="",
                   help="refit once after the first response, with this durability (see above)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    trees = dict(t.split("=", 1) for t in args.tree) or {"this": str(REPO)}
    for name, path in trees.items():
        if not (Path(path) / "cluster" / "fleet.py").is_file():
            raise SystemExit(f"--tree {name}={path}: not a checkout of the project (no cluster/fleet.py)")
    work = Path(tempfile.mkdtemp(prefix="bench-launch-"))
    build_engine_file(work)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    for rep in range(args.reps):
        for name, path in trees.items():  # alternately, so that the machine's drift hits each alike
            r = one_launch(Path(path).resolve(), work, args.first_refit)
            runs[name].append(r)
            first = (f"; first refit {r['first_refit_s']:.3f} s, its checkpoint "
                     f"{r['first_checkpoint_s']:.3f} s, persistence worker "
                     f"{r['persist_worker_rss_anon_kib'] / 1024:.0f} MiB anon"
                     if args.first_refit else "")
            print(f"{name} {rep}: total {r['total_s']:.2f} s (ray {r.get('ray_s', 0):.2f}, replicas start "
                  f"{r.get('replicas_start_s', 0):.2f}, join {r.get('replicas_join_s', 0):.2f}){first}",
                  flush=True)
    medians: dict[str, Any] = {}
    for name, rows in runs.items():
        medians[name] = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        m = medians[name]
        print(f"median {name}: total {m['total_s']:.2f} s; imports {m['imports_s']:.2f}, ray "
              f"{m.get('ray_s', 0):.2f}, replicas start {m.get('replicas_start_s', 0):.2f}, join "
              f"{m.get('replicas_join_s', 0):.2f}, first response {m['first_response_s']:.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "benchmark": "launch", "date": time.strftime("%Y-%m-%d"), "reps": args.reps,
            "first_refit": args.first_refit or None,
            "trees": {n: {"path": p, "commit": _commit(Path(p))} for n, p in trees.items()},
            "machine": {"cpus": os.cpu_count(), "loadavg_1m_end": os.getloadavg()[0]},
            "runs": runs, "medians": medians}, indent=1))
        print(f"JSON written: {args.json}")
    return 0


def _commit(tree: Path) -> str | None:
    out = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True)
    return out.stdout.strip() or None


if __name__ == "__main__":
    raise SystemExit(main())
