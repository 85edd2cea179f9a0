"""History-independent cost: refit, coordinator restart and replica catch-up at 100, 1,000 and
10,000 committed versions of a 200-tensor model (50 kB), measured in one run.

For each history length N a fleet is launched on a fresh state dir and refit once for real; the
fleet is shut down and its log is extended to N committed versions in the log's own format (the
real transaction's BEGIN/COMMIT/ACTIVATED/PERSISTED records, renumbered), then compacted exactly
as the coordinator compacts it (``LogState.compacted`` with the fleet's ``history_window``; the rest
goes to ``txn.archive.jsonl``), so the state dir is what a fleet that made N refits holds. The
newest version's checkpoint is the real one's, renumbered. The fleet is launched again on it, and:

- **restart**: the coordinator is killed (Ray restarts it); from the kill until its recovery is
  ``ready`` at the next epoch;
- **catch-up**: a replica is killed (Ray restarts it); from the kill until it serves the active
  version as a member again;
- **refit**: the median of ``--refits`` refits with new weights;
- the log's size, the archive's size and the coordinator's resident memory after the refits.

    python scripts/bench_history.py --json benchmarks/results/history-2026-12-02.json
    python scripts/bench_history.py --versions 100 1000 --refits 10    # quicker

Uses its own local Ray (``address="local"``), never a cluster already running on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TENSORS = 200
WIDTH = 64  # 200 x 64 float32 = 50 kB


class ManySmallTensors(torch.nn.Module):
    """200 weight vectors; the output is x weighted by each, summed (every weight is read)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(WIDTH)) for _ in range(TENSORS)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x * 0
        for w in self.w:
            out = out + x * w
        return out


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_engine_file(path: Path) -> None:
    from engines import BuilderConfig, build_engine

    build_engine(ManySmallTensors(), [torch.ones(WIDTH)], BuilderConfig(enable_refit=True)).save(path)


def weights(value: float) -> dict[str, torch.Tensor]:
    return {f"w.{i}": torch.full((WIDTH,), value + i * 1e-3) for i in range(TENSORS)}


