"""Soak test: random refits, rollbacks and faults against a live fleet under client load.

    python scripts/soak.py --minutes 10 [--faults crashes,messages,disk] [--replicas 3] [--clients 2]
                           [--threads 3] [--seed S] [--rpc-loss P] [--state local|s3] [--json PATH]

Starts a local Ray (failure detection tuned down, as in the tests), builds the probe engine of
``tests/fleet_models.py`` (every output is x * w_i, and every w_i of a version holds that version's
value, so a torn or mixed response is visible), launches a fleet with short timeouts in a temporary
state directory, and runs client load for the whole run: ``--clients`` handles, each from its own
``Fleet.connect`` and each used by ``--threads`` threads at once (so requests spread over members).
Meanwhile it draws random actions, one at a time, each followed by a wait until the fleet has
settled. Always:

- ``refit``: new weights with a fresh value (the value of each committed version is recorded);
- ``rollback``: to an explicit stored version or the default target (the new version must carry
  the target's value).

``--faults`` (a comma list; default ``crashes,canaries``) adds:

- ``crashes``: replica kills (``ray.kill(no_restart=False)`` while idle or in the middle of a refit,
  or a failpoint armed with ``exit``: replica.before_vote / before_commit / before_activate /
  during_activate, followed by a refit) and coordinator kills (the same, with
  coordinator.after_begin / after_decision_logged / mid_activate / before_activated_logged);
- ``messages``: one protocol message (prepare, commit, activate, abort, sync_to, renew_lease) to or
  from one replica is lost (``drop:S``) or delayed (``sleep:S``) during one refit or rollback, S drawn
  around the timeout that bounds it (``scripts/soak_faults.py``, ``MessageFaults``);
- ``canaries``: canary episodes (``scripts/soak_faults.py``, ``CanaryEpisodes``): a canary refit on
  one replica with half of new requests under the client load, ended by promote, abort, a judge,
  or a kill of the canary replica or the coordinator followed by promote or abort;
- ``disk``: the state dir is a size-limited tmpfs the soak mounts (root), with a second one at
  ``<state_dir>/checkpoints``; an episode fills one of them, runs a refit or rollback (it must abort
  with "disk full", or commit if its bytes fitted), checks the fleet kept serving, frees the space
  and runs a refit that must commit. The probe model then has 160 tensors, so that a BEGIN record
  (every tensor's checksum) is larger than a page and cannot hide in the log file's last page.

``--state s3`` keeps the fleet's state (the log's copy and the checkpoints) in moto's S3 server on
127.0.0.1 (the test extra) instead of a local directory: coordinator kills then recover from
object storage (not with the disk faults).

``--rpc-loss P`` launches the coordinator with Ray's ``RAY_testing_rpc_failure``: every actor call
it makes (to replicas, the persistence worker) loses its request or its reply with probability P
(a whole percentage: Ray takes integer percents). Settling then asks again while the coordinator's
status shows a member unreachable; a refit may abort for a lost call.

Invariants checked (each breach is a violation; a failed client request is counted separately):

- every response carries one value (not torn) and it is the value of the version it names (I1);
  a response naming a version that never committed is a violation;
- a thread's versions never go backwards, nor below what its handle had seen when the request was
  issued; a request issued after ``refit(v)`` returned never gets a version below v (I3), also
  when sent straight to a member without a floor (a prober thread, as a handle that has not seen
  the newest version would);
- after each action: every member on the same active version, serving, nothing staged or pending,
  equal weight checksums that are those of the recorded value, no excluded replica, and the
  fleet's version equal to the last committed one (I2, I5); an aborted refit leaves the fleet on the
  previous version and says why; a refit that raised ``RefitAborted`` is not committed in the log;
  at the end, the log's committed versions are exactly the ones the driver recorded;
- disk-full episodes: the refit while full aborts naming "disk full" (or commits), the fleet
  serves meanwhile and has settled on its version while still full, the refit after freeing
  commits and leaves no log record unwritten.

Prints one line per action and a summary; exits 1 on any violation or failed request, 2 when the
disk faults cannot mount their tmpfs.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import random
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from fleet_models import PROBE_WEIGHTS, PROBE_WIDTH, build_probe_engine, fleet_config  # noqa: E402
from soak_checks import Checker, Clients, Model, Transactions  # noqa: E402
from soak_faults import (  # noqa: E402
    CANARY_ACTIONS,
    CRASH_ACTIONS,
    DISK_ACTIONS,
    MESSAGE_ACTIONS,
    CanaryEpisodes,
    CrashFaults,
    DiskFaults,
    MessageFaults,
    Tmpfs,
)

from cluster import Fleet  # noqa: E402

# As tests/conftest.py: detect dead actors in about a second.
RAY_SYSTEM_CONFIG = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 500,
    "health_check_timeout_ms": 500,
    "health_check_failure_threshold": 3,
}
# As tests/test_faults.py.
TIMEOUTS = {"prepare_s": 4, "commit_s": 4, "activate_s": 4, "request_s": 15, "lease_s": 2,
            "launch_s": 60}
FAULT_KINDS = ("crashes", "messages", "disk", "canaries")
DISK_PROBE_WEIGHTS = 160  # a BEGIN record of ~4.5 KB: more than one page
PUSH_TASK = "CoreWorkerService.grpc_client.PushTask"


def rpc_failures_injected() -> int:
    """Actor calls Ray's RPC chaos failed in this session (it logs a line for each)."""
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    n = 0
    for path in logs.glob("python-core-worker-*.log"):
        with open(path, errors="replace") as f:
            n += sum(f"RPC request failure for {PUSH_TASK}" in line
                     or f"RPC response failure for {PUSH_TASK}" in line for line in f)
    return n


