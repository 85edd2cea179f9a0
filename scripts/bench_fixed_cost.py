"""The fixed cost of a refit and of a launch, on the default fleet (configs/local-cpu.yaml: 2 CPU
replicas, a private local Ray), for the seed's conv (one 36-byte kernel) and a model of 200 small
tensors (50 kB).

Each model runs in its own fresh command (``--child``), timed from the moment the parent spawns it:
interpreter start and imports, then ``Fleet.launch`` (Ray start included; its steps from
``Fleet.launch_timings``), the first response, then ``--refits`` refits of new weights. Each refit's
wall time (the ``Fleet.refit`` call) is split into the driver's steps (load and validate, checksum,
``ray.put``), the coordinator's steps (``RefitResult.timings["coordinator.*"]``: BEGIN record,
checkpoint write started, PREPARE round, tally, COMMIT record, COMMIT round, ACTIVATE round,
ACTIVATED record) and the rest (the driver -> coordinator call and its reply). Medians are reported.
Then ``--refits / 2`` (at least 5) settled refits: each starts once the previous version's checkpoint
is written (``Fleet.wait_persisted``, not timed), so that no background write overlaps it, as in a
loop that refits every few seconds.

    python scripts/bench_fixed_cost.py --json benchmarks/results/fixed-cost-2026-12-02.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def child(model: str, workdir: Path, refits: int, spawned: float) -> dict[str, Any]:
    import_start = time.time()
    sys.path.insert(0, str(REPO))
    from cluster import Fleet, FleetConfig  # what `weight-refit launch` imports: no torch

    imported = time.time()
    engine = workdir / f"{model}.engine"
    cfg = FleetConfig.from_yaml(REPO / "configs" / "local-cpu.yaml")
    cfg = cfg.model_copy(update={"name": f"fixed-{model}", "engine": str(engine),
                                 "state_dir": str(workdir / f"state-{model}")})
    fleet = Fleet.launch(cfg)
    launched = time.time()
    import numpy as np

    example = np.ones((1, 1, 3, 3), np.float32) if model == "conv" else np.ones(64, np.float32)
    fleet.infer(example)
    served = time.time()
    import torch

    names = list(fleet.manifest())
    shapes = {n: tuple(fleet.manifest()[n]["shape"]) for n in names}
    rows = []
    for i in range(refits):
        weights = {n: torch.full(shapes[n], float(i + 1)) for n in names}
        res = fleet.refit(weights)
        rows.append({"wall_s": res.duration_s, **res.timings})
    settled = []
    for i in range(max(5, refits // 2)):
        fleet.wait_persisted(res.version, 60)
        res = fleet.refit({n: torch.full(shapes[n], -float(i + 1)) for n in names})
        settled.append(res.duration_s)
    probed = []
    if model == "conv":  # what one behaviour probe adds: refits with and without one, alternating
        from cluster import Probe

        for i in range(refits):
            value = float(refits + i + 1)
            probe = Probe("conv", [example], expected=[np.full((1, 1, 1, 1), 9 * value, np.float32)])
            res = fleet.refit({n: torch.full(shapes[n], value) for n in names},
                              probes=[probe] if i % 2 else None)
            ran = [t.get("probes_s", 0.0) for t in res.replicas.values()]
            probed.append({"probe": bool(i % 2), "wall_s": res.duration_s, "probes_s": max(ran, default=0.0)})
    fleet.shutdown()
    return {"model": model, "tensors": len(names),
            "bytes": int(sum(np.prod(s) for s in shapes.values()) * 4),
            "launch": {"process_start_s": import_start - spawned, "imports_s": imported - import_start,
                       "fleet_launch_s": launched - imported, "steps": fleet.launch_timings,
                       "first_response_s": served - launched, "total_s": served - spawned},
            "refits": rows, "settled": settled, "probed": probed}


def probe_cost(rows: list[dict[str, Any]]) -> dict[str, float] | None:
    """Median refit with and without one behaviour probe (alternating refits), and the probe's run."""
    if not rows:
        return None
    with_probe = [r for r in rows[2:] if r["probe"]]
    without = [r for r in rows[2:] if not r["probe"]]
    return {"with_probe_median_s": statistics.median(r["wall_s"] for r in with_probe),
            "without_median_s": statistics.median(r["wall_s"] for r in without),
            "probe_run_median_s": statistics.median(r["probes_s"] for r in with_probe)}


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    rows = result["refits"][3:] or result["refits"]  # the first few warm the paths up
    keys = [k for k in rows[0] if isinstance(rows[0][k], float)]
    med = {k: statistics.median(r.get(k, 0.0) for r in rows) for k in keys}
    driver = sum(med.get(k, 0.0) for k in ("load_validate_s", "checksum_s", "put_s"))
    coordinator = {k.split(".", 1)[1]: v for k, v in med.items() if k.startswith("coordinator.")}
    settled = result.get("settled") or []
    return {"refit_median_s": med["wall_s"], "refits_measured": len(rows),
            "settled_median_s": statistics.median(settled) if settled else None,
            "driver_s": driver, "driver_steps": {k: med.get(k, 0.0) for k in ("load_validate_s", "checksum_s",
                                                                              "put_s")},
            "coordinator_s": med.get("coordinator_s", 0.0), "coordinator_steps": coordinator,
            "call_and_reply_s": med["wall_s"] - driver - med.get("coordinator_s", 0.0),
            "probe": probe_cost(result.get("probed") or [])}


