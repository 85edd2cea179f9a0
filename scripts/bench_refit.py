#!/usr/bin/env python
"""Refit benchmark (issue 5): weight-refit against the data-path floor and two baselines.

Measured side by side in one run on this machine:

- floors: warm memcpy of the model size (numpy and torch), a modelled data-path floor
  ``floor_s = copy (into the object store) + max(1, N / cores) copies (into the N replicas'
  buffers, sharing the cores)``, the same N copies measured in parallel threads, and beside it the
  extra work: xxh3 checksums of the model (``engines.checksum``) and ``CheckpointStore.save`` with
  and without fsync;
- the engine alone: ``stage`` bandwidth (first stage into fresh memory, then warm) against memcpy,
  the copy-only share (non-finite check off), ``commit`` swap time (``engine.last_swap_ns``);
- weight-refit: ``Fleet.refit`` wall time (call -> every replica active) for each (size, replicas):
  the first (cold) refit, then warm ones (median), each broken down into publish (validate,
  checksum, put), prepare (fetch, verify, stage), persist, commit/activate and RPC overhead;
- serving: clients (a separate driver process, ``--concurrency`` threads sharing one fleet
  handle) calling ``fleet.infer``, closed-loop (each thread sends its next request when the last
  one returns: the cores are saturated), or open-loop with ``--rate`` (Poisson arrivals at that
  many requests/s in all; a response's latency counts from its scheduled send time, so a request
  held up behind a slow one counts the wait); p50/p99 idle and during refits; failed, torn (outputs of
  one response disagree), mixed-version (value does not match the version named) and backwards
  (a thread saw its versions go down) responses;
- memory: peak extra RSS of replicas and driver (``/proc/<pid>/status``) and object store use
  during each refit, against the model size;
- baselines, after the fleet is shut down, with the same number of replica-like actors defined
  here: (a) rolling reload (write one new engine file, then each actor in turn drops its engine
  and loads the file with ``engines.load_engine``: out of service meanwhile), (b) weights passed
  by value to every actor's method (N copies through the object store, then stage + commit).

With ``--device cuda`` the replicas serve on one GPU, N of them on fractions of it
(``gpu_fraction`` 1/N). The floors add the model's host-to-device copy from pinned and from
pageable memory; ``floor_s`` is then one copy into the object store plus N copies at the pinned
speed (the replicas share the GPU's link), and each row says how fast the replicas staged
together against the pinned speed (``stage_over_pinned_h2d``). ``--host-to-device pinned
pageable`` gives a row for each way a stage copies to the card. No baselines on cuda.
``scripts/gpu_rows.sh`` runs issue 12's GPU rows this way on a lent machine.

Usage::

    python scripts/bench_refit.py --quick --json benchmarks/results/cpu-quick.json --png docs/x.png
    python scripts/bench_refit.py --sizes 64 256 1024 --replicas 1 2 4 --json out.json

Progress goes to stderr; the summary table to stdout. Without matplotlib, ``--png`` is skipped
(and says so).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import gc
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
COLS = 1024
T_START = time.monotonic()


def log(msg: str) -> None:
    print(f"[bench {time.monotonic() - T_START:7.1f}s] {msg}", file=sys.stderr, flush=True)


def median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def rnd(x: Any, nd: int = 4) -> Any:
    if isinstance(x, float):
        return round(x, nd)
    if isinstance(x, dict):
        return {k: rnd(v, nd) for k, v in x.items()}
    if isinstance(x, list):
        return [rnd(v, nd) for v in x]
    return x


# ----------------------------------------------------------------------------------- the model


class BenchModel(torch.nn.Module):
    """``k`` weight tensors of ``rows x COLS`` float32 (equal sizes summing to the model size).

    Every output is ``x * w_i[0]`` with some work between the reads, so with all ``w_i`` filled
    with one value per version a mixed (torn) read shows as outputs that disagree, and the value
    names the version that produced it. Inference reads one row per tensor: its cost does not
    grow with the model, so latency measures the serving path, not the matmul.
    """

    def __init__(self, k: int, rows: int) -> None:
        super().__init__()
        self.w = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.zeros(rows, COLS)) for _ in range(k)])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = []
        h = x
        for w in self.w:
            h = torch.tanh(h) * 0 + x
            outs.append(h * w[0])
        return tuple(outs)


def model_shape(size_mib: float, k: int) -> tuple[int, int]:
    rows = max(1, int(size_mib * MiB) // (4 * k * COLS))
    return rows, k * rows * COLS * 4


def build_model_engine(path: Path, k: int, rows: int) -> dict[str, Any]:
    from engines import BuilderConfig, build_engine

    engine = build_engine(BenchModel(k, rows), [torch.ones(COLS)], BuilderConfig(enable_refit=True))
    engine.save(path)
    manifest = {n: s for n, s in engine.manifest().items()}
    del engine
    gc.collect()
    return manifest


def response_value(outputs: list[np.ndarray]) -> float:
    """The one value every output element holds, or NaN for a torn (mixed) response."""
    first = float(outputs[0].ravel()[0])
    for o in outputs:
        if not np.all(o == first):
            return float("nan")
    return first


# ----------------------------------------------------------------------------------- memory probes


def proc_mem(pid: int) -> tuple[int, int] | None:
    """(RssAnon, RssShmem) bytes of ``pid`` from /proc, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            text = f.read().decode()
    except OSError:
        return None
    anon = shm = 0
    for line in text.splitlines():
        if line.startswith("RssAnon:"):
            anon = int(line.split()[1]) * 1024
        elif line.startswith("RssShmem:"):
            shm = int(line.split()[1]) * 1024
    return anon, shm


def meminfo() -> dict[str, int]:
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":", 1)
            out[k] = int(v.split()[0]) * 1024
    return out


class StoreProbe:
    """Object store bytes in use, from the raylet (Ray's memory-info RPC); None if unavailable."""

    def __init__(self) -> None:
        self._state = None
        self._node = None
        try:
            import ray
            from ray._private.internal_api import get_state_from_address

            self._state = get_state_from_address(ray.get_runtime_context().gcs_address)
            node = next(n for n in self._state.node_table() if n["Alive"])
            self._node = (node["NodeManagerAddress"], node["NodeManagerPort"])
        except Exception as exc:  # noqa: BLE001
            log(f"object store probe unavailable: {type(exc).__name__}: {exc}")
            self._state = None

    def used(self) -> int | None:
        if self._state is None:
            return None
        try:
            from ray._private.internal_api import get_memory_info_reply

            reply = get_memory_info_reply(self._state, self._node[0], self._node[1], timeout_seconds=5)
            return int(reply.store_stats.object_store_bytes_used)
        except Exception:  # noqa: BLE001
            return None


