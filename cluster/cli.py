"""``weight-refit``: the command line for fleet operations.

Exit codes scripts can rely on: 0 ok; 1 bad input (refused before anything changed); 2 the refit
or rollback aborted (the fleet stays on its version); 3 no such fleet or no Ray cluster; 4 any
other failure. Errors print one line on stderr. ``--json`` prints one JSON document on stdout.
"""

from __future__ import annotations

import json
import os
import runpy
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Hot weight updates for a Ray fleet of inference engines.")
out = Console()
err = Console(stderr=True)
SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"

FleetOpt = typer.Option(..., "--fleet", "-f", help="fleet name (the config's `name`)")
NamespaceOpt = typer.Option("weight-refit", "--namespace", help="Ray namespace of the fleet")
AddressOpt = typer.Option(None, "--address", help="Ray address (default: RAY_ADDRESS, else 'auto')")
JsonOpt = typer.Option(False, "--json", help="print one JSON document on stdout")


def _fail(code: int, message: str) -> None:
    err.print(f"error: {message}", highlight=False, markup=False, soft_wrap=True)
    raise typer.Exit(code)


def _connect(name: str, namespace: str, address: str | None) -> Any:
    from cluster import Fleet, FleetNotFound

    try:
        return Fleet.connect(name, namespace, address=address or os.environ.get("RAY_ADDRESS") or "auto")
    except FleetNotFound as exc:
        _fail(3, str(exc))
    except ValueError as exc:
        _fail(1, str(exc))
    except ConnectionError as exc:
        _fail(3, f"no Ray cluster to connect to ({str(exc).splitlines()[0]}); start one with "
                 f"`weight-refit launch` or `ray start --head`")


def _guard(fn: Any) -> Any:
    """Map the library's errors to exit codes and one-line messages."""
    from cluster import RefitAborted
    from cluster.errors import FleetError
    from engines import EngineError

    try:
        return fn()
    except typer.Exit:
        raise
    except RefitAborted as exc:
        _fail(2, str(exc))
    except (EngineError, ValueError, FileNotFoundError) as exc:
        _fail(1, str(exc).splitlines()[0])
    except FleetError as exc:
        _fail(4, str(exc).splitlines()[0])
    except Exception as exc:  # noqa: BLE001  (one line, never a traceback)
        _fail(4, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, default=str, indent=2) + "\n")


# ---------------------------------------------------------------------------- commands


@app.command()
def demo(interval: float = typer.Option(0.2, help="seconds between refits (multi-thread sample)")) -> None:
    """Run the seed samples on the CPU: single-thread (0 then 9) and multi-thread (0 ... 81)."""
    for name, argv in (("gen_model.py", []), ("single_thread.py", []),
                       ("multi_thread.py", ["--interval", str(interval)])):
        path = SCRIPTS / name
        if not path.exists():
            _fail(4, f"sample {path} not found (the samples ship with the source tree)")
        sys.argv = [str(path), *argv]
        try:
            runpy.run_path(str(path), run_name="__main__")
        except SystemExit as exc:
            if exc.code not in (0, None):
                raise typer.Exit(4) from None


def _ray_running(address: str | None) -> bool:
    import ray

    try:
        ray.init(address=address or "auto", log_to_driver=False)
        return True
    except (ConnectionError, RuntimeError):
        return False


@app.command()
def launch(config: Path = typer.Option(..., "--config", "-c", exists=True, dir_okay=False,
                                       help="fleet config YAML"),
           fresh: bool = typer.Option(False, help="delete the fleet's state dir first"),
           json_out: bool = JsonOpt) -> None:
    """Launch a fleet that outlives this command (a local Ray head is started if none runs)."""
    from cluster import Fleet, FleetConfig

    cfg = _guard(lambda: FleetConfig.from_yaml(config))
    if not Path(cfg.engine).exists():
        _fail(1, f"engine file {cfg.engine!r} does not exist (build one: python scripts/gen_model.py)")
    if fresh:
        shutil.rmtree(cfg.state_dir, ignore_errors=True)
    address = os.environ.get("RAY_ADDRESS") or cfg.address
    if not _ray_running(address):
        if address:
            _fail(3, f"no Ray cluster at {address}")
        init = cfg.ray_init
        cmd = ["ray", "start", "--head", "--disable-usage-stats"]
        if "num_cpus" in init:
            cmd.append(f"--num-cpus={init['num_cpus']}")
        if "object_store_memory" in init:
            cmd.append(f"--object-store-memory={init['object_store_memory']}")
        ray_bin = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
        started = subprocess.run([ray_bin, *cmd[1:]], capture_output=True, text=True)
        if started.returncode != 0:
            _fail(4, f"`ray start --head` failed: {started.stderr.strip().splitlines()[-1:]}")
        if not _ray_running("auto"):
            _fail(4, "started a Ray head but cannot connect to it")
    t0 = time.perf_counter()
    fleet = _guard(lambda: Fleet.launch(cfg))
    status = _guard(fleet.status)
    if json_out:
        _print_json({"fleet": cfg.name, "launch_s": time.perf_counter() - t0, **status})
    else:
        out.print(f"fleet [bold]{cfg.name}[/] ready: {len(status['replicas'])} replicas, "
                  f"version {status['version']} ({time.perf_counter() - t0:.1f}s)")


