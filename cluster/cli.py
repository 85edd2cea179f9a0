"""``weight-refit``: the command line for fleet operations.

Exit codes scripts can rely on (``EXIT_CODES``): 0 ok; 1 bad input, refused before anything changed;
2 usage error (an unknown option or a missing argument: click's convention); 3 no such fleet, or
no Ray cluster answers; 4 the refit or rollback aborted (the fleet stays on its version); 5 any
other failure. Errors print one line on stderr, ``error: ...``. ``--json`` prints one JSON
document on stdout. Every command ends within a bounded time: joining Ray is bounded by
``--connect-timeout`` (default 15 s), every call by the fleet's own timeouts.
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
out = Console(width=None if sys.stdout.isatty() else 160)  # piped or logged: tables not squeezed to 80
err = Console(stderr=True)
SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"

OK, BAD_INPUT, USAGE, NOT_FOUND, ABORTED, FAILED = 0, 1, 2, 3, 4, 5
EXIT_CODES = {OK: "ok", BAD_INPUT: "bad input (nothing changed)", USAGE: "usage error",
              NOT_FOUND: "no such fleet, or no Ray cluster", ABORTED: "refit or rollback aborted",
              FAILED: "any other failure"}

FleetOpt = typer.Option(..., "--fleet", "-f", help="fleet name (the config's `name`)")
NamespaceOpt = typer.Option("weight-refit", "--namespace", help="Ray namespace of the fleet")
AddressOpt = typer.Option(None, "--address",
                          help="Ray address; wins over RAY_ADDRESS (default: RAY_ADDRESS, else the head "
                               "`ray start` recorded on this machine)")
JsonOpt = typer.Option(False, "--json", help="print one JSON document on stdout")
StopRayOpt = typer.Option(False, "--stop-ray", help="also stop the Ray head `weight-refit launch` started")


@app.callback()
def _options(connect_timeout: float = typer.Option(
        None, "--connect-timeout", min=0.1, help="seconds to wait for a Ray cluster to answer (default 15; "
                                                  "env WEIGHT_REFIT_CONNECT_TIMEOUT_S)")) -> None:
    if connect_timeout is not None:
        os.environ["WEIGHT_REFIT_CONNECT_TIMEOUT_S"] = str(connect_timeout)


def _fail(code: int, message: str) -> None:
    text = " ".join(str(message).split())  # one line, whatever the error carried
    err.print(f"error: {text}", highlight=False, markup=False, soft_wrap=True)
    raise typer.Exit(code)


def _exit_code(exc: BaseException) -> int:
    from cluster import FleetNotFound, NoCanary, NoRayCluster, RefitAborted
    from engines import EngineError

    if isinstance(exc, NoCanary):
        return BAD_INPUT
    if isinstance(exc, RefitAborted):
        return ABORTED
    if isinstance(exc, FleetNotFound | NoRayCluster | ConnectionError):
        return NOT_FOUND
    if isinstance(exc, EngineError | ValueError | FileNotFoundError | IsADirectoryError | NotADirectoryError):
        return BAD_INPUT
    return FAILED


def _guard(fn: Any) -> Any:
    """Run ``fn``; map the library's errors to exit codes and one-line messages."""
    from cluster import FleetError, RefitAborted

    try:
        return fn()
    except typer.Exit:
        raise
    except Exception as exc:  # noqa: BLE001  (one line, never a traceback)
        first = str(exc).splitlines()[0] if str(exc) else ""
        if isinstance(exc, RefitAborted):
            message = str(exc)
        elif _exit_code(exc) in (BAD_INPUT, NOT_FOUND, ABORTED) or isinstance(exc, FleetError):
            message = first or type(exc).__name__
        else:
            message = f"{type(exc).__name__}: {first}"
        _fail(_exit_code(exc), message)


def _address(address: str | None) -> str:
    """--address wins over RAY_ADDRESS; with neither, the head ``ray start`` recorded here."""
    return address or os.environ.get("RAY_ADDRESS") or "auto"


