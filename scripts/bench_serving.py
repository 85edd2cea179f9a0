"""Serving throughput: requests/s and p50/p99 latency of a fleet, batching on and off, idle and
during refits, side by side with what a user would pick instead: a plain Ray Serve deployment of
the same engine (``@serve.batch`` for batching), called through its handle, in the same run.

Both serve the same engine file (an MLP with a dynamic batch dim) from 2 replicas with one torch
thread each, on one local Ray; clients are threads of this process, each with its own handle,
each sending one sample per request in a closed loop. Serve has no refit: its rows are idle only.
Needs ``ray[serve]`` (``pip install -e .[bench]``). Writes JSON (``--out``).

    python scripts/bench_serving.py --seconds 4 --out benchmarks/results/serving-2026-12-05.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WIDTH, HIDDEN = 512, 2048
BATCH, WAIT_MS = 16, 5.0


def build(path: Path) -> None:
    import torch

    from engines import BuilderConfig, build_engine

    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(WIDTH, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, WIDTH))
    config = BuilderConfig(enable_refit=True, dynamic_batch=(1, 64))
    build_engine(mlp, [torch.randn(2, WIDTH)], config).save(path)


def closed_loop(call: Callable[[np.ndarray], Any], clients: int, seconds: float) -> dict[str, float]:
    """``clients`` threads calling in a closed loop for ``seconds``; throughput and latencies."""
    stop = threading.Event()
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []

    def client(k: int) -> None:
        x = np.random.default_rng(k).standard_normal((1, WIDTH), dtype=np.float32)
        while not stop.is_set():
            t = time.perf_counter()
            try:
                call(x)
            except Exception as exc:  # noqa: BLE001  (counted and reported)
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            latencies[k].append(time.perf_counter() - t)

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    time.sleep(seconds)
    stop.set()
    for th in threads:
        th.join(60)
    elapsed = time.perf_counter() - t0
    flat = np.array([v for per in latencies for v in per]) * 1000
    return {"requests_per_s": round(len(flat) / elapsed, 1),
            "p50_ms": round(float(np.percentile(flat, 50)), 2) if len(flat) else None,
            "p99_ms": round(float(np.percentile(flat, 99)), 2) if len(flat) else None,
            "requests": int(len(flat)), "errors": len(errors), "first_error": errors[0] if errors else None}


class Refitter:
    """Refits the fleet back to back with fresh weights while it runs (``during refits`` rows)."""

    def __init__(self, fleet: Any, manifest: dict[str, Any]) -> None:
        self._fleet, self._manifest = fleet, manifest
        self._stop = threading.Event()
        self.refits = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        rng = np.random.default_rng(7)
        sets = [{n: rng.standard_normal(tuple(s["shape"]), dtype=np.float32) * 0.01
                 for n, s in self._manifest.items()} for _ in range(2)]
        while not self._stop.is_set():
            self._fleet.refit(sets[self.refits % 2])
            self.refits += 1

    def __enter__(self) -> Refitter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(120)


def fleet_rows(engine: Path, state: Path, clients: list[int], seconds: float) -> list[dict]:
    from cluster import Fleet, FleetConfig

    rows = []
    for batching in (False, True):
        cfg = FleetConfig(name=f"bench-serving-{int(batching)}", engine=str(engine), replicas=2,
                          state_dir=str(state / str(batching)), torch_threads=1,
                          batching={"max_batch_size": BATCH, "max_wait_ms": WAIT_MS} if batching else None)
        fleet = Fleet.launch(cfg)
        try:
            handles: dict[int, Any] = {}

            def call(x: np.ndarray, handles: dict[int, Any] = handles, name: str = cfg.name) -> Any:
                h = handles.get(threading.get_ident())
                if h is None:
                    h = handles[threading.get_ident()] = Fleet.connect(name)
                return h.infer(x)

            closed_loop(call, max(clients), 1.0)  # warm-up: handles, threads, first batches
            for n in clients:
                rows.append({"system": "weight-refit", "batching": batching, "clients": n, "load": "idle",
                             **closed_loop(call, n, seconds)})
                print(json.dumps(rows[-1]), flush=True)
                with Refitter(fleet, fleet.manifest()) as refitter:
                    row = closed_loop(call, n, seconds)
                rows.append({"system": "weight-refit", "batching": batching, "clients": n, "load": "refits",
                             "refits": refitter.refits, **row})
                print(json.dumps(rows[-1]), flush=True)
        finally:
            fleet.shutdown()
    return rows


def serve_rows(engine: Path, clients: list[int], seconds: float) -> list[dict]:
    from ray import serve

    serve.start(proxy_location="Disabled")
    rows = []
    for batching in (False, True):
        app = _deployment(batching).bind(str(engine))
        handle = serve.run(app, name=f"bench{int(batching)}", route_prefix=None)

        def call(x: np.ndarray, handle: Any = handle) -> Any:
            return handle.remote(x).result()

        closed_loop(call, max(clients), 1.0)
        for n in clients:
            rows.append({"system": "ray-serve", "batching": batching, "clients": n, "load": "idle",
                         **closed_loop(call, n, seconds)})
            print(json.dumps(rows[-1]), flush=True)
        serve.delete(f"bench{int(batching)}")
    serve.shutdown()
    return rows


def _deployment(batching: bool) -> Any:
    from ray import serve

    options = {"num_replicas": 2, "max_ongoing_requests": 256, "ray_actor_options": {"num_cpus": 0.01}}

    class Plain:
        def __init__(self, path: str) -> None:
            import torch

            from engines import load_engine

            torch.set_num_threads(1)
            self.engine = load_engine(path)

        def __call__(self, x: np.ndarray) -> np.ndarray:
            return self.engine.infer(x).outputs[0]

    class Batched(Plain):
        @serve.batch(max_batch_size=BATCH, batch_wait_timeout_s=WAIT_MS / 1000)
        async def __call__(self, xs: list[np.ndarray]) -> list[np.ndarray]:  # type: ignore[override]
            out = self.engine.infer(np.concatenate(xs)).outputs[0]
            return np.split(out, np.cumsum([x.shape[0] for x in xs])[:-1])

    return serve.deployment(**options)(Batched if batching else Plain)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--seconds", type=float, default=4.0, help="per row (default: %(default)s)")
    p.add_argument("--out", type=Path, help="write the JSON here")
    p.add_argument("--no-serve", action="store_true", help="only the fleet's rows")
    args = p.parse_args(argv)

    import ray

    work = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    engine = work / "mlp.engine"
    build(engine)
    # address="local": a fresh Ray of our own, never another process's cluster on this machine
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    rows = fleet_rows(engine, work / "state", args.clients, args.seconds)
    if not args.no_serve:
        rows += serve_rows(engine, args.clients, args.seconds)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.node()} ({platform.machine()}, "
              f"{__import__('os').cpu_count()} cores)", "model": f"MLP {WIDTH}-{HIDDEN}-{WIDTH} float32",
              "replicas": 2, "torch_threads": 1, "max_batch_size": BATCH, "max_wait_ms": WAIT_MS,
              "seconds_per_row": args.seconds, "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
