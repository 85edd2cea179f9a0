"""The caller's half of a refit alone (``cluster.publish.publish``: validate, put into the object
store in buckets, checksum and scan the stored copy), against its parts measured alone in the
same run on the same bytes:

- **copy**: one ``np.copyto`` of the model into memory already touched (the floor's copy);
- **put**: ``ray.put`` of the same buckets publish puts, one after the other, nothing else running;
- **checks**: the checksum-and-scan pass publish runs over the stored buckets, alone;
- **publish**: the whole publication, at each ``--buckets-mib`` (publish hashes bucket k while
  bucket k+1 is put).

``overlap_gain`` = (put + checks) / publish: above 1 where hashing beside the put paid, about 1
where the two share a bound (memory bandwidth, or the cores). Medians of ``--reps`` after one
uncounted round (the destination is touched then; the object store's pages before any).

    python scripts/bench_publish.py --sizes-mib 256 1024 --tensors 64 --json out.json
    python scripts/bench_publish.py --sizes-mib 8 --buckets-mib 4 --reps 2     # what the smoke test runs

Uses its own local Ray (``address="local"``), never a cluster already running on the machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_history import provenance, write_json  # noqa: E402


def model(nbytes: int, tensors: int) -> dict[str, torch.Tensor]:
    """``tensors`` float32 tensors of equal size, ``nbytes`` in all (``bench_refit``'s model)."""
    rows = max(1, nbytes // (tensors * 4 * 1024))
    return {f"w{i}": torch.full((rows, 1024), float(i + 1)) for i in range(tensors)}


def specs_of(weights: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The manifest entries of ``model``'s tensors (float32)."""
    return {n: {"shape": list(t.shape), "dtype": "float32"} for n, t in weights.items()}


def stored_tensors(refs: list[Any], specs: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of the buckets ``refs``, read where they lie in the object store (no copy)."""
    import ray

    from actors.payload import from_wire

    return {n: x for ref in refs for n, x in from_wire(ray.get(ref), specs).items()}


def median_s(fn: Callable[[], Any], reps: int) -> float:
    """Median wall time of ``fn`` over ``reps`` calls, after one uncounted call."""
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(size_mib: float, tensors: int, bucket_mibs: list[float], reps: int) -> dict[str, Any]:
    weights = model(int(size_mib * 2**20), tensors)
    nbytes = sum(t.numel() * t.element_size() for t in weights.values())
    src = [t.numpy() for t in weights.values()]
    dst = [np.empty_like(a) for a in src]
    row: dict[str, Any] = {"model_bytes": nbytes, "model_mib": nbytes / 2**20, "tensors": tensors}
    row["copy_s"] = median_s(lambda: [np.copyto(d, a) for d, a in zip(dst, src, strict=True)], reps)
    row["publish"] = [measure_buckets(weights, int(mib * 2**20), row["copy_s"], reps) for mib in bucket_mibs]
    for p in row["publish"]:
        print(f"{size_mib:g} MiB in {p['buckets']} bucket(s) of {p['bucket_mib']:g} MiB: "
              f"copy {row['copy_s'] * 1e3:.1f} ms, put {p['put_s'] * 1e3:.1f} ms "
              f"({p['put_over_copy']:.2f}x the copy), checks {p['checks_s'] * 1e3:.1f} ms, "
              f"publish {p['publish_s'] * 1e3:.1f} ms ({p['publish_over_copy']:.2f}x the copy; "
              f"(put + checks) / publish {p['overlap_gain']:.2f})", flush=True)
    return row


def measure_buckets(weights: dict[str, torch.Tensor], bucket_bytes: int, copy_s: float,
                    reps: int) -> dict[str, Any]:
    """The put alone, then the checks alone over what it put, then the whole publication, in
    buckets of ``bucket_bytes``: one round of each per rep (all three see the same conditions)."""
    from cluster.publish import CheckedManifest, publish

    specs = specs_of(weights)
    manifest = CheckedManifest.of(specs)
    rounds = []
    for _ in range(reps + 1):  # the first is not counted
        put_s, checks_s, n_buckets = put_then_check(weights, bucket_bytes, specs)
        t = time.perf_counter()
        timings = publish(weights, manifest, bucket_bytes=bucket_bytes).timings
        rounds.append({"put_s": put_s, "checks_s": checks_s, "publish_s": time.perf_counter() - t,
                       "publish_put_wait_s": timings["put_s"],
                       "publish_checks_wait_s": timings["checksum_s"]})
    out: dict[str, Any] = {"bucket_mib": bucket_bytes / 2**20, "buckets": n_buckets}
    out.update({k: statistics.median(r[k] for r in rounds[1:]) for k in rounds[0]})
    out["overlap_gain"] = statistics.median((r["put_s"] + r["checks_s"]) / r["publish_s"] for r in rounds[1:])
    out["publish_over_copy"] = out["publish_s"] / copy_s
    out["put_over_copy"] = out["put_s"] / copy_s
    return out


def put_then_check(weights: dict[str, torch.Tensor], bucket_bytes: int,
                   specs: dict[str, Any]) -> tuple[float, float, int]:
    """(seconds to put every bucket, seconds to checksum and scan them where they lie, buckets):
    publish's two passes one after the other; what was put is freed on return."""
    import ray

    from actors.payload import buckets, to_wire
    from engines.validation import checksums_and_non_finite

    wires = [to_wire(g) for g in buckets(weights, bucket_bytes)]
    t = time.perf_counter()
    refs = [ray.put(w) for w in wires]
    put_s = time.perf_counter() - t
    stored = stored_tensors(refs, specs)
    t = time.perf_counter()
    checksums_and_non_finite(stored, scan_values=True)
    return put_s, time.perf_counter() - t, len(wires)


def touch_the_store(nbytes: int) -> None:
    """Put and free two objects of ``nbytes`` twice, so that no measurement pays for the store's
    first touch of its pages (or shares the cores with Ray's preallocation of them)."""
    import ray

    for _ in range(2):
        refs = [ray.put(np.zeros(nbytes, np.uint8)) for _ in range(2)]
        del refs


def start_local_ray(store_bytes: int) -> None:
    """A Ray of this process's own (``address="local"``), never a cluster already on the machine,
    its object store of ``store_bytes`` (at least 100 MiB) touched by Ray at start."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR",
             object_store_memory=max(100 << 20, store_bytes),
             _system_config={"preallocate_plasma_memory": True})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes-mib", type=float, nargs="+", default=[256.0, 1024.0])
    p.add_argument("--buckets-mib", type=float, nargs="+", default=[64.0, 16.0, 4.0],
                   help="bucket_bytes of the publications, in MiB (64: the fleet's default)")
    p.add_argument("--tensors", type=int, default=8,
                   help="tensors of equal size (a tensor larger than a bucket is a bucket alone)")
    p.add_argument("--reps", type=int, default=5, help="timed calls of each, after one uncounted")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)

    import ray

    torch.set_num_threads(1)
    largest = int(max(args.sizes_mib) * 2**20)
    start_local_ray(int(2.5 * largest))
    try:
        touch_the_store(largest)
        rows = [measure(size, args.tensors, args.buckets_mib, args.reps) for size in args.sizes_mib]
    finally:
        ray.shutdown()
    return write_json(args.json, {**provenance("publish"), "reps": args.reps, "rows": rows})


if __name__ == "__main__":
    raise SystemExit(main())
