"""Memory per replica (issue 12): a CPU fleet in ``swap`` mode against ``shared`` mode.

For each memory mode, one fleet of ``--replicas`` CPU replicas on this node serves the benchmark
model (``--size-mib``); ``--refits`` refits of new weights follow, each waited until persisted so
that nothing but the replicas holds a version. Then every replica's proportional set size (PSS,
``/proc/PID/smaps_rollup``: a page mapped by k processes counts 1/k in each) is read, split into
anonymous, file and shared-memory pages, and every replica is asked once that it serves the last
version's values. The process's own footprint is a replica's PSS in a fleet of the same shape
serving a 36-byte model (the seed's conv), measured in the same run.

The target: in ``shared`` mode a replica holds at most ``1.2 * model / replicas per node`` beyond
its footprint, for the one version it serves (``keep_previous: false``); with ``keep_previous``
it holds two versions, so the row with it is shown beside, against twice that.

    python scripts/bench_memory.py --json benchmarks/results/memory-2026-12-02.json
"""

from __future__ import annotations

import argparse
import gc
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_history import provenance, write_json  # noqa: E402
from bench_refit import COLS, StoreProbe, build_model_engine, model_shape  # noqa: E402

MiB = 1 << 20


def log(msg: str) -> None:
    print(f"[bench_memory] {msg}", flush=True)


def pss(pid: int) -> dict[str, int]:
    """PSS of ``pid`` in bytes, with its anonymous, file and shared-memory parts."""
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("Pss", "Pss_Anon", "Pss_File", "Pss_Shmem", "Rss"):
                out[key.lower()] = int(rest.split()[0]) * 1024
    return out


def build_conv(path: Path) -> None:
    from _conv import build_engine_file

    build_engine_file(path.with_suffix(".safetensors"), path, "cpu")


def fleet_memory(name: str, engine: Path, root: Path, mode: str, replicas: int, keep_previous: bool,
                 refits: int, shapes: dict[str, tuple[int, ...]], store: StoreProbe) -> dict[str, Any]:
    from cluster import Fleet, FleetConfig

    cfg = FleetConfig(name=name, engine=str(engine), replicas=replicas, state_dir=str(root / name),
                      memory_mode=mode, keep_previous=keep_previous, torch_threads=1,
                      persist_fsync=False, timeouts={"prepare_s": 300, "launch_s": 600})
    t = time.perf_counter()
    fleet = Fleet.launch(cfg)
    launch_s = time.perf_counter() - t
    try:
        refit_s = []
        value = 0.0
        for i in range(refits):
            value = float(i + 1)
            weights = {n: torch.full(s, value) for n, s in shapes.items()}
            res = fleet.refit(weights)
            refit_s.append(res.duration_s)
            del weights
            fleet.wait_persisted(res.version, timeout=300)
        gc.collect()
        time.sleep(1.0)  # let every process drop what it released (Ray frees objects asynchronously)
        st = fleet.status()
        example = np.ones(COLS, np.float32) if shapes else np.ones((1, 1, 3, 3), np.float32)
        answers = [fleet.infer(example) for _ in range(4 * replicas)]
        mem = {r["id"]: pss(int(r["pid"])) for r in st["replicas"]}
        return {"mode": mode, "store_used_bytes": store.used(), "keep_previous": keep_previous,
                "replicas": replicas, "launch_s": launch_s,
                "refit_median_s": statistics.median(refit_s) if refit_s else None,
                "versions_served": sorted({a.version for a in answers}),
                "values_served": sorted({float(np.asarray(a.outputs[0]).ravel()[0]) for a in answers}),
                "expected_value": value, "per_replica": mem}
    finally:
        fleet.shutdown()


def private(p: dict[str, int]) -> int:
    """A process's pages outside the object store: its anonymous memory and its file pages."""
    return p["pss_anon"] + p["pss_file"]