def action_table(faults: list[str]) -> dict[str, int]:
    """action -> weight. ``crashes`` alone is the original table (same draws for a seed)."""
    table = dict(CRASH_ACTIONS) if "crashes" in faults else {
        k: w for k, w in CRASH_ACTIONS.items() if k in ("refit", "rollback")}
    if "messages" in faults:
        table.update(MESSAGE_ACTIONS)
    if "disk" in faults:
        table.update(DISK_ACTIONS)
    if "canaries" in faults:
        table.update(CANARY_ACTIONS)
    return table


class Soak:
    """Draws the actions, runs each through its fault class, settles and reports."""

    def __init__(self, args: argparse.Namespace, fleet: Fleet, t0: float, state_dir: Path) -> None:
        self.args = args
        self.fleet = fleet
        self.rng = random.Random(args.seed)
        self.m = Model(t0, args.probe_weights, args.probe_width)
        self.checker = Checker(self.m, fleet, args.replicas, args.settle_s, lost_aborts=args.rpc_loss > 0)
        self.tx = Transactions(self.m, fleet, self.rng, args.settle_s)
        self.clients = Clients(self.m, fleet, self.checker.members, args.clients, args.threads, args.seed)
        self.crashes = CrashFaults(self.m, self.checker, self.tx, self.rng)
        self.messages = MessageFaults(self.m, self.checker, self.tx, self.rng, TIMEOUTS)
        self.canaries = CanaryEpisodes(self.m, self.checker, self.tx, self.crashes, self.rng)
        self.disk = DiskFaults(self.m, self.checker, self.tx, self.rng, state_dir,
                               lenient=args.rpc_loss > 0)
        self.table = action_table(args.faults)
        self.actions: list[dict[str, Any]] = []
        self.final: dict[str, Any] = {}

    def act(self, n: int) -> None:
        action = self.rng.choices(list(self.table), weights=list(self.table.values()))[0]
        key = f"soak-{self.args.seed}-{n}"
        note: dict[str, Any] = {"n": n, "t": round(self.m.now(), 2), "action": action}
        post = None
        if action == "refit":
            note.update(self.tx.new_refit(key))
            if note["status"] == "committed":
                self.crashes.typical_s = 0.8 * self.crashes.typical_s + 0.2 * note["duration_s"]
        elif action == "rollback":
            note.update(self.tx.new_rollback(key))
        elif action.startswith("message."):
            self.messages.run(action.partition(".")[2], key, note)
        elif action.startswith("disk."):
            self.disk.run(action.partition(".")[2], key, note)
        elif action.startswith("canary."):
            self.canaries.run(action.partition(".")[2], key, note)
        else:
            post = self.crashes.run(action, key, note)
        self.checker.settle(note)
        if post is not None:
            post(note)
        self.m.count("actions")
        self.actions.append(note)
        self.progress(note)

    def progress(self, note: dict[str, Any]) -> None:
        bits = [f"#{note['n']:<4d} {note['action']:<30s}"]
        for k in ("failpoint", "victim", "slowed", "victims", "delay", "killed_mid_call", "fault",
                  "triggers", "filled_bytes"):
            if note.get(k) not in (None, []):
                bits.append(f"{k}={note[k]}")
        if "op" in note:
            op = note["op"]
            if op == "rollback":
                op += f"(to={note.get('to')}, target={note.get('target')})"
            res = note["status"]
            if res == "committed":
                res += f" v{note.get('version')}"
            bits.append(f"{op} value={note.get('value')} -> {res} in {note.get('duration_s')}s")
            if note["status"] != "committed" and note.get("reason"):
                bits.append(f"({note['reason'][:90]})")
        if note.get("status") == "canary":
            bits.append(f"canary v{note.get('version')} value={note.get('value')} on {note.get('cohort')} "
                        f"-> {note.get('end', 'not ended')} v{note.get('ended')}")
        for k in ("reached", "fired", "served_while_full", "after"):
            if k in note:
                bits.append(f"{k}={note[k]}")
        c = dict(self.m.counts)
        bits.append(f"| fleet v{note.get('fleet_version')} e{note.get('epoch')} "
                    f"settle {note.get('settle_s')}s"
                    f" | served {c['requests_served']} failed {c['requests_failed']}"
                    f" violations {c['violations']}")
        print(f"[{self.m.now():7.1f}s] " + " ".join(bits), flush=True)

    def run(self, minutes: float) -> None:
        first = self.tx.new_refit(f"soak-{self.args.seed}-init")
        print(f"[{self.m.now():7.1f}s] initial refit: {first['status']} v{first.get('version')}", flush=True)
        self.clients.start()
        end = self.m.t0 + minutes * 60
        n = 0
        while time.monotonic() < end:
            n += 1
            try:
                self.act(n)
            except Exception as exc:  # noqa: BLE001  (a soak bug or a fleet API failure)
                self.m.violation("action_error", f"action #{n}: {type(exc).__name__}: {exc}\n"
                                                 f"{traceback.format_exc()[-1500:]}")
                self.checker.settle({"n": n})
            time.sleep(self.rng.uniform(0.0, 0.5))  # load alone for a moment
        time.sleep(1.0)
        self.clients.join()
        self.checker.settle(self.final)
        self.m.resolve_observations(final=True)
        self.checker.check_history()

    def summary(self, minutes: float, wall_s: float) -> dict[str, Any]:
        m = self.m
        lat = np.array(m.latencies) if m.latencies else np.zeros(1)
        return {
            "minutes": minutes, "wall_s": round(wall_s, 1), "seed": self.args.seed,
            "faults": self.args.faults, "rpc_loss": self.args.rpc_loss,
            "replicas": self.args.replicas, "clients": self.args.clients, "threads": self.args.threads,
            "probe": {"weights": m.weights, "width": m.width},
            "served_by_replica": dict(sorted(m.by_replica.items())),
            "counts": dict(m.counts),
            "message_faults": m.tallies.get("messages", {}),
            "message_timing": m.tallies.get("message_timing", {}),
            "message_outcomes": m.tallies.get("message_outcomes", {}),
            "message_not_reached": m.tallies.get("message_not_reached", {}),
            "disk_episodes": m.tallies.get("disk", {}),
            "final": {"version": self.final.get("fleet_version"), "epoch": self.final.get("epoch"),
                      "last_committed": m.last_committed},
            "latency_s": {"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
                          "max": float(lat.max())},
            "violations": m.violations, "failures": m.failures, "actions": self.actions,
        }