def _connect(name: str, namespace: str, address: str | None) -> Any:
    from cluster import Fleet

    return _guard(lambda: Fleet.connect(name, namespace, address=_address(address)))


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
            _fail(FAILED, f"sample {path} not found (the samples ship with the source tree)")
        saved = sys.argv, list(sys.path)
        sys.argv = [str(path), *argv]
        sys.path.insert(0, str(SCRIPTS))  # as `python scripts/<name>` has it: the samples share _conv
        try:
            runpy.run_path(str(path), run_name="__main__")
        except SystemExit as exc:
            if exc.code not in (0, None):
                raise typer.Exit(FAILED) from None
        finally:
            sys.argv, sys.path[:] = saved


def _start_head(flags: list[str], port: int) -> None:
    """``ray start --head`` (with ``flags``, ``head_start_flags``) for a fleet that must outlive
    this command; remembered, so that ``shutdown --stop-ray`` can stop exactly this head later."""
    from cluster.ray_session import HeadRecord, connect_timeout_s, join, session_dir

    args = ["start", "--head", "--disable-usage-stats", f"--port={port}", *flags]
    ray_bin = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    try:
        started = subprocess.run([ray_bin, *args], capture_output=True, text=True, env=env,
                                 timeout=max(60.0, 4 * connect_timeout_s()))
    except subprocess.TimeoutExpired:
        _fail(FAILED, "`ray start --head` did not finish in time")
    if started.returncode != 0:
        last = (started.stderr.strip().splitlines() or ["(no output)"])[-1]
        _fail(FAILED, f"`ray start --head` failed: {last}")
    _guard(lambda: join("auto"))
    import ray

    HeadRecord(address=ray.get_runtime_context().gcs_address, session_dir=session_dir()).save()


@app.command()
def launch(config: Path = typer.Option(..., "--config", "-c", help="fleet config YAML"),
           fresh: bool = typer.Option(False, help="delete the fleet's state dir first"),
           address: str = AddressOpt,
           head_port: int = typer.Option(6379, "--head-port", min=1, max=65535,
                                         help="port of the Ray head started when none runs"),
           json_out: bool = JsonOpt) -> None:
    """Launch a fleet that outlives this command (a local Ray head is started if none runs)."""
    from cluster import Fleet, FleetConfig
    from cluster.launch import check_engine
    from cluster.placement import local_ray_init_kwargs
    from cluster.ray_session import answers, head_start_flags, join, recorded_head

    if not config.is_file():
        _fail(BAD_INPUT, f"fleet config {str(config)!r} does not exist or is not a file")
    cfg = _guard(lambda: FleetConfig.from_yaml(config))
    target = address or os.environ.get("RAY_ADDRESS") or cfg.address
    starts_head = not target and not ((head := recorded_head()) is not None and answers(head))
    # ray_init applies only to a head this command starts: checked before anything changes
    head_flags = _guard(lambda: head_start_flags(local_ray_init_kwargs(cfg))) if starts_head else []
    if fresh:
        from actors.durable import StateDirLock

        _guard(lambda: StateDirLock(cfg.state_dir).check_free(wait_s=0.0))
    _guard(lambda: check_engine(cfg))
    if fresh:
        _remove_state(cfg.state_dir, cfg.state_options)
    if target:
        _guard(lambda: join(target))
    elif not starts_head:
        _guard(lambda: join("auto"))
    else:
        _start_head(head_flags, head_port)
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


def _result_line(res: Any, done: str) -> str:
    if res.duplicate:
        return (f"duplicate: this key's first call already gave version {res.version} (txn {res.txn}); "
                "nothing new was applied")
    if res.noop:
        return f"no-op: the fleet already serves these weights (version {res.version})"
    later = "" if res.persisted else "; its checkpoint is being written in the background"
    return f"{done} {res.version} in {res.duration_s:.3f}s (txn {res.txn}){later}"


def _result_dict(res: Any) -> dict[str, Any]:
    return {"status": "noop" if res.noop else "committed", "version": res.version, "txn": res.txn,
            "duration_s": round(res.duration_s, 6), "duplicate": res.duplicate, "excluded": res.excluded,
            "persisted": res.persisted, "canary": res.canary,
            "replicas": res.replicas}


def _share(text: str, option: str) -> float:
    """``25%`` or ``0.25`` -> 0.25; a clear error naming the option otherwise."""
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        _fail(BAD_INPUT, f"{option} must be a share such as 25% or 0.25, got {text!r}")
    if not 0.0 < value <= 1.0:
        _fail(BAD_INPUT, f"{option} must be above 0% and at most 100%, got {text!r}")
    return value