def _refit_with_progress(fleet: Any, run: Any, nbytes: int | None) -> Any:
    """Run ``run()`` (a refit/rollback) while showing per-replica progress from the coordinator.
    A terminal gets a rich progress bar with an ETA; other outputs get plain lines."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = run()
        except BaseException as exc:  # noqa: BLE001  (re-raised in the caller's thread)
            result["error"] = exc

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    interactive = err.is_terminal
    last_line = ""
    if interactive:
        from rich.progress import (
            BarColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns = (TextColumn("{task.description}"), BarColumn(),
                   TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(), TimeRemainingColumn())
        with Progress(*columns, console=err, transient=True) as bar:
            task = bar.add_task("publishing" + (f" {nbytes / 2**20:.1f} MiB" if nbytes else ""), total=None)
            while worker.is_alive():
                p = _safe_progress(fleet)
                if p:
                    n = len(p["members"])
                    done = len(p["votes"]) + len(p["activated"])
                    bar.update(task, total=2 * n, completed=done,
                               description=f"v{p['version']} {p['phase']}: {len(p['votes'])}/{n} prepared, "
                                           f"{len(p['activated'])}/{n} active")
                worker.join(0.2)
    else:
        while worker.is_alive():
            p = _safe_progress(fleet)
            if p:
                line = (f"v{p['version']} {p['phase']}: {len(p['votes'])}/{len(p['members'])} prepared, "
                        f"{len(p['activated'])}/{len(p['members'])} active, {p['elapsed_s']:.1f}s")
                if line != last_line:
                    err.print(line, highlight=False)
                    last_line = line
            worker.join(0.5)
    if "error" in result:
        raise result["error"]
    return result["value"]


def _safe_progress(fleet: Any) -> dict[str, Any] | None:
    try:
        return fleet.progress()
    except Exception:  # noqa: BLE001  (progress is best effort)
        return None


def _result_dict(res: Any) -> dict[str, Any]:
    return {"status": "noop" if res.noop else "committed", "version": res.version, "txn": res.txn,
            "duration_s": round(res.duration_s, 6), "duplicate": res.duplicate, "excluded": res.excluded,
            "replicas": res.replicas}


@app.command()
def refit(weights: Path = typer.Argument(..., help=".safetensors, .pt (tensors only) or .npz"),
          fleet_name: str = FleetOpt, namespace: str = NamespaceOpt, address: str = AddressOpt,
          key: str = typer.Option(None, "--key", help="idempotency key: a retry returns the first outcome"),
          dry_run: bool = typer.Option(False, "--dry-run", help="validate against the fleet; stage nothing"),
          strip_prefix: str = typer.Option(None, "--strip-prefix", help="drop this prefix from names"),
          complete: bool = typer.Option(False, "--complete", help="refuse a file lacking any weight"),
          json_out: bool = JsonOpt) -> None:
    """Publish a weights file and refit every replica (two-phase commit)."""
    if not weights.is_file():
        _fail(1, f"weights file {str(weights)!r} does not exist")
    fleet = _connect(fleet_name, namespace, address)
    if dry_run:
        report = _guard(lambda: fleet.validate(weights, strip_prefix=strip_prefix, complete=complete))
        if json_out:
            _print_json(report)
        else:
            kept = f"; not in the file (kept as they are): {report['missing']}" if report["missing"] else ""
            out.print(f"valid: {report['tensors']} tensors, {report['bytes']} bytes{kept}")
        return
    res = _guard(lambda: _refit_with_progress(
        fleet, lambda: fleet.refit(weights, key=key, strip_prefix=strip_prefix, complete=complete),
        weights.stat().st_size))
    if json_out:
        _print_json(_result_dict(res))
    elif res.noop:
        out.print(f"no-op: identical to the active version {res.version}")
    else:
        out.print(f"committed version {res.version} in {res.duration_s:.3f}s (txn {res.txn})")


@app.command()
def rollback(fleet_name: str = FleetOpt, namespace: str = NamespaceOpt, address: str = AddressOpt,
             to: int = typer.Option(None, "--to", help="version to restore (default: walk back one)"),
             key: str = typer.Option(None, "--key"), json_out: bool = JsonOpt) -> None:
    """Roll back: a new version carrying an earlier version's weights."""
    fleet = _connect(fleet_name, namespace, address)
    res = _guard(lambda: _refit_with_progress(fleet, lambda: fleet.rollback(to=to, key=key), None))
    if json_out:
        _print_json(_result_dict(res))
    else:
        out.print(f"rolled back: version {res.version} in {res.duration_s:.3f}s")