def _cells(rows: dict[str, dict[str, int]]) -> str:
    return "; ".join(f"{r}: " + ", ".join(f"{k} {v}" for k, v in sorted(cells.items()))
                     for r, cells in sorted(rows.items())) or "-"


def print_summary(s: dict[str, Any]) -> None:
    c = s["counts"]
    lat = s["latency_s"]
    print(f"""
soak summary: {s['minutes']:g} min (wall {s['wall_s']}s), seed {s['seed']}, {s['replicas']} replicas, \
{s['clients']} client handles x {s['threads']} threads, faults {','.join(s['faults'])}, \
rpc loss {s['rpc_loss']:g}, probe {s['probe']['weights']}x{s['probe']['width']}
  actions:               {c['actions']}
  refits committed:      {c['refits_committed']}
  refits aborted:        {c['refits_aborted']}
  rollbacks committed:   {c['rollbacks_committed']}
  rollbacks aborted:     {c['rollbacks_aborted']}
  kills, replica:        {c['kills_replica']} (ray.kill {c['kills_replica_ray']}, failpoint \
{c['kills_replica_failpoint']})
  kills, coordinator:    {c['kills_coordinator']} (ray.kill {c['kills_coordinator_ray']}, failpoint \
{c['kills_coordinator_failpoint']})
  timed kills that landed inside a refit/rollback call: {c['kills_mid_call']}
  failpoints not reached: {c['failpoints_not_reached']} (disarms that failed: {c['disarm_failed']})
  outcomes resolved after an interrupted call: {c['in_doubt_resolved']}
  message faults armed:  {c['message_faults']} (refit/rollback then committed \
{c['message_faults_committed']}, aborted {c['message_faults_aborted']}; apparently not reached \
{c['message_faults_not_reached']})
    by message:          {_cells(s['message_faults'])}
    delay vs timeout:    {_cells(s['message_timing'])}
  disk-full episodes:    log {c['disk_episodes_log']}, store {c['disk_episodes_store']}; while full \
aborted "disk full" {c['disk_full_aborted']}, committed {c['disk_full_committed']}; committed after \
freeing {c['disk_recovered']}
    by filesystem:       {_cells(s['disk_episodes'])}
  canary episodes:       {c['canaries']} (promoted {c['canaries_promoted']}, aborted \
{c['canaries_aborted']}, refused {c['canaries_refused']})
  requests served:       {c['requests_served']}
  requests failed:       {c['requests_failed']}
  served by replica:     {s['served_by_replica']}
  direct probes served:  {c['probes_served']} (min_version 0, random member)
  request latency:       p50 {lat['p50'] * 1e3:.1f} ms, p99 {lat['p99'] * 1e3:.1f} ms, max {lat['max']:.2f} s
  invariant violations:  {c['violations']}
  final: fleet v{s['final']['version']}, epoch {s['final']['epoch']}, last committed \
v{s['final']['last_committed']}""", flush=True)
    if "rpc_failures_injected" in s:
        print(f"  coordinator calls lost by Ray (RAY_testing_rpc_failure): {s['rpc_failures_injected']}; "
              f"settle polls that saw an unreachable member: {c['settle_retries_unreachable']}; "
              f"aborted sets held after a lost ABORT: {s.get('lost_aborts')}")
    if s.get("begin_record_bytes"):
        print(f"  largest BEGIN record: {s['begin_record_bytes']} bytes")
    for v in s["violations"][:20]:
        print(f"  violation at {v['t']}s: {v['kind']}: {v['detail'][:400]}")
    for f in s["failures"][:10]:
        print(f"  failed request: {f[:400]}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, required=True, help="how long to draw actions")
    p.add_argument("--faults", default="crashes,canaries",
                   help=f"comma list of fault kinds from {', '.join(FAULT_KINDS)} "
                        "(default: crashes,canaries)")
    p.add_argument("--rpc-loss", type=float, default=0.0, metavar="P",
                   help="lose each request/reply of the coordinator's actor calls with probability P")
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--clients", type=int, default=2, help="client handles (Fleet.connect each)")
    p.add_argument("--threads", type=int, default=3, help="client threads per handle")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: from the clock)")
    p.add_argument("--json", type=Path, default=None, help="write the summary and every action here")
    p.add_argument("--settle-s", type=float, default=120.0,
                   help="how long the fleet may take to converge after an action")
    p.add_argument("--probe-weights", type=int, default=None,
                   help=f"tensors of the probe model (default {PROBE_WEIGHTS}; {DISK_PROBE_WEIGHTS} "
                        f"with disk faults)")
    p.add_argument("--probe-width", type=int, default=None,
                   help=f"elements per tensor (default {PROBE_WIDTH}; 16 with more than 16 tensors)")
    p.add_argument("--tmpfs-size", default="32m", help="size of each tmpfs of the disk faults")
    p.add_argument("--state", choices=["local", "s3"], default="local",
                   help="where the fleet's state is: a local directory, or moto's S3 server on 127.0.0.1 "
                        "(the test extra; not with the disk faults)")
    p.add_argument("--keep-state", action="store_true", help="keep the state dir (always kept on failure)")
    args = p.parse_args(argv)
    args.faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    bad = [f for f in args.faults if f not in FAULT_KINDS]
    if bad or not args.faults:
        p.error(f"--faults: unknown kind(s) {bad}; choose from {', '.join(FAULT_KINDS)}")
    if args.state == "s3" and "disk" in args.faults:
        p.error("--state s3: the disk faults fill a local tmpfs; leave them out")
    if not 0.0 <= args.rpc_loss < 1.0 or abs(args.rpc_loss * 100 - round(args.rpc_loss * 100)) > 1e-9:
        p.error("--rpc-loss must be in [0, 1) and a whole percentage (Ray takes integer percents)")
    if args.seed is None:
        args.seed = int(time.time()) % 100_000
    if args.probe_weights is None:
        args.probe_weights = DISK_PROBE_WEIGHTS if "disk" in args.faults else PROBE_WEIGHTS
    if args.probe_width is None:
        args.probe_width = PROBE_WIDTH if args.probe_weights <= 16 else 16
    return args