def _canary(size: str | None, traffic: str, window_s: float | None, max_error_rate: float,
            max_p99_ratio: float | None) -> Any:
    """``--canary 25%`` (a share of the members) or ``--canary 2`` (replicas) as a ``Canary``."""
    from cluster import Canary, CanaryJudge

    if size is None:
        if window_s is not None:
            _fail(BAD_INPUT, "--judge-window needs --canary")
        return None
    judge = None
    if window_s is not None:
        judge = _guard(lambda: CanaryJudge(window_s=window_s, max_error_rate=max_error_rate,
                                           max_p99_ratio=max_p99_ratio))
    share = _share(traffic, "--traffic")
    if size.strip().isdigit():
        return _guard(lambda: Canary(replicas=int(size), traffic=share, judge=judge))
    return _guard(lambda: Canary(fraction=_share(size, "--canary"), traffic=share, judge=judge))


def _size_of(weights: Path) -> int:
    if weights.is_dir():
        return sum(f.stat().st_size for f in weights.iterdir() if f.is_file())
    return weights.stat().st_size


@app.command()
def refit(weights: Path = typer.Argument(..., help=".safetensors, .pt (tensors only) or .npz, or a "
                                        "checkpoint directory (save_pretrained, sharded with an index)"),
          fleet_name: str = FleetOpt, namespace: str = NamespaceOpt, address: str = AddressOpt,
          key: str = typer.Option(None, "--key", help="idempotency key: a retry returns the first outcome"),
          dry_run: bool = typer.Option(False, "--dry-run", help="validate against the fleet; stage nothing"),
          strip_prefix: str = typer.Option(None, "--strip-prefix", help="drop this prefix from names"),
          add_prefix: str = typer.Option(None, "--add-prefix", help="put this prefix before names "
                                                                    "(after --strip-prefix)"),
          complete: bool = typer.Option(False, "--complete", help="refuse a file lacking any weight"),
          probes: Path = typer.Option(None, "--probes", help="a safetensors file of behaviour probes "
                                                             "(cluster.save_probes) run on the staged set"),
          wait_persisted: bool = typer.Option(False, "--wait-persisted",
                                              help="return once the version's checkpoint is durable too"),
          canary: str = typer.Option(None, "--canary", help="commit on a canary cohort only: a share of "
                                                            "the replicas (25%) or a count (2)"),
          traffic: str = typer.Option("10%", "--traffic", help="with --canary: the share of new requests "
                                                               "routed to the canary"),
          judge_window: float = typer.Option(None, "--judge-window", help="with --canary: judge it after "
                                             "this many seconds, then promote or abort by itself"),
          max_error_rate: float = typer.Option(0.0, "--max-error-rate", help="the judge aborts above it"),
          max_p99_ratio: float = typer.Option(None, "--max-p99-ratio",
                                              help="the judge aborts when the canary's p99 exceeds this "
                                                   "times the rest's"),
          json_out: bool = JsonOpt) -> None:
    """Publish a weights file or checkpoint directory and refit every replica (two-phase commit),
    or, with --canary, a cohort of them (end it with promote or abort-canary, or --judge-window)."""
    from cluster import load_probes
    trial = _canary(canary, traffic, judge_window, max_error_rate, max_p99_ratio)
    if not weights.exists():
        _fail(BAD_INPUT, f"weights file {str(weights)!r} does not exist")
    if not (weights.is_file() or weights.is_dir()):
        _fail(BAD_INPUT, f"weights path {str(weights)!r} is neither a regular file nor a directory")
    fleet = _connect(fleet_name, namespace, address)
    names = {"strip_prefix": strip_prefix, "add_prefix": add_prefix}
    if dry_run:
        report = _guard(lambda: fleet.validate(weights, complete=complete, **names))
        if json_out:
            _print_json(report)
        else:
            kept = f"; not in the file (kept as they are): {report['missing']}" if report["missing"] else ""
            out.print(f"valid: {report['tensors']} tensors, {report['bytes']} bytes{kept}")
        return
    res = _guard(lambda: _refit_with_progress(
        fleet, lambda: fleet.refit(weights, key=key, complete=complete,
                                   probes=load_probes(probes) if probes else None, canary=trial, **names),
        _size_of(weights)))
    if wait_persisted and not res.persisted and not res.noop:
        if not _guard(lambda: fleet.wait_persisted(res.version)):
            _fail(FAILED, f"version {res.version} committed, but its checkpoint was not written in time "
                          "(see `weight-refit status`)")
        res.persisted = True
    if json_out:
        _print_json(_result_dict(res))
    elif res.canary is not None:
        c = res.canary
        judged = f"; judged after {c['judge']['window_s']:g}s" if c.get("judge") else \
            "; end it with `weight-refit promote` or `weight-refit abort-canary`"
        out.print(f"canary: version {res.version} on {', '.join(c['cohort'])} with {c['traffic']:.0%} of new "
                  f"requests; the rest stays on version {c['base_version']}{judged}", highlight=False)
    else:
        out.print(_result_line(res, "committed version"))