def build_engines(workdir: Path) -> None:
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "scripts"))
    import torch
    from _conv import ConvModel
    from bench_history import ManySmallTensors

    from engines import BuilderConfig, build_engine

    config = BuilderConfig(enable_refit=True)
    build_engine(ConvModel(), [torch.ones(1, 1, 3, 3)], config).save(workdir / "conv.engine")
    build_engine(ManySmallTensors(), [torch.ones(64)], config).save(workdir / "many.engine")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--refits", type=int, default=40)
    p.add_argument("--json", type=Path)
    p.add_argument("--child", nargs=3, metavar=("MODEL", "WORKDIR", "SPAWNED"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        model, workdir, spawned = args.child
        print(json.dumps(child(model, Path(workdir), args.refits, float(spawned))))
        return 0
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-fixed-") as tmp:
        build_engines(Path(tmp))
        for model in ("conv", "many"):
            cmd = [sys.executable, __file__, "--refits", str(args.refits), "--child", model, tmp,
                   repr(time.time())]
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                return 1
            res = json.loads(out.stdout.strip().splitlines()[-1])
            res["summary"] = summarise(res)
            results.append(res)
            s, la = res["summary"], res["launch"]
            print(f"{model}: {res['tensors']} tensors, {res['bytes']} bytes: refit median "
                  f"{s['refit_median_s'] * 1e3:.1f} ms (driver {s['driver_s'] * 1e3:.1f}, coordinator "
                  f"{s['coordinator_s'] * 1e3:.1f}, call {s['call_and_reply_s'] * 1e3:.1f}); settled "
                  f"{s['settled_median_s'] * 1e3:.1f} ms; launch {la['total_s']:.2f} s from the command")
            if s["probe"]:
                pc = s["probe"]
                print(f"   with one behaviour probe: {pc['with_probe_median_s'] * 1e3:.1f} ms against "
                      f"{pc['without_median_s'] * 1e3:.1f} ms without (the probe's run "
                      f"{pc['probe_run_median_s'] * 1e3:.2f} ms)")
            steps = s["coordinator_steps"].items()
            print("   coordinator: " + ", ".join(f"{k} {v * 1e3:.2f}" for k, v in steps))
            parts = [("process", la["process_start_s"]), ("imports", la["imports_s"]), *la["steps"].items(),
                     ("first response", la["first_response_s"])]
            print("   launch: " + ", ".join(f"{k} {v:.2f}" for k, v in parts))
    sys.path.insert(0, str(REPO / "scripts"))
    from bench_history import provenance, write_json

    doc = {**provenance("fixed-cost"), "results": results}
    return write_json(args.json, doc)


if __name__ == "__main__":
    raise SystemExit(main())