def mount_state_dir(work: Path, size: str, mounts: Tmpfs) -> Path:
    """The state dir on one tmpfs and its checkpoint store on a second one (filled separately)."""
    state_dir = work / "state"
    mounts.mount(state_dir, size)
    (state_dir / "checkpoints").mkdir()
    mounts.mount(state_dir / "checkpoints", size)
    return state_dir


def keep_copy(state_dir: Path, work: Path) -> Path:
    """A copy of a tmpfs state dir (it goes with the unmount), without the filler."""
    dest = work / "state-copy"
    shutil.copytree(state_dir, dest, ignore=shutil.ignore_patterns(DiskFaults.FILLER), dirs_exist_ok=True)
    return dest


def begin_record_bytes(state_dir: Path) -> int | None:
    try:
        with open(state_dir / "txn.log", "rb") as f:
            return max((len(line) for line in f if b'"kind":"BEGIN"' in line), default=None)
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    work = Path(tempfile.mkdtemp(prefix="weight-refit-soak-"))
    mounts = Tmpfs()
    atexit.register(mounts.unmount_all)
    name = f"soak{args.seed}"
    state_dir = work / name
    if "disk" in args.faults:
        try:
            state_dir = mount_state_dir(work, args.tmpfs_size, mounts)
        except OSError as exc:
            mounts.unmount_all()
            shutil.rmtree(work, ignore_errors=True)
            print(f"soak: cannot run the disk faults: {exc}", file=sys.stderr, flush=True)
            return 2
    engine = work / "probe.engine"
    build_probe_engine(engine, args.probe_weights, args.probe_width)
    ray.init(address="local", num_cpus=4, object_store_memory=256 << 20, include_dashboard=False,
             log_to_driver=False, _system_config=RAY_SYSTEM_CONFIG)
    extra: dict[str, Any] = {}
    if args.rpc_loss > 0:
        pct = round(args.rpc_loss * 100)  # Ray's probabilities are integer percentages
        extra["coordinator_env"] = {
            "RAY_testing_rpc_failure": json.dumps({PUSH_TASK: {
                "num_failures": -1, "req_failure_prob": pct, "resp_failure_prob": pct,
                "in_flight_failure_prob": 0}}),
            "RAY_timeout_ms_task_wait_for_death_info": "0"}
    s3 = None
    state = str(state_dir)
    if args.state == "s3":
        from s3_server import S3Server

        s3 = S3Server()
        atexit.register(s3.stop)
        state = s3.bucket(f"soak-{args.seed}") + "/state"
        extra["state_options"] = s3.options
    cfg = fleet_config(engine, work, name=name, replicas=args.replicas, timeouts=TIMEOUTS,
                       state_dir=state, **extra)
    print(f"soak: seed {args.seed}, {args.replicas} replicas, {args.clients} client handles x "
          f"{args.threads} threads, {args.minutes:g} min, faults {','.join(args.faults)}, rpc loss "
          f"{args.rpc_loss:g}, probe {args.probe_weights}x{args.probe_width}; state dir {cfg.state_dir}"
          f"{' (tmpfs, checkpoints on a second tmpfs)' if mounts.mounted else ''}", flush=True)
    t0 = time.monotonic()
    fleet = Fleet.launch(cfg)
    soak = Soak(args, fleet, t0, state_dir)
    rc = 1
    try:
        soak.run(args.minutes)
        s = soak.summary(args.minutes, time.monotonic() - t0)
        s["begin_record_bytes"] = begin_record_bytes(state_dir) if s3 is None else None
        if args.rpc_loss > 0:
            s["rpc_failures_injected"] = rpc_failures_injected()
            s["lost_aborts"] = sorted(f"{rid}:{txn}" for rid, txn in soak.checker.lingering)
        print_summary(s)
        if args.json:
            args.json.write_text(json.dumps(s, indent=1, default=str))
            print(f"  json: {args.json}")
        rc = 1 if (s["counts"]["violations"] or s["counts"]["requests_failed"]) else 0
    finally:
        soak.clients.stop.set()
        try:
            fleet.shutdown()
        except Exception as exc:  # noqa: BLE001
            print(f"shutdown: {exc!r}")
        ray.shutdown()
        keep = rc != 0 or args.keep_state
        if mounts.mounted and keep:
            try:
                print(f"  tmpfs state dir copied to {keep_copy(state_dir, work)}")
            except OSError as exc:
                print(f"  could not copy the tmpfs state dir: {exc!r}")
        mounts.unmount_all()
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"  state dir kept: {work}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