@app.command()
def promote(fleet_name: str = FleetOpt, namespace: str = NamespaceOpt, address: str = AddressOpt,
            json_out: bool = JsonOpt) -> None:
    """Activate the running canary's version on the rest of the fleet (one commit point)."""
    fleet = _connect(fleet_name, namespace, address)
    res = _guard(lambda: fleet.promote("promoted from the command line"))
    if json_out:
        _print_json(_result_dict(res))
    else:
        out.print(_result_line(res, "promoted: every replica serves version"))


@app.command("abort-canary")
def abort_canary(fleet_name: str = FleetOpt, namespace: str = NamespaceOpt, address: str = AddressOpt,
                 reason: str = typer.Option("aborted from the command line", "--reason"),
                 json_out: bool = JsonOpt) -> None:
    """End the running canary: a new version on every replica with the weights from before it."""
    fleet = _connect(fleet_name, namespace, address)
    res = _guard(lambda: fleet.abort_canary(reason))
    if json_out:
        _print_json(_result_dict(res))
    else:
        out.print(_result_line(res, "canary aborted: every replica serves the earlier weights as version"))


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
        out.print(_result_line(res, "rolled back: version"))


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


def _remove_state(state_dir: str, options: dict[str, Any]) -> None:
    """``launch --fresh``: the fleet's state goes, on a filesystem or at a URL."""
    from actors.object_state import is_url, open_url

    if not is_url(state_dir):
        shutil.rmtree(state_dir, ignore_errors=True)
        return
    fs, key = _guard(lambda: open_url(state_dir, options))
    if fs.exists(key):
        fs.rm(key, recursive=True)


def _catch_up_text(caught: dict[str, Any] | None) -> str:
    return "-" if not caught else f"v{caught['version']} from {caught['text']}"


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
    out.print(f"fleet [bold]{st['name']}[/]: version {st['version']} (epoch {st['epoch']}){busy}",
              highlight=False)
    canary = st.get("canary")
    if canary:
        state = f"being {canary['decision']}d" if canary.get("decision") else "running"
        judge = canary.get("judge")
        judged = f", judged {canary['started_at'] + judge['window_s'] - time.time():.0f}s from now" \
            if judge and not canary.get("decision") else ""
        out.print(f"canary {state}: version {canary['version']} on {', '.join(canary['cohort'])} with "
                  f"{canary['traffic']:.0%} of new requests; the rest on version {canary['base_version']}"
                  f"{judged}", markup=False, highlight=False)
        if canary.get("judge_note"):
            out.print(f"judge: {canary['judge_note']}", markup=False, highlight=False)
    recovery = st.get("recovery") or {}
    if recovery.get("state") not in (None, "ready"):
        out.print(f"coordinator {recovery['state']}: {recovery.get('error') or 'in progress'}",
                  markup=False, highlight=False)
    table = Table("replica", "node", "card", "device", "version", "state", "member", "cohort", "healthy",
                  "last refit", "last catch-up")
    for r in st["replicas"]:
        card = "-" if r.get("card") is None else str(r["card"])
        table.add_row(r["id"], (r.get("node") or "-")[:12], card,
                      r.get("device", "-"), str(r.get("version")), r.get("state", "-"),
                      r.get("membership", "-"), r.get("cohort", "main"), "yes" if r.get("healthy") else "NO",
                      _ago(r.get("last_refit_at")), _catch_up_text(r.get("caught_up_from")))
    out.print(table)
    inputs = next((r["inputs"] for r in st["replicas"] if r.get("inputs")), None)
    if inputs:
        shown = "; ".join(f"{i['name']} {i['spec']}" for i in inputs)
        out.print(f"inputs: {shown}", markup=False, highlight=False)
    for r in st["replicas"]:
        why = r.get("excluded_reason") or r.get("error")
        if why:
            out.print(f"{r['id']}: {why}", markup=False, highlight=False)