@app.command()
def scale(fleet_name: str = FleetOpt, replicas: int = typer.Option(..., "--replicas", "-n", min=1),
          namespace: str = NamespaceOpt, address: str = AddressOpt, json_out: bool = JsonOpt) -> None:
    """Add replicas (they catch up before serving) or remove the newest (they drain first)."""
    fleet = _connect(fleet_name, namespace, address)
    res = _guard(lambda: fleet.scale(replicas))
    if json_out:
        _print_json(res)
    else:
        out.print(f"{replicas} replicas (added {res['added'] or 'none'}, removed {res['removed'] or 'none'})")


def _ago(ts: float | None) -> str:
    if not ts:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


@app.command()
def status(fleet_name: str = FleetOpt, namespace: str = NamespaceOpt, address: str = AddressOpt,
           json_out: bool = JsonOpt) -> None:
    """The fleet's version and, per replica, node, card, device, version, state, health, last refit."""
    fleet = _connect(fleet_name, namespace, address)
    st = _guard(fleet.status)
    if json_out:
        _print_json(st)
        return
    flight = st["in_flight"]
    busy = f", in flight: v{flight['version']} {flight['phase']}" if flight else ""
    out.print(f"fleet [bold]{st['name']}[/]: version {st['version']} (epoch {st['epoch']}){busy}")
    table = Table("replica", "node", "card", "device", "version", "state", "healthy", "last refit")
    for r in st["replicas"]:
        card = "-" if r.get("card") is None else str(r["card"])
        table.add_row(r["id"], (r.get("node") or "-")[:12], card,
                      r.get("device", "-"), str(r.get("version")), r.get("state", "-"),
                      "yes" if r.get("healthy") else "NO", _ago(r.get("last_refit_at")))
    out.print(table)


@app.command()
def history(fleet_name: str = FleetOpt, namespace: str = NamespaceOpt, address: str = AddressOpt,
            json_out: bool = JsonOpt) -> None:
    """Committed and aborted transactions, with reasons and durations (from the durable log)."""
    fleet = _connect(fleet_name, namespace, address)
    rows = _guard(fleet.history)
    if json_out:
        _print_json(rows)
        return
    table = Table("when", "txn", "version", "status", "duration", "origin", "reason")
    for h in rows:
        table.add_row(_ago(h["ts"]), h["txn"], str(h["version"]), h["status"],
                      f"{h['duration_s']:.3f}s" if h.get("duration_s") is not None else "-",
                      str(h.get("origin_version") or "-"), (h.get("reason") or "")[:80])
    out.print(table)


@app.command()
def bench(quick: bool = typer.Option(True, "--quick/--full", help="the quick rows (default) or all"),
          json_path: Path = typer.Option(None, "--json", help="write results here")) -> None:
    """Run the refit benchmark (scripts/bench_refit.py)."""
    path = SCRIPTS / "bench_refit.py"
    if not path.exists():
        _fail(4, f"benchmark {path} not found (it ships with the source tree)")
    sys.argv = [str(path), *(["--quick"] if quick else [])]
    if json_path:
        sys.argv += ["--json", str(json_path)]
    try:
        runpy.run_path(str(path), run_name="__main__")
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise typer.Exit(4) from None


@app.command()
def shutdown(fleet_name: str = FleetOpt, namespace: str = NamespaceOpt, address: str = AddressOpt) -> None:
    """Stop the fleet's replicas and coordinator (its state dir stays for a later launch)."""
    fleet = _connect(fleet_name, namespace, address)
    _guard(fleet.shutdown)
    out.print(f"fleet {fleet_name} shut down")


def main() -> None:  # pragma: no cover  (console entry point)
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
