"""Replica catch-up from a live peer against catch-up from the checkpoint store (issue 15).

For each model size, a fleet of 2 CPU replicas on one node is refitted to v1 (``durability:
disk``, so the checkpoint store holds v1 as well). Then r1 is killed (Ray restarts it) ``--reps``
times with each source:

- **peer**: r0 exports v1 into the object store; r1 fetches it, checks every tensor against the
  committed checksums and commits it.
- **store**: r0's export is refused (failpoint ``replica.export``), so r1 reads the checkpoint
  store and checks it against the checkpoint's manifest.

With ``--state s3`` the fleet's state (log and checkpoints) is in object storage: moto's S3
server on 127.0.0.1 (``moto[server]``, the test extra), so the store's side is an HTTP download.

Each kill gives the replica's own catch-up time (``caught_up_from.seconds``: fetch, verify, stage
and commit) and the wall time from the kill until r1 is a healthy member on v1 again (the process
restart and the engine file's load included). Medians per source; the ratio store/peer is
measured in one run, on one fleet.

    python scripts/bench_catch_up.py --sizes 64 256 --state local s3 \
        --json benchmarks/results/catch-up-DATE.json
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

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "tests"))  # the S3 test server

from bench_history import provenance, write_json  # noqa: E402
from bench_refit import COLS, build_model_engine, model_shape  # noqa: E402

TENSORS = 8


def log(msg: str) -> None:
    print(msg, flush=True)


def wait_until(check: Any, timeout_s: float, what: str) -> Any:
    """Poll ``check`` every 50 ms (often enough for these times, rarely enough not to load the
    2 cores the replicas restart on)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if got := check():
                return got
        except Exception:  # noqa: BLE001 - the fleet is busy with the restart: ask again
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{what} did not happen within {timeout_s} s")


def kill_and_time(fleet: Any, handles: dict[str, Any], version: int) -> dict[str, Any]:
    """Kill r1 (Ray restarts it); time until it is a healthy member on ``version`` again."""
    import ray

    old = fleet.status()["replicas"]
    pid = next(r["pid"] for r in old if r["id"] == "r1")
    t = time.perf_counter()
    ray.kill(handles["r1"], no_restart=False)

    def back() -> dict[str, Any] | None:
        r1 = next((r for r in fleet.status()["replicas"] if r["id"] == "r1"), {})
        ok = (r1.get("pid") != pid and r1.get("membership") == "member" and r1.get("version") == version
              and r1.get("healthy") and (r1.get("caught_up_from") or {}).get("version") == version)
        return r1 if ok else None

    r1 = wait_until(back, 180, "r1 back as a healthy member")
    return {"wall_s": time.perf_counter() - t, "catch_up_s": r1["caught_up_from"]["seconds"],
            "source": r1["caught_up_from"]["source"], "skipped": r1["caught_up_from"]["skipped"]}


def measure(size_mib: float, root: Path, reps: int, s3: Any) -> dict[str, Any]:
    import ray

    from cluster import Fleet, FleetConfig

    rows, size_bytes = model_shape(size_mib, TENSORS)
    engine = root / f"m{size_mib:g}.engine"
    if not engine.exists():
        build_model_engine(engine, TENSORS, rows)
    where = "s3" if s3 is not None else "local"
    state = str(root / f"state{size_mib:g}")
    if s3 is not None:
        state = s3.bucket(f"catchup{size_mib:g}") + "/state"
    cfg = FleetConfig(name=f"catchup{size_mib:g}{where}", engine=str(engine), replicas=2, state_dir=state,
                      state_options=s3.options if s3 is not None else {}, durability="disk",
                      timeouts={"lease_s": 2, "launch_s": 180, "prepare_s": 120, "persist_s": 300})
    fleet = Fleet.launch(cfg)
    try:
        fleet.refit({f"w.{i}": torch.full((rows, COLS), 1.0) for i in range(TENSORS)})
        handles = ray.get(fleet._coord.member_handles.remote())
        out: dict[str, Any] = {"size_mib": size_mib, "bytes": size_bytes, "state": where}
        for source, action in (("peer", None), ("store", "raise")):
            ray.get(handles["r0"].arm_failpoint.remote("replica.export", action))
            runs = [kill_and_time(fleet, handles, 1) for _ in range(reps)]
            assert all(r["source"] == source for r in runs), runs
            out[source] = {"catch_up_s": statistics.median(r["catch_up_s"] for r in runs),
                           "wall_s": statistics.median(r["wall_s"] for r in runs), "runs": runs}
            log(f"{size_mib:g} MiB ({where} state) from {source}: "
                f"catch-up {out[source]['catch_up_s']:.3f} s, "
                f"kill to serving {out[source]['wall_s']:.2f} s")
        out["store_over_peer"] = out["store"]["catch_up_s"] / out["peer"]["catch_up_s"]
        return out
    finally:
        fleet.shutdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=float, nargs="+", default=[64, 256], help="model sizes in MiB")
    p.add_argument("--reps", type=int, default=3, help="kills per source and size")
    p.add_argument("--state", nargs="+", choices=["local", "s3"], default=["local", "s3"],
                   help="where the fleet's state is: a local directory, or moto's S3 server")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)

    import ray

    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="bench-catch-up-"))
    rows: list[dict[str, Any]] = []
    try:
        ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="ERROR",
                 object_store_memory=int(max(args.sizes) * 4) << 20)
        for where in args.state:
            s3 = None
            if where == "s3":
                from s3_server import S3Server

                s3 = S3Server()
            try:
                rows += [measure(s, root, args.reps, s3) for s in args.sizes]
            finally:
                if s3 is not None:
                    s3.stop()
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    print(f"{'state':>6} {'MiB':>6} {'peer s':>8} {'store s':>8} {'store/peer':>10} {'peer wall s':>11} "
          f"{'store wall s':>12}")
    for r in rows:
        print(f"{r['state']:>6} {r['size_mib']:>6g} {r['peer']['catch_up_s']:>8.3f} "
              f"{r['store']['catch_up_s']:>8.3f} "
              f"{r['store_over_peer']:>10.2f} {r['peer']['wall_s']:>11.2f} {r['store']['wall_s']:>12.2f}")
    doc = {**provenance("catch-up"), "replicas": 2, "tensors": TENSORS, "rows": rows}
    return write_json(args.json, doc)


if __name__ == "__main__":
    raise SystemExit(main())