@app.command()
def history(fleet_name: str = FleetOpt, namespace: str = NamespaceOpt, address: str = AddressOpt,
            limit: int = typer.Option(50, "--limit", min=1, help="the newest N transactions"),
            since: int = typer.Option(None, "--since", help="only versions above this one"),
            json_out: bool = JsonOpt) -> None:
    """Committed and aborted transactions, with reasons and durations (from the durable log)."""
    fleet = _connect(fleet_name, namespace, address)
    rows = _guard(lambda: fleet.history(limit=limit, since=since))
    if json_out:
        _print_json(rows)
        return
    table = Table("when", "txn", "version", "status", "duration", "origin", "persisted", "reason")
    for h in rows:
        persisted = "lost" if h.get("lost") else ("yes" if h.get("persisted", True) else "not yet")
        table.add_row(_ago(h["ts"]), h["txn"], str(h["version"]), h["status"],
                      f"{h['duration_s']:.3f}s" if h.get("duration_s") is not None else "-",
                      str(h.get("origin_version") or "-"), persisted if h["status"] == "committed" else "-",
                      (h.get("lost") or h.get("canary") or h.get("reason") or "")[:160])
    out.print(table)
    if len(rows) == limit:
        out.print(f"the newest {limit} shown: --limit N for more, --since VERSION for those after one")


@app.command()
def bench(quick: bool = typer.Option(True, "--quick/--full", help="the quick rows (default) or all"),
          json_path: Path = typer.Option(None, "--json", help="write results here")) -> None:
    """Run the refit benchmark (scripts/bench_refit.py)."""
    path = SCRIPTS / "bench_refit.py"
    if not path.exists():
        _fail(FAILED, f"benchmark {path} not found (it ships with the source tree)")
    sys.argv = [str(path), *(["--quick"] if quick else [])]
    if json_path:
        sys.argv += ["--json", str(json_path)]
    try:
        runpy.run_path(str(path), run_name="__main__")
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise typer.Exit(FAILED) from None


@app.command()
def shutdown(fleet_name: str = FleetOpt, namespace: str = NamespaceOpt, address: str = AddressOpt,
             stop_ray: bool = StopRayOpt) -> None:
    """Stop the fleet's replicas and coordinator (its state dir stays for a later launch)."""
    import ray

    from cluster.ray_session import HeadRecord

    fleet = _connect(fleet_name, namespace, address)
    head = HeadRecord.load() if stop_ray else None
    if stop_ray and (head is None or head.address != ray.get_runtime_context().gcs_address):
        _fail(BAD_INPUT, "--stop-ray: the Ray cluster this fleet runs on was not started by "
                         "`weight-refit launch`; nothing was stopped (stop it yourself, e.g. `ray stop`)")
    _guard(fleet.shutdown)
    out.print(f"fleet {fleet_name} shut down")
    if head is not None:
        ray.shutdown()
        head.stop()
        out.print(f"Ray head at {head.address} stopped")


def main() -> None:
    """The console entry point: click's own errors (an unknown option, a missing argument) become
    one ``error:`` line too, with click's exit code (2 for usage errors)."""
    from typer.exceptions import TyperException

    try:
        code = app(standalone_mode=False)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        err.print("error: aborted", highlight=False, markup=False)
        sys.exit(FAILED)
    except TyperException as exc:
        message = " ".join((exc.format_message() if hasattr(exc, "format_message") else str(exc)).split())
        if message:  # (empty after no_args_is_help has printed the help)
            err.print(f"error: {message} (see --help)", highlight=False, markup=False, soft_wrap=True)
        sys.exit(int(getattr(exc, "exit_code", USAGE)))
    sys.exit(code if isinstance(code, int) else OK)


if __name__ == "__main__":
    main()
