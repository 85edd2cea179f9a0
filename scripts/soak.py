"""Soak test: random refits, rollbacks and crashes against a live fleet under client load.

    python scripts/soak.py --minutes 10 [--replicas 3] [--clients 2] [--threads 3] [--seed S]
                           [--json PATH]

Starts a local Ray (failure detection tuned down, as in the tests), builds the probe engine of
``tests/fleet_models.py`` (every output is x * w_i, and every w_i of a version holds that version's
value, so a torn or mixed response is visible), launches a fleet with short timeouts in a temporary
state directory, and runs client load for the whole run: ``--clients`` handles, each from its own
``Fleet.connect`` and each used by ``--threads`` threads at once (so requests spread over members).
Meanwhile it draws random actions, one at a time, each followed by a wait until the fleet has
settled:

- ``refit``: new weights with a fresh value (the value of each committed version is recorded);
- ``rollback``: to an explicit stored version or the default target (the new version must carry
  the target's value);
- replica kills: ``ray.kill(no_restart=False)`` while idle or in the middle of a refit, or a
  failpoint armed with ``exit`` (replica.before_vote / before_commit / before_activate /
  during_activate) followed by a refit;
- coordinator kills: the same, with coordinator.after_begin / after_decision_logged /
  mid_activate / before_activated_logged.

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
  previous version; a refit that raised ``RefitAborted`` is not committed in the log; at the end,
  the log's committed versions are exactly the ones the driver recorded.

Prints one line per action and a summary; exits 1 on any violation or failed request.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import sys
import tempfile
import threading
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
from fleet_models import (  # noqa: E402
    PROBE_WEIGHTS,
    PROBE_WIDTH,
    build_probe_engine,
    fleet_config,
    probe_input,
    probe_value,
    probe_weights,
)

from actors.coordinator_protocol import default_rollback_target  # noqa: E402
from cluster import Fleet, RefitAborted  # noqa: E402
from engines.checksum import tensor_checksum  # noqa: E402

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

REPLICA_FAILPOINTS = ["replica.before_vote", "replica.before_commit", "replica.before_activate",
                      "replica.during_activate"]
SLOW_FAILPOINTS = ["replica.before_vote", "replica.after_vote", "replica.before_commit",
                   "replica.before_activate"]
COORDINATOR_FAILPOINTS = ["coordinator.after_begin", "coordinator.after_decision_logged",
                          "coordinator.mid_activate", "coordinator.before_activated_logged"]

# action -> weight
ACTIONS = {
    "refit": 26,
    "rollback": 12,
    "replica.kill_idle": 8,
    "replica.kill_during_refit": 10,
    "replica.failpoint": 12,
    "coordinator.kill_idle": 8,
    "coordinator.kill_during_refit": 10,
    "coordinator.failpoint": 12,
    "double.kill_during_refit": 2,  # a replica and the coordinator in the same refit
}


def expected_checksums(value: float) -> dict[str, str]:
    t = torch.full((PROBE_WIDTH,), value, dtype=torch.float32)
    return {f"w.{i}": tensor_checksum(t) for i in range(PROBE_WEIGHTS)}


class Soak:
    def __init__(self, args: argparse.Namespace, fleet: Fleet) -> None:
        self.args = args
        self.fleet = fleet
        self.coord = fleet._coord
        self.rng = random.Random(args.seed)
        self.rng_probe = random.Random(args.seed + 1)
        self.lock = threading.Lock()
        self.t0 = time.monotonic()
        # the model of the fleet, as the driver knows it
        self.values: dict[int, float] = {0: 0.0}  # committed version -> value its weights carry
        self.origins: dict[int, int] = {0: 0}
        self.aborted_versions: set[int] = set()
        self.last_committed = 0
        self.floor = 0  # highest version a refit/rollback has *returned* (I3)
        self.next_value = 1.0
        # client-side observations waiting for their version's value to be known
        self.unresolved: dict[int, dict[float, int]] = {}
        self.counts = {k: 0 for k in (
            "actions", "refits_committed", "refits_aborted", "rollbacks_committed", "rollbacks_aborted",
            "kills_replica", "kills_replica_ray", "kills_replica_failpoint", "kills_coordinator",
            "kills_coordinator_ray", "kills_coordinator_failpoint", "failpoints_not_reached",
            "kills_mid_call", "probes_served", "requests_served", "requests_failed", "violations",
            "in_doubt_resolved")}
        self.violations: list[dict[str, Any]] = []
        self.failures: list[str] = []
        self.latencies: list[float] = []
        self.by_replica: dict[str, int] = {}
        self.actions: list[dict[str, Any]] = []
        self.typical_s = 0.15  # moving average of a plain refit's duration
        self.stop = threading.Event()
        self.clients: list[threading.Thread] = []

    # ---------------------------------------------------------------- bookkeeping

    def now(self) -> float:
        return time.monotonic() - self.t0

    def violation(self, kind: str, detail: str) -> None:
        with self.lock:
            self.counts["violations"] += 1
            self.violations.append({"t": round(self.now(), 2), "kind": kind, "detail": detail})
        print(f"[{self.now():7.1f}s] VIOLATION {kind}: {detail}", flush=True)

    def record_commit(self, version: int, value: float, origin: int, returned: bool) -> None:
        with self.lock:
            if version in self.values and self.values[version] != value:
                detail = f"v{version} recorded twice with values {self.values[version]} and {value}"
            else:
                detail = ""
            self.values[version] = value
            self.origins[version] = origin
            self.last_committed = max(self.last_committed, version)
            if returned:
                self.floor = max(self.floor, version)
        if detail:
            self.violation("bookkeeping", detail)

    # ---------------------------------------------------------------- clients

    def start_clients(self) -> None:
        """``clients`` handles, each used by ``threads`` threads at once: concurrent requests on
        one handle spread over the members (least outstanding first); a single sequential caller
        per handle would always land on the same member."""
        for i in range(self.args.clients):
            handle = Fleet.connect(self.fleet.name, self.fleet.namespace)
            for j in range(self.args.threads):
                th = threading.Thread(target=self._client, args=(f"c{i}.{j}", handle), daemon=True,
                                      name=f"client{i}.{j}")
                self.clients.append(th)
                th.start()
        th = threading.Thread(target=self._prober, daemon=True, name="prober")
        self.clients.append(th)
        th.start()

    def _client(self, name: str, handle: Fleet) -> None:
        x = probe_input()
        last = -1
        while not self.stop.is_set():
            with self.lock:
                floor = self.floor
            seen = handle.router.seen_version  # this handle's floor when the request is issued
            t = time.monotonic()
            try:
                r = handle.infer(x)
            except Exception as exc:  # noqa: BLE001  (every failure is counted)
                with self.lock:
                    self.counts["requests_failed"] += 1
                    if len(self.failures) < 50:
                        self.failures.append(f"t={self.now():.1f}s {name}: {type(exc).__name__}: {exc}")
                print(f"[{self.now():7.1f}s] REQUEST FAILED {name} after {time.monotonic() - t:.1f}s: "
                      f"{type(exc).__name__}: {str(exc)[:300]}", flush=True)
                time.sleep(0.05)
                continue
            lat = time.monotonic() - t
            value = probe_value(r.outputs)
            problems = []
            with self.lock:
                self.counts["requests_served"] += 1
                self.by_replica[r.replica] = self.by_replica.get(r.replica, 0) + 1
                if len(self.latencies) < 2_000_000:
                    self.latencies.append(lat)
                if value is None:
                    problems.append(("torn", f"{name}: mixed values in one response of v{r.version} "
                                             f"from {r.replica}"))
                if r.version < last:
                    problems.append(("backwards", f"{name}: v{last} then v{r.version} from {r.replica}"))
                if r.version < seen:
                    problems.append(("backwards", f"{name}: v{r.version} from {r.replica}, its handle had "
                                                  f"seen v{seen} before the request"))
                if r.version < floor:
                    problems.append(("stale_after_refit", f"{name}: v{r.version} from {r.replica} for a "
                                                          f"request issued after v{floor} returned"))
                if value is not None:
                    want = self.values.get(r.version)
                    if want is None:
                        pending = self.unresolved.setdefault(r.version, {})
                        pending[value] = pending.get(value, 0) + 1
                    elif want != value:
                        problems.append(("wrong_value", f"{name}: v{r.version} from {r.replica} "
                                                        f"carries {value}, v{r.version} is {want}"))
            for kind, detail in problems:
                self.violation(kind, detail)
            last = max(last, r.version)

    def _prober(self) -> None:
        """Direct requests (``min_version=0``) to random members from a member list refreshed
        about once a second, as from a handle that has not seen the newest version: a request
        issued after ``refit(v)`` returned must not get a version below v from anyone (I3).
        Stale answers and dead members are fine here (a router would retry elsewhere)."""
        x = probe_input()
        members: dict[str, Any] = {}
        fetched = 0.0
        while not self.stop.is_set():
            time.sleep(0.1)
            if time.monotonic() - fetched > 1.0:
                with contextlib.suppress(Exception):
                    members = self.members()
                    fetched = time.monotonic()
            if not members:
                continue
            rid = self.rng_probe.choice(sorted(members))
            with self.lock:
                floor = self.floor
            try:
                r = ray.get(members[rid].infer.remote([x], 0), timeout=10)
            except Exception:  # noqa: BLE001  (dead or restarting member)
                continue
            if r["stale"]:
                continue
            value = probe_value(r["outputs"])
            with self.lock:
                self.counts["probes_served"] += 1
                want = self.values.get(r["version"])
            if r["version"] < floor:
                self.violation("stale_after_refit", f"probe: {rid} served v{r['version']} to a request "
                                                    f"issued after v{floor} returned")
            if value is None or (want is not None and value != want):
                self.violation("wrong_value", f"probe: {rid} v{r['version']} carries {value}, "
                                              f"expected {want}")

    def resolve_observations(self, final: bool = False) -> None:
        """Check responses whose version was not yet known when they arrived."""
        problems = []
        with self.lock:
            for version in list(self.unresolved):
                seen = self.unresolved[version]
                if version in self.values:
                    bad = {v: n for v, n in seen.items() if v != self.values[version]}
                    if bad:
                        problems.append(("wrong_value", f"v{version} is {self.values[version]} but "
                                                        f"responses carried {bad}"))
                    del self.unresolved[version]
                elif version in self.aborted_versions or final:
                    why = "aborted" if version in self.aborted_versions else "never committed"
                    problems.append(("uncommitted_version_served", f"v{version} ({why}) was served "
                                                                   f"{sum(seen.values())} time(s)"))
                    del self.unresolved[version]
        for kind, detail in problems:
            self.violation(kind, detail)

    # ---------------------------------------------------------------- fleet helpers

    def members(self) -> dict[str, Any]:
        return ray.get(self.coord.member_handles.remote(), timeout=10)

    def coord_epoch(self) -> int | None:
        try:
            return int(ray.get(self.coord.status.remote(), timeout=10)["epoch"])
        except Exception:  # noqa: BLE001
            return None

    def outcome(self, key: str, timeout_s: float) -> dict[str, Any]:
        """Poll ``fleet.outcome`` until decided (committed and activated, aborted or unknown)."""
        deadline = time.monotonic() + timeout_s
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = self.fleet.outcome(key)
            except Exception as exc:  # noqa: BLE001  (coordinator restarting)
                last = {"status": "error", "reason": repr(exc)}
                time.sleep(0.3)
                continue
            if last["status"] in ("aborted", "unknown") or (
                    last["status"] == "committed" and last.get("activated")):
                return last
            time.sleep(0.3)
        return last or {"status": "error", "reason": "no answer"}

    def transact(self, kind: str, key: str, *, value: float | None = None, to: int | None = None,
                 expect_value: float | None = None, expect_origin: int | None = None) -> dict[str, Any]:
        """Run one refit (``value``) or rollback (``to``; ``expect_value`` its weights' value) and
        update the model. Returns what happened."""
        t = time.monotonic()
        out: dict[str, Any] = {"op": kind, "key": key}
        try:
            if kind == "refit":
                res = self.fleet.refit(probe_weights(value), key=key)
            else:
                res = self.fleet.rollback(to=to, key=key)
            out.update(status="noop" if res.noop else "committed", version=res.version,
                       excluded=res.excluded)
            if not res.noop:
                self.record_commit(res.version, value if kind == "refit" else expect_value,
                                   res.version if kind == "refit" else expect_origin, returned=True)
        except RefitAborted as exc:
            out.update(status="aborted", reason=exc.reason[:300])
            o = self.outcome(key, self.args.settle_s)
            out["outcome"] = o.get("status")
            if o.get("status") == "committed":
                if "in doubt" not in exc.reason:  # RefitAborted promises the fleet stayed put
                    self.violation("aborted_but_committed", f"{kind} {key} raised RefitAborted "
                                                            f"({exc.reason[:200]}) but the log says "
                                                            f"committed v{o.get('version')}")
                self.counts["in_doubt_resolved"] += 1
                out.update(status="committed", version=o["version"])
                self.record_commit(int(o["version"]), value if kind == "refit" else expect_value,
                                   int(o["version"]) if kind == "refit" else expect_origin,
                                   returned=False)
            elif o.get("status") not in ("aborted", "unknown"):
                self.violation("in_doubt", f"{kind} {key}: outcome still {o} after {self.args.settle_s}s")
            if out["status"] == "aborted" and o.get("version") is not None:
                with self.lock:
                    self.aborted_versions.add(int(o["version"]))
        except Exception as exc:  # noqa: BLE001  (a refit call that failed some other way)
            out.update(status="error", reason=f"{type(exc).__name__}: {str(exc)[:300]}")
            o = self.outcome(key, self.args.settle_s)
            out["outcome"] = o.get("status")
            if o.get("status") == "committed":
                self.counts["in_doubt_resolved"] += 1
                out.update(status="committed", version=o["version"])
                self.record_commit(int(o["version"]), value if kind == "refit" else expect_value,
                                   int(o["version"]) if kind == "refit" else expect_origin, returned=False)
            elif o.get("status") in ("aborted", "unknown"):
                out["status"] = "aborted"
                if o.get("version") is not None:
                    with self.lock:
                        self.aborted_versions.add(int(o["version"]))
            else:
                self.violation("in_doubt", f"{kind} {key}: outcome still {o} after {self.args.settle_s}s")
        out["duration_s"] = round(time.monotonic() - t, 3)
        ok = out["status"] == "committed"
        if kind == "refit":
            self.counts["refits_committed" if ok else "refits_aborted"] += out["status"] != "noop"
        else:
            self.counts["rollbacks_committed" if ok else "rollbacks_aborted"] += 1
        return out

    def new_refit(self, key: str) -> dict[str, Any]:
        value = self.next_value
        self.next_value += 1.0
        out = self.transact("refit", key, value=value)
        out["value"] = value
        return out

    def new_rollback(self, key: str) -> dict[str, Any]:
        """Half the time to an explicit stored version, else the default target."""
        with self.lock:
            active = self.last_committed
            committed = sorted(self.values)
        to: int | None = None
        if self.rng.random() < 0.5:
            try:
                stored = set(ray.get(self.coord.versions.remote(), timeout=10)["stored"])
            except Exception:  # noqa: BLE001
                stored = set()
            choices = [v for v in committed if v in stored and v != active]
            if choices:
                to = self.rng.choice(choices)
        target = to if to is not None else default_rollback_target(active, self.origins, committed)
        expect = self.values.get(target) if target is not None else None
        origin = self.origins.get(target) if target is not None else None
        out = self.transact("rollback", key, to=to, expect_value=expect, expect_origin=origin)
        out.update(to=to, target=target, value=expect)
        if out["status"] == "committed" and target is None:
            self.violation("rollback_without_target", f"rollback {key} committed v{out.get('version')} "
                                                      f"although no earlier version exists")
        return out

    def refit_or_rollback(self, key: str) -> dict[str, Any]:
        return self.new_rollback(key) if self.rng.random() < 0.3 else self.new_refit(key)

    # ---------------------------------------------------------------- faults

    def kill_replica(self, rid: str | None = None) -> str:
        handles = self.members()
        rid = rid or self.rng.choice(sorted(handles))
        ray.kill(handles[rid], no_restart=False)
        return rid

    def kill_coordinator(self) -> None:
        ray.kill(self.coord, no_restart=False)

    def replica_pid(self, rid: str) -> int | None:
        try:
            return int(ray.get(self.members()[rid].status.remote(), timeout=10)["pid"])
        except Exception:  # noqa: BLE001
            return None

    # ---------------------------------------------------------------- settling

    def settle(self, note: dict[str, Any]) -> bool:
        """Wait until the fleet converged; then check it against the driver's model."""
        deadline = time.monotonic() + self.args.settle_s
        problems: list[str] = ["not checked"]
        st: dict[str, Any] = {}
        sums: list[dict[str, str]] = []
        while time.monotonic() < deadline:
            problems = []
            try:
                st = ray.get(self.coord.status.remote(), timeout=15)
                members = self.members()
                if st["in_flight"] is not None:
                    problems.append(f"in flight: {st['in_flight']}")
                ids = {r["id"] for r in st["replicas"]}
                if set(members) != ids or len(members) != self.args.replicas:
                    problems.append(f"members {sorted(members)} vs replicas {sorted(ids)}")
                for r in st["replicas"]:
                    if (r.get("version") != st["version"] or r.get("state") != "serving"
                            or not r.get("healthy")):
                        problems.append(f"{r['id']}: v{r.get('version')} {r.get('state')} "
                                        f"healthy={r.get('healthy')} {r.get('error', '')}")
                    elif r.get("pending") or r.get("staged_bytes"):
                        problems.append(f"{r['id']}: pending {r.get('pending')} staged "
                                        f"{r.get('staged_bytes')} bytes")
                if not problems:
                    sums = ray.get([h.weight_checksums.remote() for h in members.values()], timeout=15)
                    if any(s != sums[0] for s in sums):
                        problems.append("members hold different weights")
            except Exception as exc:  # noqa: BLE001  (coordinator or replica restarting)
                problems.append(f"{type(exc).__name__}: {str(exc)[:200]}")
            if not problems:
                break
            time.sleep(0.3)
        note["settle_s"] = round(self.args.settle_s - max(0.0, deadline - time.monotonic()), 2)
        self.resolve_observations()
        if problems:
            snapshot = [{k: r.get(k) for k in ("id", "version", "state", "healthy", "pending", "lease_left_s",
                                               "epoch", "pid")} for r in st.get("replicas", [])]
            self.violation("not_converged", f"after {self.args.settle_s}s: {'; '.join(problems)[:800]} "
                                            f"| fleet v{st.get('version')} epoch {st.get('epoch')}, "
                                            f"replicas {snapshot}")
            return False
        with self.lock:
            last = self.last_committed
            want = self.values.get(last)
        note["fleet_version"] = st["version"]
        note["epoch"] = st["epoch"]
        ok = True
        if st["version"] != last:
            self.violation("fleet_version", f"fleet on v{st['version']}, last committed v{last}")
            ok = False
        if want is not None and sums and sums[0] != expected_checksums(want):
            self.violation("fleet_weights", f"members' weights are not v{last}'s value {want}")
            ok = False
        return ok

    # ---------------------------------------------------------------- actions

    def act(self, n: int) -> None:
        action = self.rng.choices(list(ACTIONS), weights=list(ACTIONS.values()))[0]
        key = f"soak-{self.args.seed}-{n}"
        note: dict[str, Any] = {"n": n, "t": round(self.now(), 2), "action": action}
        if action == "refit":
            note.update(self.new_refit(key))
            if note["status"] == "committed":
                self.typical_s = 0.8 * self.typical_s + 0.2 * note["duration_s"]
        elif action == "rollback":
            note.update(self.new_rollback(key))
        elif action == "replica.kill_idle":
            note["victim"] = self.kill_replica()
            self.counts["kills_replica"] += 1
            self.counts["kills_replica_ray"] += 1
        elif action == "coordinator.kill_idle":
            self.kill_coordinator()
            self.counts["kills_coordinator"] += 1
            self.counts["kills_coordinator_ray"] += 1
        elif action in ("replica.kill_during_refit", "coordinator.kill_during_refit",
                        "double.kill_during_refit"):
            # Aim inside the call: within a typical refit's duration (ray.kill itself takes a few
            # ms). Most of the time one replica is also slowed once at a random protocol step
            # (a sleep failpoint), which widens the window so the kill lands at varied points.
            handles = self.members()
            rid = self.rng.choice(sorted(handles))
            window = self.typical_s
            slow = None
            if self.rng.random() < 0.6:
                slow = (self.rng.choice(sorted(handles)), self.rng.choice(SLOW_FAILPOINTS),
                        round(self.rng.uniform(0.2, 0.6), 2))
                ray.get(handles[slow[0]].arm_failpoint.remote(slow[1], f"sleep:{slow[2]}@1"), timeout=10)
                note["slowed"] = f"{slow[0]}:{slow[1]}:{slow[2]}s"
                window += slow[2]
            delay = round(self.rng.uniform(0.0, window), 3)
            victims: list[str] = []
            returned = threading.Event()

            def kill() -> None:
                note["killed_mid_call"] = not returned.is_set()
                try:
                    if action != "coordinator.kill_during_refit":
                        ray.kill(handles[rid], no_restart=False)
                        victims.append(rid)
                    if action != "replica.kill_during_refit":
                        self.kill_coordinator()
                        victims.append("coordinator")
                except Exception as exc:  # noqa: BLE001
                    victims.append(f"kill failed: {exc!r}")

            timer = threading.Timer(delay, kill)
            timer.start()
            note.update(self.refit_or_rollback(key))
            returned.set()
            timer.join()
            if slow is not None:
                with contextlib.suppress(Exception):  # it may be the victim, restarting
                    ray.get(self.members()[slow[0]].arm_failpoint.remote(slow[1], None), timeout=10)
            note.update(delay=delay, victims=victims)
            self.counts["kills_mid_call"] += bool(note.get("killed_mid_call"))
            self.counts["kills_replica"] += rid in victims
            self.counts["kills_replica_ray"] += rid in victims
            self.counts["kills_coordinator"] += "coordinator" in victims
            self.counts["kills_coordinator_ray"] += "coordinator" in victims
        elif action == "replica.failpoint":
            fp = self.rng.choice(REPLICA_FAILPOINTS)
            rid = self.rng.choice(sorted(self.members()))
            pid = self.replica_pid(rid)
            ray.get(self.members()[rid].arm_failpoint.remote(fp, "exit"), timeout=10)
            note.update(failpoint=fp, victim=rid)
            note.update(self.refit_or_rollback(key))
            note["_fired_check"] = ("replica", rid, pid, fp)
        elif action == "coordinator.failpoint":
            fp = self.rng.choice(COORDINATOR_FAILPOINTS)
            epoch = self.coord_epoch()
            ray.get(self.coord.arm_failpoint.remote(fp, "exit"), timeout=10)
            note.update(failpoint=fp)
            note.update(self.refit_or_rollback(key))
            note["_fired_check"] = ("coordinator", None, epoch, fp)
        self.settle(note)
        check = note.pop("_fired_check", None)
        if check is not None:
            who, rid, before, fp = check
            if who == "replica":
                fired = before is not None and self.replica_pid(rid) not in (before, None)
            else:
                now_epoch = note.get("epoch") or self.coord_epoch()  # settle may have failed
                fired = before is not None and now_epoch not in (before, None)
            note["fired"] = fired
            if fired:
                self.counts[f"kills_{who}"] += 1
                self.counts[f"kills_{who}_failpoint"] += 1
            else:
                self.counts["failpoints_not_reached"] += 1
                try:  # disarm, so it does not fire in a later action
                    target = self.coord if who == "coordinator" else self.members()[rid]
                    ray.get(target.arm_failpoint.remote(fp, None), timeout=10)
                except Exception:  # noqa: BLE001
                    pass
        self.counts["actions"] += 1
        self.actions.append(note)
        self.progress(note)

    def progress(self, note: dict[str, Any]) -> None:
        bits = [f"#{note['n']:<4d} {note['action']:<30s}"]
        for k in ("failpoint", "victim", "slowed", "victims", "delay", "killed_mid_call"):
            if k in note:
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
        if "fired" in note:
            bits.append(f"fired={note['fired']}")
        with self.lock:
            c = dict(self.counts)
        bits.append(f"| fleet v{note.get('fleet_version')} e{note.get('epoch')} "
                    f"settle {note.get('settle_s')}s"
                    f" | served {c['requests_served']} failed {c['requests_failed']}"
                    f" violations {c['violations']}")
        print(f"[{self.now():7.1f}s] " + " ".join(bits), flush=True)

    # ---------------------------------------------------------------- run

    def run(self, minutes: float) -> None:
        first = self.new_refit(f"soak-{self.args.seed}-init")
        print(f"[{self.now():7.1f}s] initial refit: {first['status']} v{first.get('version')}", flush=True)
        self.start_clients()
        end = self.t0 + minutes * 60
        n = 0
        while time.monotonic() < end:
            n += 1
            try:
                self.act(n)
            except Exception as exc:  # noqa: BLE001  (a soak bug or a fleet API failure)
                self.violation("action_error", f"action #{n}: {type(exc).__name__}: {exc}\n"
                                               f"{traceback.format_exc()[-1500:]}")
                self.settle({"n": n})
            time.sleep(self.rng.uniform(0.0, 0.5))  # load alone for a moment
        time.sleep(1.0)
        self.stop.set()
        for th in self.clients:
            th.join(timeout=60)
        final = {"n": "final"}
        self.settle(final)
        self.resolve_observations(final=True)
        self.final = final
        try:
            logged = {int(h["version"]) for h in self.fleet.history() if h["status"] == "committed"}
        except Exception as exc:  # noqa: BLE001
            self.violation("history", f"fleet.history() failed: {exc!r}")
            return
        recorded = set(self.values) - {0}
        if logged != recorded:
            self.violation("history", f"committed in the log but not recorded by the driver: "
                                      f"{sorted(logged - recorded)}; recorded but not committed in "
                                      f"the log: {sorted(recorded - logged)}")

    def summary(self, minutes: float, wall_s: float) -> dict[str, Any]:
        c = self.counts
        lat = np.array(self.latencies) if self.latencies else np.zeros(1)
        return {
            "minutes": minutes, "wall_s": round(wall_s, 1), "seed": self.args.seed,
            "replicas": self.args.replicas, "clients": self.args.clients, "threads": self.args.threads,
            "served_by_replica": dict(sorted(self.by_replica.items())),
            "counts": dict(c),
            "final": {"version": self.final.get("fleet_version"), "epoch": self.final.get("epoch"),
                      "last_committed": self.last_committed},
            "latency_s": {"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
                          "max": float(lat.max())},
            "violations": self.violations, "failures": self.failures, "actions": self.actions,
        }


def print_summary(s: dict[str, Any]) -> None:
    c = s["counts"]
    lat = s["latency_s"]
    print(f"""
soak summary: {s['minutes']:g} min (wall {s['wall_s']}s), seed {s['seed']}, {s['replicas']} replicas, \
{s['clients']} client handles x {s['threads']} threads
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
  failpoints not reached: {c['failpoints_not_reached']}
  outcomes resolved after an interrupted call: {c['in_doubt_resolved']}
  requests served:       {c['requests_served']}
  requests failed:       {c['requests_failed']}
  served by replica:     {s['served_by_replica']}
  direct probes served:  {c['probes_served']} (min_version 0, random member)
  request latency:       p50 {lat['p50'] * 1e3:.1f} ms, p99 {lat['p99'] * 1e3:.1f} ms, max {lat['max']:.2f} s
  invariant violations:  {c['violations']}
  final: fleet v{s['final']['version']}, epoch {s['final']['epoch']}, last committed \
v{s['final']['last_committed']}""", flush=True)
    for v in s["violations"][:20]:
        print(f"  violation at {v['t']}s: {v['kind']}: {v['detail'][:400]}")
    for f in s["failures"][:10]:
        print(f"  failed request: {f[:400]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, required=True, help="how long to draw actions")
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--clients", type=int, default=2, help="client handles (Fleet.connect each)")
    p.add_argument("--threads", type=int, default=3, help="client threads per handle")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: from the clock)")
    p.add_argument("--json", type=Path, default=None, help="write the summary and every action here")
    p.add_argument("--settle-s", type=float, default=120.0,
                   help="how long the fleet may take to converge after an action")
    p.add_argument("--keep-state", action="store_true", help="keep the state dir (always kept on failure)")
    args = p.parse_args(argv)
    if args.seed is None:
        args.seed = int(time.time()) % 100_000

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    work = Path(tempfile.mkdtemp(prefix="weight-refit-soak-"))
    engine = work / "probe.engine"
    build_probe_engine(engine)
    ray.init(address="local", num_cpus=4, object_store_memory=256 << 20, include_dashboard=False,
             log_to_driver=False, _system_config=RAY_SYSTEM_CONFIG)
    cfg = fleet_config(engine, work, name=f"soak{args.seed}", replicas=args.replicas, timeouts=TIMEOUTS)
    print(f"soak: seed {args.seed}, {args.replicas} replicas, {args.clients} client handles x "
          f"{args.threads} threads, "
          f"{args.minutes:g} min; state dir {cfg.state_dir}", flush=True)
    t0 = time.monotonic()
    fleet = Fleet.launch(cfg)
    soak = Soak(args, fleet)
    soak.t0 = t0
    rc = 1
    try:
        soak.run(args.minutes)
        s = soak.summary(args.minutes, time.monotonic() - t0)
        print_summary(s)
        if args.json:
            args.json.write_text(json.dumps(s, indent=1, default=str))
            print(f"  json: {args.json}")
        rc = 1 if (s["counts"]["violations"] or s["counts"]["requests_failed"]) else 0
    finally:
        soak.stop.set()
        try:
            fleet.shutdown()
        except Exception as exc:  # noqa: BLE001
            print(f"shutdown: {exc!r}")
        ray.shutdown()
        if rc == 0 and not args.keep_state:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"  state dir kept: {work}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