class MemSampler:
    """Samples RssAnon/RssShmem of named pids (and the object store) in a background thread."""

    def __init__(self, pids: dict[str, int], store: StoreProbe | None, period_s: float = 0.02,
                 store_every: int = 10) -> None:
        self.pids = pids
        self.store = store
        self.period_s = period_s
        self.store_every = store_every
        self.samples: list[tuple[float, dict[str, tuple[int, int]], int | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> MemSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        i = 0
        last_store = None
        while not self._stop.is_set():
            t = time.monotonic()
            snap = {}
            for name, pid in self.pids.items():
                m = proc_mem(pid)
                if m is not None:
                    snap[name] = m
            if self.store is not None and i % self.store_every == 0:
                last_store = self.store.used()
            self.samples.append((t, snap, last_store))
            i += 1
            self._stop.wait(self.period_s)

    def window(self, a: float, b: float) -> dict[str, Any]:
        """Peak extra memory in [a, b] over the last sample before ``a``."""
        before = [s for s in self.samples if s[0] <= a]
        inside = [s for s in self.samples if a <= s[0] <= b + 2 * self.period_s]
        if not before or not inside:
            return {}
        base = before[-1]

        def tot(snap: dict[str, tuple[int, int]], prefix: str, idx: int) -> int:
            return sum(v[idx] for k, v in snap.items() if k.startswith(prefix))

        out: dict[str, Any] = {}
        for label, prefix in (("replicas", "replica"), ("driver", "driver")):
            b0 = tot(base[1], prefix, 0)
            out[f"{label}_anon_extra_bytes"] = max(tot(s[1], prefix, 0) for s in inside) - b0
            s0 = tot(base[1], prefix, 1)
            out[f"{label}_shmem_extra_bytes"] = max(tot(s[1], prefix, 1) for s in inside) - s0
        out["replicas_anon_base_bytes"] = tot(base[1], "replica", 0)
        stores = [s[2] for s in inside if s[2] is not None]
        if stores and base[2] is not None:
            out["store_base_bytes"] = base[2]
            out["store_peak_bytes"] = max(stores)
        out["extra_host_bytes"] = (out["replicas_anon_extra_bytes"] + max(0, out["driver_anon_extra_bytes"])
                                   + max(0, out.get("store_peak_bytes", 0) - out.get("store_base_bytes", 0)))
        return out


# ----------------------------------------------------------------------------------- floors


def timeit(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def _copy_times(dst: np.ndarray, src: np.ndarray, reps: int) -> list[float]:
    return timeit(lambda: np.copyto(dst, src), reps)


def _torch_copy_times(dst: np.ndarray, src: np.ndarray, reps: int) -> list[float]:
    tdst, tsrc = torch.from_numpy(dst), torch.from_numpy(src)
    return timeit(lambda: tdst.copy_(tsrc), reps)


def _parallel_copy_times(dsts: list[np.ndarray], src: np.ndarray, reps: int) -> list[float]:
    def par() -> None:
        ths = [threading.Thread(target=np.copyto, args=(d, src)) for d in dsts]
        for th in ths:
            th.start()
        for th in ths:
            th.join()

    return timeit(par, reps)


def measure_floors(size_bytes: int, weights: dict[str, torch.Tensor], replica_counts: list[int],
                   workdir: Path, quick: bool) -> dict[str, Any]:
    """memcpy (warm buffers), N parallel copies, checksums and checkpoint saves of the model.

    Floors are the best of several repetitions (a floor is what the hardware can do; on a shared
    machine the median also measures the neighbours); the extra work (checksum, persist) is the
    median, as the refit path would see it.
    """
    from actors.store import CheckpointStore
    from engines.checksum import checksums

    reps = 3 if quick else 5
    src = np.ones(size_bytes // 4, np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    np_s = _copy_times(dst, src, reps)
    torch_s = _torch_copy_times(dst, src, reps)
    copy_s = min(min(np_s), min(torch_s))
    fresh_t = time.perf_counter()
    fresh = src.copy()  # into memory never touched: what a first put / first stage pays
    fresh_s = time.perf_counter() - fresh_t
    del fresh, dst

    parallel: dict[str, float] = {}
    for nrep in sorted(set(replica_counts)):
        if nrep < 2 or size_bytes * (nrep + 1) > 0.4 * meminfo()["MemAvailable"]:
            continue
        dsts = [np.empty_like(src) for _ in range(nrep)]
        for d in dsts:
            np.copyto(d, src)
        parallel[str(nrep)] = min(_parallel_copy_times(dsts, src, 3))
        del dsts
    del src
    gc.collect()

    sums_s = timeit(lambda: checksums(weights), reps)
    sums = checksums(weights)
    store = CheckpointStore(workdir / "persist-probe")
    persist: dict[str, list[float]] = {"fsync": [], "nofsync": []}
    for _ in range(2):
        for mode in ("nofsync", "fsync"):
            t = time.perf_counter()
            store.save(1, weights, sums, fsync=mode == "fsync")
            persist[mode].append(time.perf_counter() - t)
            store.retain([])
    shutil.rmtree(workdir / "persist-probe", ignore_errors=True)
    return {
        "memcpy_numpy_s": min(np_s), "memcpy_torch_s": min(torch_s), "memcpy_median_s": median(np_s),
        "copy_s": copy_s, "memcpy_gbps": size_bytes / copy_s / 1e9, "fresh_copy_s": fresh_s,
        "fresh_copy_gbps": size_bytes / fresh_s / 1e9,
        "parallel_copies_s": parallel,
        "checksum_s": median(sums_s), "checksum_best_s": min(sums_s),
        "checksum_gbps": size_bytes / median(sums_s) / 1e9,
        "persist_fsync_s": median(persist["fsync"]), "persist_nofsync_s": median(persist["nofsync"]),
    }


def measure_h2d(size_bytes: int, reps: int) -> dict[str, Any]:
    """Host-to-card copies of the model onto one CUDA GPU, best of ``reps``: from pinned memory
    (the link's speed) and from pageable memory (what a plain copy from the object store gets)."""
    dev = torch.empty(size_bytes, dtype=torch.uint8, device="cuda")
    pinned = torch.ones(size_bytes, dtype=torch.uint8).pin_memory()
    pageable = torch.from_numpy(np.ones(size_bytes, np.uint8))

    def best(dst: torch.Tensor, src: torch.Tensor) -> float:
        times = []
        for _ in range(reps + 1):
            torch.cuda.synchronize()
            t = time.perf_counter()
            dst.copy_(src, non_blocking=src.is_pinned())
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return min(times[1:])

    pinned_s, pageable_s = best(dev, pinned), best(dev, pageable)
    del dev, pinned, pageable
    torch.cuda.empty_cache()
    return {"card": torch.cuda.get_device_name(0), "h2d_pinned_s": pinned_s,
            "h2d_pinned_gbps": size_bytes / pinned_s / 1e9, "h2d_pageable_s": pageable_s,
            "h2d_pageable_gbps": size_bytes / pageable_s / 1e9}


def floor_for(fl: dict[str, Any], n: int, cores: int) -> tuple[float, float | None]:
    """(modelled floor, floor with the N copies measured in parallel). On a GPU (``h2d_pinned_s``
    measured): one copy into the object store, then the card's share of the link, N copies of the
    model at the pinned host-to-device speed (the N replicas share one GPU)."""
    if "h2d_pinned_s" in fl:
        return fl["copy_s"] + n * fl["h2d_pinned_s"], None
    model = fl["copy_s"] * (1 + max(1.0, n / cores))
    par = fl["parallel_copies_s"].get(str(n)) if n > 1 else fl["copy_s"]
    return model, (fl["copy_s"] + par) if par is not None else None


# ----------------------------------------------------------------------------------- engine alone


def measure_engine(path: Path, weights: dict[str, torch.Tensor], size_bytes: int, memcpy_gbps: float,
                   quick: bool, device: str = "cpu") -> dict[str, Any]:
    """Stage/commit in this process: stage bandwidth (cold and warm), copy-only share, swap time.
    ``memcpy_gbps`` is what the stage is compared with (on a GPU: the pinned host-to-device speed)."""
    from engines import load_engine

    out: dict[str, Any] = {}
    for policy in ("reject", "allow"):
        engine = load_engine(path, device=device, enable_refit=True, keep_previous=True, non_finite=policy)
        stage_s, swap_ns, extra = [], [], []
        reps = 4 if quick else 6
        for v in range(1, reps + 1):
            for t in weights.values():
                t.fill_(float(1000 + v))
            t0 = time.perf_counter()
            staged = engine.stage(weights, v)
            stage_s.append(time.perf_counter() - t0)
            extra.append(engine.memory().extra_bytes)
            engine.commit(staged)
            swap_ns.append(engine.last_swap_ns)
        warm = stage_s[2:]  # the first two stages allocate (the previous set is kept); then the pool
        key = "" if policy == "reject" else "copy_only_"
        out[f"{key}stage_first_s"] = stage_s[0]
        out[f"{key}stage_second_s"] = stage_s[1]
        out[f"{key}stage_warm_s"] = median(warm)
        out[f"{key}stage_gbps"] = size_bytes / median(warm) / 1e9
        out[f"{key}stage_vs_memcpy"] = (size_bytes / median(warm) / 1e9) / memcpy_gbps
        if policy == "reject":
            out["swap_ns_median"] = median(swap_ns)
            out["swap_ns_max"] = max(swap_ns)
            out["extra_bytes_peak"] = max(extra)
            out["extra_over_model"] = max(extra) / size_bytes
        del engine, staged
        gc.collect()
        if device != "cpu":
            torch.cuda.empty_cache()
    return out


# ----------------------------------------------------------------------------------- baselines

_MIMIC = None


def mimic_class() -> Any:
    """A replica-like Ray actor: loads the engine file, serves, reloads or takes weights by value."""
    global _MIMIC
    if _MIMIC is not None:
        return _MIMIC
    import ray

    @ray.remote(concurrency_groups={"serve": 8, "control": 2}, num_cpus=0.01)
    class MimicReplica:
        def __init__(self, path: str, keep_previous: bool, threads: int) -> None:
            import torch as _torch

            from engines import load_engine

            _torch.set_num_threads(threads)
            self.keep_previous = keep_previous
            self.engine = load_engine(path, device="cpu", enable_refit=True, keep_previous=keep_previous)

        @ray.method(concurrency_group="serve")
        def infer(self, x: Any) -> int | None:
            engine = self.engine
            if engine is None:
                return None  # out of service
            return engine.infer(x).version

        @ray.method(concurrency_group="control")
        def reload(self, path: str) -> float:
            """Rolling-reload step: out of service from dropping the engine until the new one serves."""
            import gc as _gc

            from engines import load_engine

            t = time.perf_counter()
            self.engine = None
            _gc.collect()
            self.engine = load_engine(path, device="cpu", enable_refit=True, keep_previous=self.keep_previous)
            return time.perf_counter() - t

        @ray.method(concurrency_group="control")
        def set_weights(self, weights: dict[str, Any], version: int) -> float:
            """By value: the dict of numpy arrays arrives as this call's argument; stage + commit."""
            import torch as _torch

            t = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # read-only shared memory: only read
                tensors = {n: _torch.from_numpy(a) for n, a in weights.items()}
            staged = self.engine.stage(tensors, version)
            self.engine.commit(staged)
            return time.perf_counter() - t

        def pid(self) -> int:
            return os.getpid()

    _MIMIC = MimicReplica
    return _MIMIC


def wait_pids_gone(pids: list[int], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") for p in pids):
        time.sleep(0.1)


def run_baselines(engine_path: Path, weights: dict[str, torch.Tensor], n: int, size_bytes: int,
                  workdir: Path, quick: bool, value0: float, budget_bytes: float) -> dict[str, Any]:
    import ray

    from engines.engine_file import read_engine_file, write_engine_file

    out: dict[str, Any] = {}
    Mimic = mimic_class()
    actors = [Mimic.remote(str(engine_path), True, 1) for _ in range(n)]
    pids = ray.get([a.pid.remote() for a in actors])
    ray.get([a.infer.remote(np.ones(COLS, np.float32)) for a in actors])

    # (a) rolling reload: the trainer writes one engine file; each replica in turn reloads it.
    reps = 1 if quick or size_bytes >= GiB else 2
    totals, writes, outs = [], [], []
    base = read_engine_file(engine_path)
    for r in range(reps):
        for t in weights.values():
            t.fill_(value0 + r)
        new_path = workdir / f"reload-{r}.engine"
        t0 = time.perf_counter()
        write_engine_file(new_path, dataclasses.replace(base, weights=dict(weights), version=r + 1))
        write_s = time.perf_counter() - t0
        per = []
        for a in actors:
            t1 = time.perf_counter()
            inside = ray.get(a.reload.remote(str(new_path)))
            per.append({"out_of_service_s": inside, "call_s": time.perf_counter() - t1})
        totals.append(time.perf_counter() - t0)
        writes.append(write_s)
        outs.append(per)
        new_path.unlink(missing_ok=True)
    del base
    out["reload_baseline_s"] = median(totals)
    out["reload_write_s"] = median(writes)
    out["reload_out_of_service_s"] = [p["out_of_service_s"] for p in outs[-1]]
    out["reload_unavailable_replicas"] = n
    log(f"  baseline rolling reload: {out['reload_baseline_s']:.3f}s (write {out['reload_write_s']:.3f}s, "
        f"out of service per replica {', '.join(f'{x:.2f}' for x in out['reload_out_of_service_s'])}s)")
    # (b) by value: the caller hands the dict of arrays to every actor's method at once (one put
    # per call: N copies through the object store), each actor stages and commits it.
    need = size_bytes * (n * 3 + n + 1)
    if need > budget_bytes:
        out["byvalue_skipped"] = f"needs ~{need / GiB:.1f} GiB (N args in the store + 3 sets per actor)"
        log(f"  baseline by value skipped: {out['byvalue_skipped']}")
    else:
        times = []
        reps_bv = 3 if quick else 4
        for r in range(reps_bv + 1):
            for t in weights.values():
                t.fill_(value0 + 10 + r)
            wire = {n: t.numpy() for n, t in weights.items()}  # what a user would pass
            t0 = time.perf_counter()
            inside = ray.get([a.set_weights.remote(wire, 100 + r) for a in actors])
            times.append((time.perf_counter() - t0, max(inside)))
        out["byvalue_cold_s"] = times[0][0]
        out["byvalue_baseline_s"] = median([t[0] for t in times[1:]])
        out["byvalue_stage_in_actor_s"] = median([t[1] for t in times[1:]])
        log(f"  baseline by value: first {out['byvalue_cold_s']:.3f}s, warm {out['byvalue_baseline_s']:.3f}s "
            f"(stage+commit inside the actor {out['byvalue_stage_in_actor_s']:.3f}s)")
    for a in actors:
        ray.kill(a, no_restart=True)
    wait_pids_gone(pids)
    return out


# ----------------------------------------------------------------------------------- the client


def client_main(args: argparse.Namespace) -> int:
    """Closed-loop clients in their own driver process; writes samples to ``--client-out``."""
    import ray  # noqa: F401

    from actors.heap import freeze_startup_heap
    from cluster import Fleet

    torch.set_num_threads(1)
    fleet = Fleet.connect(args.client_fleet, address=args.client_address)
    x = np.ones(COLS, np.float32)
    for _ in range(20):
        fleet.infer(x)
    freeze_startup_heap()  # as a latency-sensitive serving process would (actors.heap)
    names: dict[str, int] = {}
    cols: list[list[Any]] = [[] for _ in range(args.concurrency)]
    stop = threading.Event()

    mean_gap = args.concurrency / args.rate if args.rate else 0.0

    def loop(tid: int) -> None:
        rec = cols[tid]
        arrivals = np.random.default_rng(tid)
        due = time.monotonic()
        while not stop.is_set():
            if mean_gap:  # open loop: the send time is the schedule's, however late the last answer
                due += arrivals.exponential(mean_gap)
                if (wait := due - time.monotonic()) > 0 and stop.wait(wait):
                    break
                t0 = due
            else:
                t0 = time.monotonic()
            try:
                r = fleet.infer(x)
                t1 = time.monotonic()
                rid = names.setdefault(r.replica, len(names))
                rec.append((t0, t1, tid, rid, r.version, response_value(r.outputs), 0))
            except Exception:  # noqa: BLE001
                t1 = time.monotonic()
                rec.append((t0, t1, tid, -1, -1, float("nan"), 1))

    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(args.concurrency)]
    for th in threads:
        th.start()
    print("ready", flush=True)
    sys.stdin.readline()
    stop.set()
    for th in threads:
        th.join(timeout=60)
    rows = [r for c in cols for r in c]
    arr = np.array(rows, dtype=np.float64).reshape(-1, 7)
    inv = sorted(names, key=names.get)
    np.savez(args.client_out, samples=arr, replicas=np.array(inv, dtype=str))
    print("done", flush=True)
    return 0


class Clients:
    def __init__(self, fleet_name: str, address: str, concurrency: int, out: Path,
                 rate: float | None = None) -> None:
        self.out = out
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_client", "--client-fleet", fleet_name,
               "--client-address", address, "--concurrency", str(concurrency), "--client-out", str(out)]
        if rate:
            cmd += ["--rate", str(rate)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            self.proc.kill()
            raise RuntimeError(f"client process did not start (said {line!r})")
        self.ready_at = time.monotonic()

    def stop(self) -> tuple[np.ndarray, list[str]]:
        self.proc.stdin.write("stop\n")
        self.proc.stdin.flush()
        self.proc.stdout.readline()
        self.proc.wait(timeout=60)
        with np.load(self.out, allow_pickle=False) as z:
            return z["samples"], list(z["replicas"])


def analyse_serving(samples: np.ndarray, names: list[str], t_idle: tuple[float, float],
                    refits: list[dict[str, Any]], value_of: dict[int, float]) -> dict[str, Any]:
    t0, t1, tid, rep, ver, val, status = (samples[:, i] for i in range(7))
    lat_ms = (t1 - t0) * 1e3
    ok = status == 0
    idle = ok & (t0 >= t_idle[0]) & (t1 <= t_idle[1])
    during = np.zeros(len(samples), bool)
    for r in refits:
        during |= (t0 < r["t_return"]) & (t1 > r["t_call"])
    during &= ok
    # where the tail comes from: requests overlapping the caller's publish, the rest of the refit
    # (PREPARE, COMMIT+ACTIVATE), or neither (the gaps, where the background checkpoint writes run)
    publishing = np.zeros(len(samples), bool)
    for r in refits:
        end = r["t_call"] + r.get("publish_s", 0.0)
        publishing |= (t0 < end) & (t1 > r["t_call"])
    publishing &= ok
    coordinating = during & ~publishing
    span = (min(r["t_call"] for r in refits), max(r["t_return"] for r in refits) + 0.25) if refits else (0, 0)
    gaps = ok & ~during & (t0 >= span[0]) & (t1 <= span[1])
    torn = ok & np.isnan(val)
    expected = np.array([value_of.get(int(v), np.nan) for v in ver]) if len(ver) else np.array([])
    mixed = ok & ~torn & (val != expected)
    backwards = 0
    for t in np.unique(tid):
        m = ok & (tid == t)
        order = np.argsort(t0[m])
        v = ver[m][order]
        backwards += int(np.sum(np.diff(v) < 0))

    def pct(mask: np.ndarray, q: float) -> float | None:
        return float(np.percentile(lat_ms[mask], q)) if mask.any() else None

    return {
        "samples": int(len(samples)), "n_idle": int(idle.sum()), "n_refit": int(during.sum()),
        "p50_idle_ms": pct(idle, 50), "p99_idle_ms": pct(idle, 99),
        "p50_refit_ms": pct(during, 50), "p99_refit_ms": pct(during, 99),
        "max_refit_ms": float(lat_ms[during].max()) if during.any() else None,
        "p99_publish_ms": pct(publishing, 99), "p99_prepare_commit_ms": pct(coordinating, 99),
        "p99_between_refits_ms": pct(gaps, 99),
        "n_publish": int(publishing.sum()), "n_prepare_commit": int(coordinating.sum()),
        "n_between": int(gaps.sum()),
        "failed": int((status != 0).sum()), "torn": int(torn.sum()), "mixed": int(mixed.sum()),
        "backwards": backwards,
        "per_replica_responses": {names[int(i)]: int(((rep == i) & ok).sum()) for i in np.unique(rep[ok])},
    }


# ----------------------------------------------------------------------------------- fleet rows


def refit_breakdown(res: Any, raw: dict[str, Any], wall: float) -> dict[str, Any]:
    """Where one refit's time went (driver publish, coordinator phases, replicas, persist)."""
    t = res.timings
    publish = t.get("load_validate_s", 0.0) + t.get("checksum_s", 0.0) + t.get("put_s", 0.0)
    coord = raw.get("duration_s", 0.0)
    prepare = raw.get("prepare_s", 0.0)
    persist = raw.get("persist", {}) or {}
    persist_total = persist.get("read_s", 0.0) + persist.get("write_s", 0.0)
    reps = res.replicas or {}

    def mx(key: str) -> float:
        vals = [r.get(key) for r in reps.values() if isinstance(r.get(key), (int, float))]
        return max(vals) if vals else 0.0

    persist_exposed = max(0.0, persist_total - prepare)
    phases: dict[str, float] = {}
    ph = raw.get("phases") or {}  # present when the coordinator reports its phase times
    if "t0" in ph:
        chain = ["t0", "prepared", "persisted", "commit_logged", "committed", "activated",
                 "activated_logged", "retained", "done"]
        have = [k for k in chain if k in ph]
        for a, b in zip(have, have[1:], strict=False):
            phases[f"coord_{a}_to_{b}_s"] = ph[b] - ph[a]
        if "started_at" in persist:
            phases["persist_start_delay_s"] = persist["started_at"] - ph["t0"]
    for k, v in persist.items():
        if k not in ("read_s", "write_s", "started_at") and isinstance(v, (int, float)):
            phases[f"persist_{k}"] = v
    return {**phases,
        "refit_s": wall,
        "validate_s": t.get("load_validate_s", 0.0), "checksum_s": t.get("checksum_s", 0.0),
        "put_s": t.get("put_s", 0.0), "publish_s": publish, "buckets": t.get("buckets", 0.0),
        "checkpoint_wait_s": t.get("checkpoint_wait_s", 0.0),
        "coordinator_s": coord, "prepare_s": prepare,
        "replica_fetch_s": mx("fetch_s"), "replica_verify_s": mx("verify_s"),
        "replica_stage_s": mx("stage_s"), "replica_prefetch_wait_s": mx("prefetch_wait_s"),
        "replica_allocated_mib": mx("allocated_bytes") / 2**20,
        "replicas_hashing": float(sum(r.get("verified", 1.0) == 1.0 for r in reps.values())),
        "replica_prefetched_buckets": mx("prefetched"),
        "replica_prepare_s": mx("prepare_s"),
        "prepare_rpc_s": max(0.0, prepare - mx("prepare_s")),
        "persist_read_s": persist.get("read_s"), "persist_write_s": persist.get("write_s"),
        "persist_exposed_s": persist_exposed,
        "commit_activate_s": max(0.0, coord - prepare - persist_exposed),
        "activate_s": mx("activate_s"), "swap_ns": mx("swap_ns"),
        "driver_rpc_s": max(0.0, wall - publish - coord - t.get("checkpoint_wait_s", 0.0)),
    }


def run_row(size_mib: float, n: int, engine_path: Path, weights: dict[str, torch.Tensor], size_bytes: int,
            floors: dict[str, Any], args: argparse.Namespace, workdir: Path, store: StoreProbe,
            cores: int, budget_bytes: float, memory_mode: str, prefetch: bool = False,
            bucket_mib: float = 64.0, host_to_device: str = "pinned") -> dict[str, Any]:
    import ray

    from cluster import Fleet, FleetConfig

    name = f"bench-{int(size_mib)}m-{n}r-{memory_mode}-{uuid.uuid4().hex[:4]}"
    on_gpu = args.device == "cuda"
    state_dir = workdir / "state" / name
    gib = size_bytes / GiB
    cfg = FleetConfig(
        name=name, engine=str(engine_path), replicas=n, state_dir=str(state_dir), torch_threads=1,
        persist_fsync=not args.no_fsync, keep_previous=True, memory_mode=memory_mode, prefetch=prefetch,
        bucket_bytes=int(bucket_mib * MiB), device=args.device, host_to_device=host_to_device,
        placement={"gpu_fraction": 1.0 / n if on_gpu else 1.0},
        timeouts={"prepare_s": 120 + 120 * gib, "commit_s": 30, "activate_s": 30, "request_s": 60,
                  "launch_s": 300 + 60 * gib * n},
    )
    row: dict[str, Any] = {"model_bytes": size_bytes, "model_mib": size_bytes / MiB, "replicas": n,
                           "tensors": len(weights), "persist_fsync": cfg.persist_fsync,
                           "memory_mode": memory_mode, "prefetch": prefetch, "bucket_mib": bucket_mib,
                           "device": args.device, "host_to_device": host_to_device if on_gpu else None,
                           "loadavg_1m_start": os.getloadavg()[0]}
    t = time.perf_counter()
    fleet = Fleet.launch(cfg)
    row["launch_s"] = time.perf_counter() - t
    raws: list[dict[str, Any]] = []
    orig_result = getattr(fleet, "_result", None)

    def capture(out: Any, t0: float, timings: dict[str, float], **kw: Any) -> Any:
        raws.append(dataclasses.asdict(out))  # the coordinator's own report, for the breakdown
        return orig_result(out, t0, timings, **kw)

    if callable(orig_result):
        fleet._result = capture  # instance-level instrumentation of this benchmark's handle only
    st = fleet.status()
    pids = {f"replica-{r['id']}": int(r["pid"]) for r in st["replicas"]}
    pids["driver"] = os.getpid()
    sampler = MemSampler(pids, store).start()
    log(f"  launched {name} in {row['launch_s']:.2f}s; replica pids {sorted(pids.values())}")

    value_of: dict[int, float] = {0: 0.0}
    counter = [0]
    counter_version = [0]  # the version of the last refit

    def one_refit() -> dict[str, Any]:
        counter[0] += 1
        value = float(counter[0])
        for w in weights.values():
            w.fill_(value)
        t_call = time.monotonic()
        t0 = time.perf_counter()
        res = fleet.refit(weights)
        wall = time.perf_counter() - t0
        t_ret = time.monotonic()
        value_of[res.version] = value
        counter_version[0] = res.version
        b = refit_breakdown(res, raws[-1] if raws else {}, wall)
        b.update({"t_call": t_call, "t_return": t_ret, "version": res.version})
        return b

    try:
        time.sleep(0.3)
        cold = one_refit()
        cold["memory"] = sampler.window(cold["t_call"], cold["t_return"])
        log(f"  cold refit {cold['refit_s']:.3f}s (publish {cold['publish_s']:.3f}: validate "
            f"{cold['validate_s']:.3f} put {cold['put_s']:.3f}; prepare {cold['prepare_s']:.3f}: stage "
            f"{cold['replica_stage_s']:.3f}; persist {cold['persist_write_s'] or 0:.3f})")
        warming = []  # each process faults in the object store's pages as new versions land in it
        for _ in range(args.warmup):
            time.sleep(0.1)
            warming.append(one_refit()["refit_s"])
        if warming:
            log("  warm-up refits " + ", ".join(f"{x:.3f}" for x in warming) + " s (not counted)")
        warm = []
        for _ in range(args.warm):
            time.sleep(0.1)
            w = one_refit()
            w["memory"] = sampler.window(w["t_call"], w["t_return"])
            warm.append(w)
        log("  warm refits " + ", ".join(f"{w['refit_s']:.3f}" for w in warm) + " s")
        settled = []  # each once the previous version's checkpoint is written (not timed)
        for _ in range(args.warm if args.settled is None else args.settled):
            fleet.wait_persisted(counter_version[0], timeout=120)
            settled.append(one_refit())
        if settled:
            log("  settled refits " + ", ".join(f"{w['refit_s']:.3f}" for w in settled) + " s")

        # serving: idle window, then refits under load
        clients = Clients(name, ray.get_runtime_context().gcs_address, args.concurrency,
                          workdir / f"{name}-samples.npz", args.rate)
        time.sleep(0.5)
        idle_a = time.monotonic()
        time.sleep(args.idle_s)
        idle_b = time.monotonic()
        loaded = []
        for _ in range(args.refits):
            loaded.append(one_refit())
            time.sleep(args.gap_s)
        time.sleep(0.3)
        samples, names = clients.stop()
        replica_gc = {r["id"]: r.get("gc") for r in fleet.status()["replicas"]}  # collector pauses
        for r in loaded:
            r["memory"] = sampler.window(r["t_call"], r["t_return"])
        serving = analyse_serving(samples, names, (idle_a, idle_b), loaded, value_of)
        log(f"  p99 by phase: publish {serving['p99_publish_ms'] or 0:.2f} ms (n={serving['n_publish']}), "
            f"PREPARE..ACTIVATE {serving['p99_prepare_commit_ms'] or 0:.2f} ms "
            f"(n={serving['n_prepare_commit']}), "
            f"between refits {serving['p99_between_refits_ms'] or 0:.2f} ms (n={serving['n_between']})")
        log(f"  serving: {serving['samples']} responses; p50/p99 idle {serving['p50_idle_ms']:.2f}/"
            f"{serving['p99_idle_ms']:.2f} ms (n={serving['n_idle']}), during {len(loaded)} refits "
            f"{serving['p50_refit_ms']:.2f}/{serving['p99_refit_ms']:.2f} ms (n={serving['n_refit']}); "
            f"failed {serving['failed']} torn {serving['torn']} mixed {serving['mixed']} "
            f"backwards {serving['backwards']}")
        steady = sampler.window(time.monotonic() - 0.2, time.monotonic())
    finally:
        sampler.stop()
        rep_pids = [p for k, p in pids.items() if k.startswith("replica")]
        fleet.shutdown()
        wait_pids_gone(rep_pids)
        shutil.rmtree(state_dir, ignore_errors=True)

    def strip(b: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in b.items() if k not in ("t_call", "t_return", "memory")}

    floor_s, floor_par = floor_for(floors, n, cores)
    warm_s = [w["refit_s"] for w in warm]
    refit_s = median(warm_s)
    keys = [k for k in warm[0] if k not in ("t_call", "t_return", "version", "memory")]
    profile = {k: median([w[k] for w in warm if w.get(k) is not None]) for k in keys}
    profile_load = {k: median([w[k] for w in loaded if w.get(k) is not None]) for k in keys}
    profile_settled = {k: median([w[k] for w in settled if w.get(k) is not None])
                       for k in keys} if settled else {}
    cold_profile = {k: cold[k] for k in keys}
    mems = [w["memory"] for w in warm + loaded if w.get("memory")]

    def peak(key: str, pool: list[dict[str, Any]]) -> int | None:
        vals = [m[key] for m in pool if key in m]
        return max(vals) if vals else None

    def typical(key: str, pool: list[dict[str, Any]]) -> float | None:
        return median([m[key] for m in pool if key in m])

    memory = {
        # peak: the largest over the warm refits (the second refit still allocates: the previous
        # set is kept and the pool is empty until the third); typical: the median refit
        "warm_extra_host_bytes_typical": typical("extra_host_bytes", mems),
        "warm_replicas_anon_extra_bytes_typical": typical("replicas_anon_extra_bytes", mems),
        "cold_extra_host_bytes": cold["memory"].get("extra_host_bytes"),
        "cold_replicas_anon_extra_bytes": cold["memory"].get("replicas_anon_extra_bytes"),
        "warm_extra_host_bytes": peak("extra_host_bytes", mems),
        "warm_replicas_anon_extra_bytes": peak("replicas_anon_extra_bytes", mems),
        "warm_driver_anon_extra_bytes": peak("driver_anon_extra_bytes", mems),
        "replicas_shmem_extra_bytes": peak("replicas_shmem_extra_bytes", mems),
        "store_peak_bytes": peak("store_peak_bytes", mems),
        "replica_anon_steady_bytes_each": (steady.get("replicas_anon_base_bytes", 0) / n) if steady else None,
    }
    memory["warm_extra_over_model"] = (memory["warm_extra_host_bytes"] or 0) / size_bytes
    memory["cold_extra_over_model"] = (memory["cold_extra_host_bytes"] or 0) / size_bytes
    memory["replica_steady_over_model"] = (memory["replica_anon_steady_bytes_each"] or 0) / size_bytes
    swaps = [w["swap_ns"] for w in [cold] + warm + loaded]
    row.update({
        "refit_s": refit_s, "refit_warm_s": warm_s, "cold_refit_s": cold["refit_s"],
        "refit_settled_s": median([w["refit_s"] for w in settled]) if settled else None,
        "refit_settled_all_s": [w["refit_s"] for w in settled],
        "settled_ratio_to_floor": median([w["refit_s"] for w in settled]) / floor_s if settled else None,
        "warmup_refit_s": warming,
        "cold_over_warm": cold["refit_s"] / refit_s,
        "refit_under_load_s": median([r["refit_s"] for r in loaded]),
        "refits_under_load": len(loaded),
        "floor_s": floor_s, "floor_parallel_measured_s": floor_par,
        "floor_model": (f"copy_s + {n} x h2d_pinned_s" if on_gpu
                        else f"copy_s * (1 + max(1, {n}/{cores} cores))"),
        "ratio_to_floor": refit_s / floor_s,
        "checksum_s": floors["checksum_s"],
        "persist_s": floors["persist_fsync_s"] if cfg.persist_fsync else floors["persist_nofsync_s"],
        "persist_fsync_s": floors["persist_fsync_s"], "persist_nofsync_s": floors["persist_nofsync_s"],
        "floor_plus_extra_s": floor_s + floors["checksum_s"]
        + (floors["persist_fsync_s"] if cfg.persist_fsync else floors["persist_nofsync_s"]),
        "swap_us": max(swaps) / 1e3, "swap_us_median": median(swaps) / 1e3,
        "profile_warm": profile, "profile_cold": cold_profile, "profile_under_load": profile_load,
        "profile_settled": profile_settled,
        "memory": memory, "replica_gc": replica_gc, "unavailable_replicas": 0,
        "loadavg_1m_end": os.getloadavg()[0],
        "refit_details": {"cold": strip(cold), "warm": [strip(w) for w in warm],
                          "under_load": [strip(r) for r in loaded]},
        **serving,
    })
    if on_gpu and profile_settled.get("replica_stage_s"):
        # the N replicas stage at once over the one GPU's link: their bytes over the slowest stage
        row["stage_gbps"] = n * size_bytes / profile_settled["replica_stage_s"] / 1e9
        row["stage_over_pinned_h2d"] = row["stage_gbps"] / floors["h2d_pinned_gbps"]
    row["serving_timeline"] = {
        "samples": samples, "names": names, "refits": loaded, "idle": (idle_a, idle_b),
    }
    return row


# ----------------------------------------------------------------------------------- plotting


def draw_png(rows: list[dict[str, Any]], path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "PNG skipped: matplotlib is not installed (pip install matplotlib)"
    rows = [r for r in rows if r.get("serving_timeline")]
    if not rows:
        return "PNG skipped: no serving data"
    fig, axes = plt.subplots(len(rows), 1, figsize=(11, 2.6 * len(rows)), squeeze=False)
    for ax, row in zip(axes[:, 0], rows, strict=True):
        tl = row["serving_timeline"]
        s = tl["samples"]
        origin = tl["idle"][0]
        ok = s[:, 6] == 0
        for i, name in enumerate(tl["names"]):
            m = ok & (s[:, 3] == i)
            order = np.argsort(s[m, 0])
            ax.plot((s[m, 0][order] - origin), (s[m, 1] - s[m, 0])[order] * 1e3, lw=0.6,
                    label=f"replica {name}")
        for j, r in enumerate(tl["refits"]):
            a = r["t_call"] - origin
            pub = a + r["publish_s"]
            prep = pub + r["prepare_s"]
            end = r["t_return"] - origin
            ax.axvspan(a, pub, color="tab:orange", alpha=0.25, lw=0, label="publish" if j == 0 else None)
            ax.axvspan(pub, prep, color="tab:blue", alpha=0.18, lw=0, label="prepare" if j == 0 else None)
            ax.axvspan(prep, end, color="tab:green", alpha=0.3, lw=0,
                       label="persist/commit/activate" if j == 0 else None)
        ax.axvline(tl["idle"][1] - origin, color="k", lw=0.5, ls="--")
        ax.set_yscale("log")
        ax.set_ylabel("latency (ms)")
        ax.set_title(f"{row['model_mib']:.0f} MiB x {row['replicas']} replica(s): p99 idle "
                     f"{row['p99_idle_ms']:.2f} ms, during refits {row['p99_refit_ms']:.2f} ms "
                     f"({row['n_refit']} samples over {row['refits_under_load']} refits)", fontsize=9)
        ax.legend(fontsize=7, loc="upper left", ncol=6)
    axes[-1, 0].set_xlabel("time since the idle window began (s); left of the dashed line: idle")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return f"PNG written: {path}"


# ----------------------------------------------------------------------------------- main


def code_version() -> dict[str, Any]:
    """The commit measured, and whether engines/actors/cluster differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "engines", "actors", "cluster"],
                               cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        return {"commit": head or None, "modified": dirty.splitlines()}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "modified": []}


def machine_info() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import ray

    return {
        "host": platform.node(), "cpu": cpu, "cores": os.cpu_count(),
        "mem_total_bytes": meminfo()["MemTotal"], "python": platform.python_version(),
        "torch": torch.__version__, "ray": ray.__version__, "numpy": np.__version__,
        "kernel": platform.release(), "gpu": torch.cuda.is_available(), "loadavg_start": os.getloadavg(),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="64 and 256 MiB x 1 and 2 replicas, few refits (<5 min)")
    p.add_argument("--json", type=Path, help="write the results here (one object with a 'rows' list)")
    p.add_argument("--png", type=Path, help="draw latency over time with refits marked (needs matplotlib)")
    p.add_argument("--sizes", "--sizes-mib", dest="sizes", type=float, nargs="+",
                   help="model sizes in MiB (default 64 256 1024; --quick 64 256)")
    p.add_argument("--replicas", type=int, nargs="+", help="replica counts (default 1 2 4; --quick 1 2)")
    p.add_argument("--refits", type=int, help="refits under load per row (default 20; --quick 6)")
    p.add_argument("--warm", type=int, help="warm refits without load per row (default 5; --quick 3)")
    p.add_argument("--warmup", type=int, default=4,
                   help="refits after the cold one and before the warm ones, not counted (default 4): "
                        "until versions have landed all over the object store, each process faults its "
                        "pages in")
    p.add_argument("--concurrency", type=int, default=2, help="client threads (default 2)")
    p.add_argument("--rate", type=float, default=None,
                   help="open-loop load: Poisson arrivals at this many requests/s over all client threads "
                        "(default: closed loop, each thread sends as soon as its last request returned)")
    p.add_argument("--idle-s", type=float, help="idle serving window in s (default 5; --quick 2)")
    p.add_argument("--gap-s", type=float, default=0.25, help="pause between refits under load (s)")
    p.add_argument("--tensors", type=int, default=8, help="weight tensors in the model (equal sizes)")
    p.add_argument("--no-fsync", action="store_true", help="fleet persist_fsync=False (default: fsync)")
    p.add_argument("--memory-mode", choices=["swap", "shared"], nargs="+", default=["swap"],
                   help="the fleets' memory_mode, one row each per size and N (shared: replicas serve "
                        "the object store's copy)")
    p.add_argument("--prefetch", choices=["on", "off"], nargs="+", default=["off"],
                   help="the fleets' prefetch (replicas copy each bucket as it is put), one row each: "
                        "'on off' measures both in one run")
    p.add_argument("--bucket-mib", type=float, nargs="+", default=[64.0],
                   help="the fleets' bucket_bytes in MiB, one row each (default 64, the fleet's default)")
    p.add_argument("--settled", type=int,
                   help="refits after the warm ones, each started once the previous version's checkpoint "
                        "is written, as in a loop refitting every few seconds (default: as many as --warm; "
                        "the warm ones are 0.1 s apart and overlap that write)")
    p.add_argument("--no-baselines", action="store_true", help="skip the reload and by-value baselines")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where the replicas serve (cuda: one GPU, N replicas on fractions of it; "
                        "floors add the pinned and pageable host-to-device speeds; no baselines)")
    p.add_argument("--host-to-device", choices=["pinned", "pageable"], nargs="+", default=["pinned"],
                   help="cuda: the fleets' host_to_device, one row each ('pinned pageable' measures both)")
    p.add_argument("--no-engine", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mem-fraction", type=float, default=0.75, help="memory ceiling for a row (of MemTotal)")
    p.add_argument("--workdir", type=Path, help="scratch directory (default: a temp dir, removed)")
    p.add_argument("--no-prealloc", action="store_true",
                   help="do not let Ray touch the object store's pages at start "
                        "(preallocate_plasma_memory): shows the page-fault cold start")
    p.add_argument("--ray-system-config", type=json.loads, default=None, help=argparse.SUPPRESS)
    p.add_argument("--plasma-directory", default=None,
                   help="where Ray's object store keeps its memory (default /dev/shm), e.g. a tmpfs "
                        "mounted with huge=always")
    p.add_argument("--_client", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--client-fleet", help=argparse.SUPPRESS)
    p.add_argument("--client-address", help=argparse.SUPPRESS)
    p.add_argument("--client-out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.rate is not None and a.rate <= 0:
        p.error(f"--rate {a.rate:g}: expected requests per second above 0")
    if a.device == "cuda" and not a._client:
        if not torch.cuda.is_available():
            p.error("--device cuda: torch sees no CUDA GPU here")
        if "shared" in a.memory_mode:
            p.error("--memory-mode shared serves from host memory: --device cpu only")
        a.no_baselines = True  # the baselines' replica-like actors run on the CPU
    a.sizes = a.sizes or ([64, 256] if a.quick else [64, 256, 1024])
    a.replicas = a.replicas or ([1, 2] if a.quick else [1, 2, 4])
    a.refits = a.refits if a.refits is not None else (6 if a.quick else 20)
    a.warm = a.warm if a.warm is not None else (3 if a.quick else 5)
    a.idle_s = a.idle_s if a.idle_s is not None else (2.0 if a.quick else 5.0)
    return a


def fits(size_bytes: int, n: int, frac: float, device: str = "cpu") -> tuple[bool, str]:
    """Whether a fleet row stays under ``frac`` of memory: 3 sets per replica (live, previous,
    staged/pooled), one version in the object store, the driver's validation temporaries, plus
    ~0.45 GiB per replica process and ~1.5 GiB for Ray, the coordinator and the client process.
    On cuda the sets are on the GPU (with ~0.6 GiB of context per replica, under ``frac`` of the
    card) and each replica reads the engine file into host memory once."""
    if device == "cuda":
        free, total = torch.cuda.mem_get_info(0)
        on_card = 3 * n * size_bytes + n * 0.6 * GiB
        if on_card > frac * free:
            return False, (f"needs ~{on_card / GiB:.1f} GiB of the GPU; {free / GiB:.1f} of "
                           f"{total / GiB:.1f} GiB free, ceiling {frac:.0%} of that")
    mi = meminfo()
    used_now = mi["MemTotal"] - mi["MemAvailable"]
    need = size_bytes * (3 * n + 1.25) + n * 0.45 * GiB + 1.5 * GiB
    if device == "cuda":
        need = size_bytes * (n + 2.25) + n * 1.5 * GiB + 1.5 * GiB
    budget = frac * mi["MemTotal"]
    ok = used_now + need <= budget
    return ok, (f"needs ~{need / GiB:.1f} GiB on top of {used_now / GiB:.1f} GiB in use; ceiling "
                f"{budget / GiB:.1f} GiB ({frac:.0%} of {mi['MemTotal'] / GiB:.1f} GiB)")


def write_result(path: Path, result: dict[str, Any], rows: list[dict[str, Any]], *, partial: bool) -> None:
    """``result`` with ``rows`` (without their serving timelines) as JSON; a run's results so far
    are marked ``"partial": true``, and the finished run writes over them."""
    done = [{k: v for k, v in r.items() if k != "serving_timeline"} for r in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    out = {**result, **({"partial": True} if partial else {}), "rows": rnd(done, 6),
           "floors": rnd(result["floors"], 6), "engine": rnd(result["engine"], 6)}
    path.write_text(json.dumps(out, indent=1, default=float) + "\n")


def print_table(rows: list[dict[str, Any]]) -> None:
    hdr = (f"{'MiB':>6} {'N':>2} {'mode':>6} {'pf':>3} {'bkt':>4} {'refit_s':>8} {'settled':>7} "
           f"{'cold_s':>7} {'floor_s':>8} {'ratio':>6} {'ratio_s':>7} "
           f"{'+extra':>7} "
           f"{'reload_s':>8} {'byval_s':>8} {'p99i':>6} {'p99r':>7} {'swap_us':>7} fail torn mix")
    print(hdr)
    def fmt_of(r: dict[str, Any], k: str, fmt: str) -> str:
        v = r.get(k)
        return format(v, fmt) if isinstance(v, (int, float)) else "-"

    for r in rows:
        def f(k: str, fmt: str, r: dict[str, Any] = r) -> str:
            return fmt_of(r, k, fmt)
        print(f"{r['model_mib']:6.0f} {r['replicas']:2d} {r['memory_mode']:>6} "
              f"{'on' if r.get('prefetch') else 'off':>3} {f('bucket_mib', '4.0f')} {f('refit_s', '8.3f')} "
              f"{f('refit_settled_s', '7.3f')} "
              f"{f('cold_refit_s', '7.3f')} {f('floor_s', '8.4f')} {f('ratio_to_floor', '6.1f')} "
              f"{f('settled_ratio_to_floor', '7.1f')} {f('floor_plus_extra_s', '7.3f')} "
              f"{f('reload_baseline_s', '8.3f')} {f('byvalue_baseline_s', '8.3f')} "
              f"{f('p99_idle_ms', '6.2f')} "
              f"{f('p99_refit_ms', '7.2f')} {f('swap_us', '7.1f')} {r.get('failed', '-'):>4} "
              f"{r.get('torn', '-'):>4} {r.get('mixed', '-'):>3}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._client:
        return client_main(args)
    torch.set_num_threads(1)
    import ray

    cores = os.cpu_count() or 1
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-refit-"))
    workdir.mkdir(parents=True, exist_ok=True)
    max_bytes = max(model_shape(s, args.tensors)[1] for s in args.sizes)
    # shared mode: the replicas serve the live and previous versions from the store, beside the next one
    store_bytes = int(max((4.25 if "shared" in args.memory_mode else 2.25) * max_bytes, 256 * MiB))
    # address="local": always a fresh Ray of our own, never another process's cluster on this machine
    init: dict[str, Any] = {"address": "local", "num_cpus": max(4, 2 * max(args.replicas) + 2),
                            "object_store_memory": store_bytes,
                            "include_dashboard": False, "log_to_driver": False}
    if args.device == "cuda":
        init["num_gpus"] = 1  # every replica on fractions of the first GPU
    from cluster.placement import local_ray_system_config

    # what `weight-refit launch` gives a Ray it starts (cluster.placement.local_ray_init_kwargs)
    system_config: dict[str, Any] = local_ray_system_config()
    if not args.no_prealloc:
        system_config["preallocate_plasma_memory"] = True
    system_config.update(args.ray_system_config or {})
    if system_config:
        init["_system_config"] = system_config
    if args.plasma_directory:
        init["_plasma_directory"] = args.plasma_directory
    log(f"starting a local Ray: {init}")
    ray.init(**init)
    store = StoreProbe()
    result: dict[str, Any] = {
        "benchmark": "weight-refit refit (issue 5)", "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine_info(), "code": code_version(),
        "config": {"sizes_mib": args.sizes, "replicas": args.replicas, "tensors": args.tensors,
                   "refits_under_load": args.refits, "warm_refits": args.warm,
                   "concurrency": args.concurrency, "rate": args.rate,
                   "idle_s": args.idle_s, "gap_s": args.gap_s, "persist_fsync": not args.no_fsync,
                   "object_store_memory": store_bytes, "torch_threads": 1, "keep_previous": True,
                   "memory_mode": args.memory_mode, "device": args.device,
                   "host_to_device": args.host_to_device if args.device == "cuda" else None,
                   "ray_system_config": system_config, "quick": args.quick,
                   "plasma_directory": args.plasma_directory or "/dev/shm (Ray's default)"},
        "floors": {}, "engine": {}, "rows": [], "skipped": [],
    }
    rows: list[dict[str, Any]] = []
    try:
        for size_mib in args.sizes:
            rows_n, size_bytes = model_shape(size_mib, args.tensors)
            log(f"== model {size_bytes / MiB:.0f} MiB: {args.tensors} x ({rows_n}, {COLS}) float32")
            engine_path = workdir / f"model-{int(size_mib)}m.engine"
            t = time.perf_counter()
            build_model_engine(engine_path, args.tensors, rows_n)
            log(f"  engine built and saved in {time.perf_counter() - t:.1f}s")
            weights = {f"w.{i}": torch.full((rows_n, COLS), 1.0) for i in range(args.tensors)}
            floors = measure_floors(size_bytes, weights, args.replicas, workdir, args.quick)
            if args.device == "cuda":
                floors.update(measure_h2d(size_bytes, 3 if args.quick else 5))
                log(f"  {floors['card']}: host-to-device {floors['h2d_pinned_gbps']:.1f} GB/s pinned, "
                    f"{floors['h2d_pageable_gbps']:.1f} GB/s pageable")
            result["floors"][str(size_bytes)] = floors
            log(f"  floors: memcpy {floors['memcpy_gbps']:.1f} GB/s ({floors['copy_s'] * 1e3:.1f} ms; "
                f"into fresh memory {floors['fresh_copy_gbps']:.2f} GB/s), checksum "
                f"{floors['checksum_s'] * 1e3:.1f} ms, persist {floors['persist_fsync_s']:.3f}s fsync / "
                f"{floors['persist_nofsync_s']:.3f}s no fsync, "
                f"parallel copies {floors['parallel_copies_s']}")
            if not args.no_engine:
                eng = measure_engine(engine_path, weights, size_bytes,
                                     floors.get("h2d_pinned_gbps", floors["memcpy_gbps"]), args.quick,
                                     "cuda" if args.device == "cuda" else "cpu")
                result["engine"][str(size_bytes)] = eng
                log(f"  engine alone: stage first {eng['stage_first_s']:.3f}s, "
                    f"warm {eng['stage_warm_s']:.3f}s "
                    f"({eng['stage_gbps']:.2f} GB/s = {eng['stage_vs_memcpy']:.0%} of memcpy); copy only "
                    f"{eng['copy_only_stage_warm_s']:.3f}s ({eng['copy_only_stage_vs_memcpy']:.0%}); swap "
                    f"{eng['swap_ns_median'] / 1e3:.1f} us median, {eng['swap_ns_max'] / 1e3:.1f} us max")
            for n in args.replicas:
                ok, why = fits(size_bytes, n, args.mem_fraction, args.device)
                if not ok:
                    log(f"-- skip {size_bytes / MiB:.0f} MiB x {n}: {why}")
                    result["skipped"].append({"model_bytes": size_bytes, "replicas": n, "reason": why})
                    continue
                mode_rows = []
                h2d_modes = args.host_to_device if args.device == "cuda" else ["pinned"]
                for mode, prefetch, bucket_mib, h2d in itertools.product(args.memory_mode, args.prefetch,
                                                                          args.bucket_mib, h2d_modes):
                    log(f"-- row {size_bytes / MiB:.0f} MiB x {n} replica(s) on {args.device}, memory_mode "
                        f"{mode}, prefetch {prefetch}, buckets of {bucket_mib:g} MiB"
                        + (f", host_to_device {h2d}" if args.device == "cuda" else ""))
                    try:
                        mode_rows.append(run_row(size_mib, n, engine_path, weights, size_bytes, floors, args,
                                                 workdir, store, cores,
                                                 args.mem_fraction * meminfo()["MemTotal"], mode,
                                                 prefetch == "on", bucket_mib, h2d))
                    except Exception as exc:  # noqa: BLE001
                        log(f"   row failed: {type(exc).__name__}: {exc}")
                        result["skipped"].append({"model_bytes": size_bytes, "replicas": n,
                                                  "memory_mode": mode, "prefetch": prefetch,
                                                  "bucket_mib": bucket_mib, "host_to_device": h2d,
                                                  "reason": f"failed: {type(exc).__name__}: {exc}"})
                if not mode_rows:
                    continue
                baselines: dict[str, Any] = {"reload_baseline_s": None, "byvalue_baseline_s": None}
                if not args.no_baselines:  # once per size and N: they do not depend on the fleet's mode
                    mi = meminfo()
                    budget = args.mem_fraction * mi["MemTotal"] - (mi["MemTotal"] - mi["MemAvailable"])
                    baselines = run_baselines(engine_path, weights, n, size_bytes, workdir, args.quick,
                                              5000.0, budget)
                for row in mode_rows:
                    row.update(baselines)
                    for key in ("reload_baseline_s", "byvalue_baseline_s"):
                        if row.get(key):
                            row[key.replace("_baseline_s", "_speedup")] = row[key] / row["refit_s"]
                    log(f"   => {row['memory_mode']}, prefetch {row['prefetch']}, "
                        f"buckets of {row['bucket_mib']:g} MiB: "
                        f"refit {row['refit_s']:.3f}s "
                        f"(cold {row['cold_refit_s']:.3f}s) "
                        f"floor {row['floor_s']:.4f}s ratio {row['ratio_to_floor']:.1f}x; reload "
                        f"{row.get('reload_baseline_s') or float('nan'):.3f}s by-value "
                        f"{row.get('byvalue_baseline_s') or float('nan'):.3f}s")
                    if row.get("stage_gbps"):
                        log(f"   => host_to_device {row['host_to_device']}: the replicas staged "
                            f"{row['stage_gbps']:.1f} GB/s together, {row['stage_over_pinned_h2d']:.0%} of "
                            f"pinned host-to-device")
                    rows.append(row)
                    if args.json:  # what a run cut short (a time limit) still leaves
                        write_result(args.json, result, rows, partial=True)
            del weights
            gc.collect()
            engine_path.unlink(missing_ok=True)
    finally:
        ray.shutdown()
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    if args.png:
        log(draw_png(rows, args.png))
    for r in rows:
        r.pop("serving_timeline", None)
        for k in ("profile_warm", "profile_cold", "profile_under_load"):
            r[k] = {kk: vv for kk, vv in r[k].items()}
    result["machine"]["loadavg_end"] = os.getloadavg()
    print_table(rows)
    for s in result["skipped"]:
        print(f"skipped {s['model_bytes'] / MiB:.0f} MiB x {s['replicas']}: {s['reason']}")
    if args.json:
        write_result(args.json, result, rows, partial=False)
        log(f"JSON written: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