def summarise(row: dict[str, Any], footprint: dict[str, int], model_bytes: int, mode: str) -> dict[str, Any]:
    """Memory per replica = its private pages beyond the footprint + its share of the object store
    bytes in use (the versions the replicas hold there).

    The store's arena is one shared-memory file that Ray sizes at start; pages of objects it has
    freed stay resident for the next objects, so a process's ``Pss_Shmem`` also counts freed
    pages it once read. It is reported (``pss_median_bytes``) but the bytes the store holds are
    what the versions cost. The target applies to ``shared`` mode only (``met`` is None otherwise)."""
    per = list(row["per_replica"].values())
    n = row["replicas"]
    beyond = statistics.median(private(p) for p in per) - private(footprint)
    store_share = (row["store_used_bytes"] or 0) / n
    each = beyond + store_share
    versions = 2 if row["keep_previous"] else 1
    target = versions * 1.2 * model_bytes / n
    return {**row, "pss_median_bytes": statistics.median(p["pss"] for p in per),
            "private_beyond_footprint_bytes": beyond, "store_share_bytes": store_share,
            "per_replica_bytes": each, "per_replica_over_model": each / model_bytes,
            "target_bytes": target, "met": each <= target if mode == "shared" else None}


def verdict(row: dict[str, Any]) -> str:
    if row["met"] is None:
        return ""
    return f"; target {row['target_bytes'] / MiB:.1f}: {'met' if row['met'] else 'NOT met'}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mib", type=float, default=256)
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--refits", type=int, default=3)
    p.add_argument("--tensors", type=int, default=4)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    import ray

    torch.set_num_threads(1)
    rows_n, model_bytes = model_shape(args.size_mib, args.tensors)
    root = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    rows = []
    try:
        store = int(5 * model_bytes + 256 * MiB)
        ray.init(address="local", num_cpus=2 * args.replicas + 2, object_store_memory=store,
                 include_dashboard=False, logging_level="ERROR")
        probe = StoreProbe()
        engine = root / "model.engine"
        manifest = build_model_engine(engine, args.tensors, rows_n)
        shapes = {n: tuple(s.shape) for n, s in manifest.items()}
        conv = root / "conv.engine"
        build_conv(conv)
        log(f"model {model_bytes / MiB:.0f} MiB in {args.tensors} tensors; {args.replicas} replicas; "
            f"object store {store / MiB:.0f} MiB")
        base = fleet_memory("mem-footprint", conv, root, "shared", args.replicas, False, 0, {}, probe)
        footprint = min(base["per_replica"].values(), key=private)
        log(f"footprint (36-byte model): {footprint['pss'] / MiB:.0f} MiB PSS per replica, "
            f"{private(footprint) / MiB:.0f} MiB outside the object store")
        for mode, keep in (("swap", False), ("shared", False), ("swap", True), ("shared", True)):
            row = fleet_memory(f"mem-{mode}-{int(keep)}", engine, root, mode, args.replicas, keep,
                               args.refits, shapes, probe)
            row = summarise(row, footprint, model_bytes, mode)
            rows.append(row)
            log(f"{mode:6} keep_previous={keep!s:5}: {row['per_replica_bytes'] / MiB:6.1f} MiB per replica "
                f"beyond the footprint ({row['private_beyond_footprint_bytes'] / MiB:.1f} private + "
                f"{row['store_share_bytes'] / MiB:.1f} store share; {row['per_replica_over_model']:.2f} x "
                f"model{verdict(row)}); "
                f"PSS {row['pss_median_bytes'] / MiB:.0f} MiB; refit "
                f"{row['refit_median_s']:.3f} s; serves v{row['versions_served']} "
                f"values {row['values_served']}")
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    doc = {**provenance("memory per replica"),
           "model": {"bytes": model_bytes, "tensors": args.tensors}, "replicas": args.replicas,
           "footprint": footprint, "footprint_detail": base["per_replica"], "rows": rows}
    return write_json(args.json, doc)


if __name__ == "__main__":
    sys.exit(main())
