"""Each pass of a settled ``swap`` refit on one node, alone, and the bound they set on this host
against ``bench_refit``'s data-path floor. Medians of ``--reps`` rounds, after one uncounted.

- **copy**: one ``np.copyto`` of the model as one array into memory already touched, the best of
  ``--reps`` (the floor's copy, measured as ``bench_refit`` measures it);
- **put**, three ways, each round keeping the previous round's version in the store as a fleet
  does: the model as **one array** (Ray's put alone), **one object** holding every tensor (plus
  Ray's cost per tensor), and the **buckets** publish puts (plus its cost per ``ray.put``);
- **checks**: publish's checksum-and-scan pass over the stored buckets;
- **replica copies**: ``--replicas`` actors, each copying the stored version into buffers of its
  own on the engine's helper threads (``engines.threads.helpers``), as a replica stages on the
  caller's node (no hash there); one actor alone, then all at once.

``passes_s`` = put (buckets) + checks + replica copies (all at once): a settled ``swap`` refit's
bytes work, one pass after another. ``bound_s`` = put (one array) + checks + replica copies: the
same without Ray's per-object and per-tensor costs. Both are given over ``floor_s`` = copy x
(1 + max(1, replicas / cores)), the floor ``bench_refit`` reports.

    python scripts/bench_passes.py --sizes-mib 256 1024 --replicas 2 --json out.json
    python scripts/bench_passes.py --sizes-mib 8 --replicas 2 --reps 2      # what the smoke test runs

Uses its own local Ray (``address="local"``), never a cluster already running on the machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_history import provenance, write_json  # noqa: E402
from bench_publish import (  # noqa: E402
    median_s,
    model,
    specs_of,
    start_local_ray,
    stored_tensors,
    touch_the_store,
)


def replica_class() -> Any:
    import ray

    @ray.remote(num_cpus=0)
    class ReplicaCopier:
        """A replica's stage copy on the caller's node, without the rest of the replica."""

        def __init__(self, specs: dict[str, Any]) -> None:
            torch.set_num_threads(1)
            self.specs = specs
            self.dst = {n: torch.zeros(tuple(s["shape"])) for n, s in specs.items()}  # float32: model()

        def copy(self, refs: list[Any]) -> float:
            import ray

            from actors.payload import from_wire
            from engines.threads import helpers

            t = time.perf_counter()
            jobs = []
            for wire in ray.get(refs):
                for name, src in from_wire(wire, self.specs).items():
                    jobs.append(helpers().submit(self.dst[name].copy_, src))
            for job in jobs:
                job.result()
            return time.perf_counter() - t

        def first_values(self) -> list[float]:
            return [float(d.reshape(-1)[0]) for d in self.dst.values()]

    return ReplicaCopier


class Puts:
    """``ray.put`` of one version at a time, the previous one held until the next is in (a fleet
    keeps the version it serves while the next is published)."""

    def __init__(self) -> None:
        self.held: list[Any] = []

    def __call__(self, objects: list[Any]) -> list[Any]:
        import ray

        refs = [ray.put(o) for o in objects]
        self.held = refs
        return refs


def measure(size_mib: float, tensors: int, replicas: int, bucket_bytes: int, reps: int) -> dict[str, Any]:
    import ray

    from actors.payload import buckets, to_wire
    from engines.validation import checksums_and_non_finite

    weights = model(int(size_mib * 2**20), tensors)
    specs = specs_of(weights)
    nbytes = sum(t.numel() * t.element_size() for t in weights.values())
    one_array = np.concatenate([t.numpy().reshape(-1) for t in weights.values()])
    dst = np.empty_like(one_array)
    wires = [to_wire(g) for g in buckets(weights, bucket_bytes)]
    row: dict[str, Any] = {"model_bytes": nbytes, "model_mib": nbytes / 2**20, "tensors": tensors,
                           "replicas": replicas, "bucket_mib": bucket_bytes / 2**20, "buckets": len(wires)}
    row["copy_s"] = min(median_s(lambda: np.copyto(dst, one_array), 1) for _ in range(reps))
    puts = Puts()
    row["put_one_array_s"] = median_s(lambda: puts([one_array]), reps)
    row["put_one_object_s"] = median_s(lambda: puts([to_wire(weights)]), reps)
    row["put_buckets_s"] = median_s(lambda: puts(wires), reps)
    refs = puts(wires)
    stored = stored_tensors(refs, specs)
    row["checks_s"] = median_s(lambda: checksums_and_non_finite(stored, scan_values=True), reps)
    stored.clear()
    copiers = [replica_class().remote(specs) for _ in range(replicas)]
    row["replica_copy_alone_s"] = median_s(lambda: ray.get(copiers[0].copy.remote(refs)), reps)
    row["replica_copies_s"] = median_s(lambda: ray.get([c.copy.remote(refs) for c in copiers]), reps)
    expected = [float(t.reshape(-1)[0]) for t in weights.values()]
    held = ray.get([c.first_values.remote() for c in copiers])
    row["replica_copies_match"] = all(v == expected for v in held)
    for c in copiers:
        ray.kill(c)
    row["floor_s"] = row["copy_s"] * (1 + max(1.0, replicas / (os.cpu_count() or 1)))
    row["passes_s"] = row["put_buckets_s"] + row["checks_s"] + row["replica_copies_s"]
    row["bound_s"] = row["put_one_array_s"] + row["checks_s"] + row["replica_copies_s"]
    row["passes_over_floor"] = row["passes_s"] / row["floor_s"]
    row["bound_over_floor"] = row["bound_s"] / row["floor_s"]
    ms = {k: v * 1e3 for k, v in row.items() if k.endswith("_s")}
    print(f"{size_mib:g} MiB x {replicas}: copy {ms['copy_s']:.1f} ms; put as one array "
          f"{ms['put_one_array_s']:.1f}, as one object {ms['put_one_object_s']:.1f}, in {len(wires)} "
          f"buckets {ms['put_buckets_s']:.1f}; checks {ms['checks_s']:.1f}; one replica's copy "
          f"{ms['replica_copy_alone_s']:.1f}, {replicas} at once {ms['replica_copies_s']:.1f}; floor "
          f"{ms['floor_s']:.1f}, passes {ms['passes_s']:.1f} ({row['passes_over_floor']:.2f}x), bound "
          f"{ms['bound_s']:.1f} ({row['bound_over_floor']:.2f}x)", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes-mib", type=float, nargs="+", default=[256.0, 1024.0])
    p.add_argument("--replicas", type=int, nargs="+", default=[2])
    p.add_argument("--tensors", type=int, default=8, help="tensors of equal size (bench_refit's default)")
    p.add_argument("--bucket-mib", type=float, default=64.0, help="the fleet's bucket_bytes, in MiB")
    p.add_argument("--reps", type=int, default=5, help="timed rounds of each, after one uncounted")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)

    import ray

    torch.set_num_threads(1)
    largest = int(max(args.sizes_mib) * 2**20)
    start_local_ray(int(3.5 * largest))  # a version held while the next is put, and room to spare
    try:
        touch_the_store(largest)
        rows = [measure(size, args.tensors, n, int(args.bucket_mib * 2**20), args.reps)
                for size in args.sizes_mib for n in args.replicas]
    finally:
        ray.shutdown()
    return write_json(args.json, {**provenance("passes"), "reps": args.reps, "rows": rows})


if __name__ == "__main__":
    raise SystemExit(main())