def wait_until(check: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            got = check()
            if got:
                return got
        except Exception as e:  # noqa: BLE001 - the actor is restarting: ask again
            last = e
        time.sleep(0.005)
    raise TimeoutError(f"{what} did not happen within {timeout_s} s (last error: {last})")


def synthesize_history(state_dir: Path, versions: int, window: int) -> dict[str, Any]:
    """Extend the log of a fleet that refit once (v1) to ``versions`` committed versions."""
    from actors.log import (
        LOG_NAME,
        ActivatedRecord,
        BeginRecord,
        CommitRecord,
        PersistedRecord,
        TxnLog,
        dump_record,
        replay,
    )

    records = TxnLog.open(state_dir, readonly=True).records()
    head = [r for r in records if not hasattr(r, "txn")]
    template = {type(r): r for r in records if getattr(r, "version", None) == 1 and hasattr(r, "txn")}
    begin = template[BeginRecord]
    t0 = begin.ts - versions * 10.0  # one refit every 10 s, as an RL loop might
    body: list[Any] = []
    for v in range(1, versions + 1):
        txn, ts = uuid.uuid4().hex, t0 + 10.0 * v
        body += [begin.model_copy(update={"txn": txn, "version": v, "key": f"history-{v}", "ts": ts}),
                 CommitRecord(epoch=begin.epoch, txn=txn, version=v, ts=ts + 0.01),
                 ActivatedRecord(epoch=begin.epoch, txn=txn, version=v, duration_s=0.02, ts=ts + 0.02)]
        if begin.durability == "replicated":
            body.append(PersistedRecord(epoch=begin.epoch, txn=txn, version=v, ts=ts + 0.05))
    full = replay(head + body)
    kept, dropped = full.compacted(window, {versions})
    raw_bytes = sum(len(dump_record(r)) for r in head + body)
    (state_dir / "txn.archive.jsonl").write_bytes(b"".join(dump_record(r) for r in dropped))
    (state_dir / LOG_NAME).write_bytes(b"".join(dump_record(r) for r in kept))
    store = state_dir / "checkpoints"
    manifest = json.loads((store / "v1.json").read_text())
    os.replace(store / "v1.safetensors", store / f"v{versions}.safetensors")
    manifest.update(version=versions, file=f"v{versions}.safetensors")
    (store / f"v{versions}.json").write_text(json.dumps(manifest))
    (store / "v1.json").unlink()
    return {"uncompacted_log_bytes": raw_bytes, "log_records": len(kept), "archived_records": len(dropped)}


def coordinator_rss(fleet: Any) -> int:
    import ray

    pid = ray.get(fleet._coord.__ray_call__.remote(lambda self: os.getpid()))
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def measure(versions: int, engine: Path, root: Path, refits: int, window: int) -> dict[str, Any]:
    import ray

    from cluster import Fleet, FleetConfig

    name = f"hist{versions}"
    state_dir = root / name
    cfg = FleetConfig(name=name, engine=str(engine), replicas=2, state_dir=str(state_dir),
                      history_window=window, timeouts={"lease_s": 2})
    fleet = Fleet.launch(cfg)
    fleet.refit(weights(1.0), key="history-1")
    fleet.wait_persisted(1, timeout=60)
    fleet.shutdown()
    shape = synthesize_history(state_dir, versions, window)
    fleet = Fleet.launch(cfg)
    try:
        assert fleet.status()["version"] == versions, fleet.status()
        epoch = fleet.status()["epoch"]
        t = time.perf_counter()
        ray.kill(fleet._coord, no_restart=False)
        wait_until(lambda: (s := fleet.status())["epoch"] == epoch + 1 and s["recovery"]["state"] == "ready",
                   120, "the coordinator's recovery")
        restart_s = time.perf_counter() - t
        handles = ray.get(fleet._coord.member_handles.remote())
        t = time.perf_counter()
        ray.kill(handles["r1"], no_restart=False)
        wait_until(lambda: ray.get(handles["r1"].ping.remote(), timeout=2) == "r1", 120, "r1 restarted")

        def r1_serves() -> bool:
            rows = {r["id"]: r for r in fleet.status()["replicas"]}
            r1 = rows.get("r1", {})
            return (r1.get("membership") == "member" and r1.get("version") == versions
                    and bool(r1.get("healthy")))

        wait_until(r1_serves, 120, "r1 back as a member on the active version")
        catch_up_s = time.perf_counter() - t
        times = []
        for i in range(refits):
            t = time.perf_counter()
            res = fleet.refit(weights(2.0 + i))
            times.append(time.perf_counter() - t)
            assert res.version == versions + 1 + i, res
        log_path = state_dir / "txn.log"
        row = {"versions": versions, "restart_s": restart_s, "catch_up_s": catch_up_s,
               "refit_median_s": statistics.median(times), "refit_s": times,
               "log_bytes_after": log_path.stat().st_size,
               "archive_bytes_after": (state_dir / "txn.archive.jsonl").stat().st_size,
               "coordinator_rss_bytes": coordinator_rss(fleet),
               "history_rows": len(fleet.history()), **shape}
        log(f"N={versions}: refit {row['refit_median_s'] * 1e3:.1f} ms, restart {restart_s:.2f} s, "
            f"catch-up {catch_up_s:.2f} s, log {row['log_bytes_after'] / 1e6:.2f} MB, "
            f"coordinator RSS {row['coordinator_rss_bytes'] / 2**20:.0f} MiB")
        return row
    finally:
        fleet.shutdown()


def provenance(benchmark: str) -> dict[str, Any]:
    """What every result file starts with: the benchmark, the date, the commit, the machine."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    return {"benchmark": benchmark, "date": time.strftime("%Y-%m-%d"), "commit": commit,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "loadavg": os.getloadavg()}}


def write_json(path: Path | None, doc: dict[str, Any]) -> int:
    """Write ``doc`` to ``path`` (if given), creating its folder; 0, the exit status."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--versions", type=int, nargs="+", default=[100, 1000, 10000])
    p.add_argument("--refits", type=int, default=20, help="refits measured at each history length")
    p.add_argument("--history-window", type=int, default=1000, help="the fleet's history_window")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)

    import ray

    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="bench-history-"))
    try:
        ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="ERROR")
        engine = root / "many.engine"
        build_engine_file(engine)
        rows = [measure(n, engine, root, args.refits, args.history_window) for n in args.versions]
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    base = rows[0]
    for r in rows:
        r["refit_ratio_to_first"] = r["refit_median_s"] / base["refit_median_s"]
        r["restart_ratio_to_first"] = r["restart_s"] / base["restart_s"]
        r["catch_up_ratio_to_first"] = r["catch_up_s"] / base["catch_up_s"]
    out = {**provenance("history"),
           "model": {"tensors": TENSORS, "bytes": TENSORS * WIDTH * 4},
           "history_window": args.history_window, "rows": rows}
    print(f"{'versions':>9} {'refit ms':>9} {'x':>5} {'restart s':>9} {'x':>5} {'catch-up s':>10} {'x':>5} "
          f"{'log MB':>7} {'coord MiB':>9}")
    for r in rows:
        print(f"{r['versions']:>9} {r['refit_median_s'] * 1e3:>9.1f} {r['refit_ratio_to_first']:>5.2f} "
              f"{r['restart_s']:>9.2f} {r['restart_ratio_to_first']:>5.2f} {r['catch_up_s']:>10.2f} "
              f"{r['catch_up_ratio_to_first']:>5.2f} {r['log_bytes_after'] / 1e6:>7.2f} "
              f"{r['coordinator_rss_bytes'] / 2**20:>9.0f}")
    return write_json(args.json, out)


if __name__ == "__main__":
    raise SystemExit(main())
