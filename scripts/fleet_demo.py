"""The multi-thread sample across a fleet (the README's main job).

Launches the fleet of ``--config`` (default ``configs/local-cpu.yaml``: 2 replicas on this machine's
CPU; a local Ray is started when none is given), builds the sample engine first if its file is
missing, then runs client threads that infer all-ones inputs while the driver refits the kernel to
all 1, all 2, ..., all 9. Prints each refit's version and timing, the per-replica versions, and a
summary. Exits 1 if any response was not a multiple of 9, did not match the version that produced
it, or if any client saw its versions go backwards.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _conv import WEIGHT_NAME, load_or_build  # noqa: E402

from actors.durable import StateDirInUse, StateDirLock  # noqa: E402
from cluster import Fleet, FleetConfig  # noqa: E402

STEPS = 9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/local-cpu.yaml"))
    parser.add_argument("--clients", type=int, default=3, help="client threads (default: %(default)s)")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between refits")
    parser.add_argument("--keep", action="store_true", help="leave the fleet running at the end")
    parser.add_argument("--fresh", action="store_true", help="delete the fleet's state dir first")
    args = parser.parse_args(argv)

    cfg = FleetConfig.from_yaml(args.config)
    if not Path(cfg.engine).exists():
        load_or_build(Path(cfg.engine), "cpu")
        print(f"built sample engine {cfg.engine}")
    if args.fresh:
        try:
            StateDirLock(cfg.state_dir).check_free(wait_s=0.0)
        except StateDirInUse as exc:
            print(f"error: {exc}: shut that fleet down first (weight-refit shutdown --fleet {cfg.name}), "
                  "or use another state_dir", file=sys.stderr)
            return 1
        shutil.rmtree(cfg.state_dir, ignore_errors=True)
    t = time.perf_counter()
    fleet = Fleet.launch(cfg)
    print(f"fleet {cfg.name!r}: {cfg.replicas} replicas on {cfg.device} ready in "
          f"{time.perf_counter() - t:.1f}s, version {fleet.status()['version']}")
    base = fleet.refit({WEIGHT_NAME: np.zeros((1, 1, 3, 3), np.float32)})
    expected_of = {base.version: 0.0}
    x = np.ones((1, 1, 3, 3), np.float32)
    stop = threading.Event()
    problems: list[str] = []
    counts = {"responses": 0}
    lock = threading.Lock()

    def client(i: int) -> None:
        handle = Fleet.connect(cfg.name, cfg.namespace)
        last_version = -1
        while not stop.is_set():
            r = handle.infer(x)
            value = float(r.outputs[0].ravel()[0])
            with lock:
                counts["responses"] += 1
                want = expected_of.get(r.version)
            if value % 9 != 0 or (want is not None and value != want):
                problems.append(f"client {i}: result {value:g} at version {r.version}")
            if r.version < last_version:
                problems.append(f"client {i}: version went back {last_version} -> {r.version}")
            last_version = r.version

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)]
    for th in threads:
        th.start()
    try:
        for step in range(1, STEPS + 1):
            time.sleep(args.interval)
            with lock:
                pending = dict(expected_of)
            res = fleet.refit({WEIGHT_NAME: np.full((1, 1, 3, 3), step, np.float32)})
            with lock:
                expected_of.update(pending)
                expected_of[res.version] = 9.0 * step
            r = fleet.infer(x)
            print(f"refit to all {step}: version {res.version} in {res.duration_s * 1000:.1f} ms; "
                  f"result: {float(r.outputs[0].ravel()[0]):g} (replica {r.replica})", flush=True)
    finally:
        stop.set()
        for th in threads:
            th.join(timeout=30)
    status = fleet.status()
    for rep in status["replicas"]:
        print(f"replica {rep['id']}: version {rep['version']} state {rep['state']} device {rep['device']}")
    print(f"{counts['responses']} responses from {args.clients} clients; "
          f"{len(problems)} problem(s); fleet version {status['version']}")
    for p in problems[:10]:
        print("PROBLEM:", p)
    if not args.keep:
        fleet.shutdown()
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
