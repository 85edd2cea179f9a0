"""The soak's model of the fleet, its client load and its invariant checks (see ``scripts/soak.py``).

- ``Model``: what the driver knows (committed versions and their values, the floor of I3), the
  counts, the violations and the failed requests; thread-safe.
- ``Clients``: the client threads and the prober, checking every response (I1, I3).
- ``Checker``: settling after an action and the fleet-wide checks (I2, I5), the final log check.
- ``Transactions``: refits and rollbacks, with the model kept in step with what really happened.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from typing import Any

import ray
import torch
from fleet_models import probe_input, probe_value, probe_weights

from actors.coordinator_protocol import default_rollback_target
from actors.replica_client import replica_actor_name
from cluster import Fleet, RefitAborted
from engines.checksum import tensor_checksum

COUNTS = (
    "actions", "refits_committed", "refits_aborted", "rollbacks_committed", "rollbacks_aborted",
    "kills_replica", "kills_replica_ray", "kills_replica_failpoint", "kills_coordinator",
    "kills_coordinator_ray", "kills_coordinator_failpoint", "failpoints_not_reached",
    "kills_mid_call", "probes_served", "requests_served", "requests_failed", "violations",
    "in_doubt_resolved",
    # message faults: armed, and what became of the refit/rollback they were armed for
    "message_faults", "message_faults_committed", "message_faults_aborted",
    "message_faults_not_reached",
    # disk-full episodes: which filesystem was full, what the refit/rollback while full did,
    # whether the one after freeing the space committed
    "disk_episodes_log", "disk_episodes_store", "disk_full_aborted", "disk_full_committed",
    "disk_recovered", "settle_retries_unreachable", "disarm_failed",
    # canary episodes: started, refused, and how they ended
    "canaries", "canaries_refused", "canaries_promoted", "canaries_aborted")


class Model:
    """The fleet as the driver knows it. Every field is guarded by ``lock``."""

    def __init__(self, t0: float, weights: int, width: int) -> None:
        self.lock = threading.Lock()
        self.t0 = t0
        self.weights = weights
        self.width = width
        self.values: dict[int, float] = {0: 0.0}  # committed version -> value its weights carry
        self.origins: dict[int, int] = {0: 0}
        self.aborted_versions: set[int] = set()
        self.last_committed = 0
        self.floor = 0  # highest version a refit/rollback has *returned* (I3)
        self.next_value = 1.0
        # client-side observations waiting for their version's value to be known
        self.unresolved: dict[int, dict[float, int]] = {}
        self.counts = {k: 0 for k in COUNTS}
        # nested counters: "messages" -> message -> "hook.kind" -> n, and so on
        self.tallies: dict[str, dict[str, dict[str, int]]] = {}
        self.violations: list[dict[str, Any]] = []
        self.failures: list[str] = []
        self.latencies: list[float] = []
        self.by_replica: dict[str, int] = {}

    def now(self) -> float:
        return time.monotonic() - self.t0

    def count(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counts[key] += n

    def tally(self, group: str, row: str, col: str) -> None:
        with self.lock:
            cells = self.tallies.setdefault(group, {}).setdefault(row, {})
            cells[col] = cells.get(col, 0) + 1

    def served(self) -> tuple[int, int]:
        with self.lock:
            return self.counts["requests_served"], self.counts["requests_failed"]

    def expected_checksums(self, value: float) -> dict[str, str]:
        t = torch.full((self.width,), value, dtype=torch.float32)
        return {f"w.{i}": tensor_checksum(t) for i in range(self.weights)}

    def violation(self, kind: str, detail: str) -> None:
        with self.lock:
            self.counts["violations"] += 1
            self.violations.append({"t": round(self.now(), 2), "kind": kind, "detail": detail})
        print(f"[{self.now():7.1f}s] VIOLATION {kind}: {detail}", flush=True)

    def record_commit(self, version: int, value: float | None, origin: int | None, returned: bool) -> None:
        with self.lock:
            if version in self.values and self.values[version] != value:
                detail = f"v{version} recorded twice with values {self.values[version]} and {value}"
            else:
                detail = ""
            self.values[version] = value  # type: ignore[assignment]
            self.origins[version] = origin  # type: ignore[assignment]
            self.last_committed = max(self.last_committed, version)
            if returned:
                self.floor = max(self.floor, version)
        if detail:
            self.violation("bookkeeping", detail)

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


class Clients:
    """``clients`` handles, each used by ``threads`` threads at once (concurrent requests on one
    handle spread over the members, least outstanding first), plus one prober."""

    def __init__(self, model: Model, fleet: Fleet, members: Any, clients: int, threads: int,
                 seed: int) -> None:
        self.m = model
        self.fleet = fleet
        self.members = members  # () -> {rid: handle}
        self.n_clients = clients
        self.n_threads = threads
        self.rng_probe = random.Random(seed + 1)
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        for i in range(self.n_clients):
            handle = Fleet.connect(self.fleet.name, self.fleet.namespace)
            for j in range(self.n_threads):
                th = threading.Thread(target=self._client, args=(f"c{i}.{j}", handle), daemon=True,
                                      name=f"client{i}.{j}")
                self.threads.append(th)
                th.start()
        th = threading.Thread(target=self._prober, daemon=True, name="prober")
        self.threads.append(th)
        th.start()

    def join(self) -> None:
        self.stop.set()
        for th in self.threads:
            th.join(timeout=60)

    def _client(self, name: str, handle: Fleet) -> None:
        m = self.m
        x = probe_input(m.width)
        last = -1
        while not self.stop.is_set():
            with m.lock:
                floor = m.floor
            seen = handle.router.seen_version  # this handle's floor when the request is issued
            t = time.monotonic()
            try:
                r = handle.infer(x)
            except Exception as exc:  # noqa: BLE001  (every failure is counted)
                with m.lock:
                    m.counts["requests_failed"] += 1
                    if len(m.failures) < 50:
                        m.failures.append(f"t={m.now():.1f}s {name}: {type(exc).__name__}: {exc}")
                print(f"[{m.now():7.1f}s] REQUEST FAILED {name} after {time.monotonic() - t:.1f}s: "
                      f"{type(exc).__name__}: {str(exc)[:300]}", flush=True)
                time.sleep(0.05)
                continue
            lat = time.monotonic() - t
            value = probe_value(r.outputs)
            problems = []
            with m.lock:
                m.counts["requests_served"] += 1
                m.by_replica[r.replica] = m.by_replica.get(r.replica, 0) + 1
                if len(m.latencies) < 2_000_000:
                    m.latencies.append(lat)
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
                    want = m.values.get(r.version)
                    if want is None:
                        pending = m.unresolved.setdefault(r.version, {})
                        pending[value] = pending.get(value, 0) + 1
                    elif want != value:
                        problems.append(("wrong_value", f"{name}: v{r.version} from {r.replica} "
                                                        f"carries {value}, v{r.version} is {want}"))
            for kind, detail in problems:
                m.violation(kind, detail)
            last = max(last, r.version)

    def _prober(self) -> None:
        """Direct requests (``min_version=0``) to random members from a member list refreshed
        about once a second, as from a handle that has not seen the newest version: a request
        issued after ``refit(v)`` returned must not get a version below v from anyone (I3).
        Stale answers and dead members are fine here (a router would retry elsewhere)."""
        m = self.m
        x = probe_input(m.width)
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
            with m.lock:
                floor = m.floor
            try:
                r = ray.get(members[rid].infer.remote([x], 0), timeout=10)
            except Exception:  # noqa: BLE001  (dead or restarting member)
                continue
            if r["stale"]:
                continue
            value = probe_value(r["outputs"])
            with m.lock:
                m.counts["probes_served"] += 1
                want = m.values.get(r["version"])
            if r["version"] < floor:
                m.violation("stale_after_refit", f"probe: {rid} served v{r['version']} to a request "
                                                 f"issued after v{floor} returned")
            if value is None or (want is not None and value != want):
                m.violation("wrong_value", f"probe: {rid} v{r['version']} carries {value}, "
                                           f"expected {want}")


class Checker:
    """Waits until the fleet settled after an action, then checks it against the model."""

    def __init__(self, model: Model, fleet: Fleet, replicas: int, settle_s: float,
                 lost_aborts: bool = False) -> None:
        self.m = model
        self.fleet = fleet
        self.coord = fleet._coord
        self.replicas = replicas
        self.settle_s = settle_s
        # With lost RPCs an ABORT can be lost twice (it is sent twice): the replica then holds the
        # PREPARED set until its next PREPARE (``drop_older_undecided``), a new epoch or a catch-up.
        # Tolerated only for a transaction the log shows aborted, and only until the next commit.
        self.lost_aborts = lost_aborts
        self.lingering: dict[tuple[str, str], int] = {}  # (rid, txn) -> last committed when seen
        self._outcomes: dict[str, str] = {}
        self._reported: set[tuple[str, str]] = set()

    def members(self) -> dict[str, Any]:
        return ray.get(self.coord.member_handles.remote(), timeout=10)

    def replica(self, rid: str) -> Any:
        """The handle of replica ``rid`` by its actor name: also while it is excluded (the members'
        handles leave it out then)."""
        return ray.get_actor(replica_actor_name(self.fleet.name, rid), self.fleet.namespace)

    def disarm(self, rid: str | None, name: str) -> bool:
        """Disarm failpoint ``name`` in replica ``rid`` (None: the coordinator), retrying while it
        restarts; False (counted, and said) if that did not succeed within 30 s."""
        deadline = time.monotonic() + 30
        while True:
            try:
                target = self.coord if rid is None else self.replica(rid)
                ray.get(target.arm_failpoint.remote(name, None), timeout=10)
                return True
            except Exception as exc:  # noqa: BLE001  (restarting)
                if time.monotonic() > deadline:
                    self.m.count("disarm_failed")
                    print(f"[{self.m.now():7.1f}s] WARNING: could not disarm {name} in "
                          f"{rid or 'coordinator'}: {exc!r}", flush=True)
                    return False
                time.sleep(0.5)

    def coord_epoch(self) -> int | None:
        try:
            return int(ray.get(self.coord.status.remote(), timeout=10)["epoch"])
        except Exception:  # noqa: BLE001
            return None

    def _problems(self, st: dict[str, Any], members: dict[str, Any]) -> tuple[list[str], bool]:
        """What keeps the fleet from having settled; True when the only problem is a replica the
        coordinator's status call did not reach (lost RPCs: asked again, never a pass)."""
        problems = []
        unreachable = 0
        if st["in_flight"] is not None:
            problems.append(f"in flight: {st['in_flight']}")
        ids = {r["id"] for r in st["replicas"]}
        if set(members) != ids or len(members) != self.replicas:
            problems.append(f"members {sorted(members)} vs replicas {sorted(ids)}")
        for r in st["replicas"]:
            if (r.get("version") != st["version"] or r.get("state") != "serving"
                    or not r.get("healthy")):
                unreachable += r.get("state") == "unreachable" and r.get("membership") == "member"
                problems.append(f"{r['id']}: v{r.get('version')} {r.get('state')} "
                                f"healthy={r.get('healthy')} {r.get('error', '')}")
            elif (r.get("pending") or r.get("staged_bytes")) and not self._lost_abort(r):
                problems.append(f"{r['id']}: pending {r.get('pending')} staged "
                                f"{r.get('staged_bytes')} bytes")
        return problems, bool(problems) and unreachable == len(problems)

    def _lost_abort(self, r: dict[str, Any]) -> bool:
        """True if everything replica ``r`` holds belongs to aborted transactions whose ABORT it
        may have lost (``--rpc-loss`` only), none of them older than the last commit."""
        if not self.lost_aborts or not r.get("pending"):
            return False
        for txn, state in r["pending"]:
            if state != "prepared":
                return False
            if txn not in self._outcomes:
                try:
                    self._outcomes[txn] = str(self.fleet.outcome(txn).get("status"))
                except Exception:  # noqa: BLE001
                    return False
            if self._outcomes[txn] != "aborted":
                return False
            with self.m.lock:
                last = self.m.last_committed
            first = (r["id"], txn) not in self.lingering
            seen = self.lingering.setdefault((r["id"], txn), last)
            if first:
                print(f"[{self.m.now():7.1f}s] NOTE: {r['id']} still holds aborted txn {txn} "
                      f"(PREPARED, {r.get('staged_bytes')} bytes staged): its ABORT was lost", flush=True)
            if last > seen and (r["id"], txn) not in self._reported:
                self._reported.add((r["id"], txn))
                self.m.violation("aborted_set_not_freed", f"{r['id']} still holds aborted txn {txn} "
                                 f"(PREPARED) after v{last} committed (it was seen at v{seen})")
                return True  # reported once per settle; not a convergence problem as well
        return True

    def settle(self, note: dict[str, Any]) -> bool:
        """Wait until the fleet converged; then check it against the driver's model."""
        m = self.m
        deadline = time.monotonic() + self.settle_s
        problems: list[str] = ["not checked"]
        st: dict[str, Any] = {}
        sums: list[dict[str, str]] = []
        while time.monotonic() < deadline:
            try:
                st = ray.get(self.coord.status.remote(), timeout=15)
                members = self.members()
                problems, only_unreachable = self._problems(st, members)
                if only_unreachable:
                    m.count("settle_retries_unreachable")
                if not problems:
                    sums = ray.get([h.weight_checksums.remote() for h in members.values()], timeout=15)
                    if any(s != sums[0] for s in sums):
                        problems.append("members hold different weights")
            except Exception as exc:  # noqa: BLE001  (coordinator or replica restarting)
                problems = [f"{type(exc).__name__}: {str(exc)[:200]}"]
            if not problems:
                break
            time.sleep(0.3)
        note["settle_s"] = round(self.settle_s - max(0.0, deadline - time.monotonic()), 2)
        m.resolve_observations()
        if problems:
            snapshot = [{k: r.get(k) for k in ("id", "version", "state", "healthy", "pending", "lease_left_s",
                                               "epoch", "pid")} for r in st.get("replicas", [])]
            m.violation("not_converged", f"after {self.settle_s}s: {'; '.join(problems)[:800]} "
                                         f"| fleet v{st.get('version')} epoch {st.get('epoch')}, "
                                         f"replicas {snapshot}")
            return False
        with m.lock:
            last = m.last_committed
            want = m.values.get(last)
        note["fleet_version"] = st["version"]
        note["epoch"] = st["epoch"]
        note["unwritten_log_records"] = st.get("log", {}).get("unwritten_records")
        ok = True
        if st["version"] != last:
            m.violation("fleet_version", f"fleet on v{st['version']}, last committed v{last}")
            ok = False
        if want is not None and sums and sums[0] != m.expected_checksums(want):
            m.violation("fleet_weights", f"members' weights are not v{last}'s value {want}")
            ok = False
        return ok

    def check_history(self) -> None:
        """At the end: the log's committed versions are exactly the ones the driver recorded."""
        try:
            logged = {int(h["version"]) for h in self.fleet.history() if h["status"] == "committed"}
        except Exception as exc:  # noqa: BLE001
            self.m.violation("history", f"fleet.history() failed: {exc!r}")
            return
        recorded = set(self.m.values) - {0}
        if logged != recorded:
            self.m.violation("history", f"committed in the log but not recorded by the driver: "
                                        f"{sorted(logged - recorded)}; recorded but not committed in "
                                        f"the log: {sorted(recorded - logged)}")


class Transactions:
    """Refits and rollbacks through the driver API; the model follows their real outcome."""

    def __init__(self, model: Model, fleet: Fleet, rng: random.Random, settle_s: float) -> None:
        self.m = model
        self.fleet = fleet
        self.coord = fleet._coord
        self.rng = rng
        self.settle_s = settle_s

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

    def _resolved(self, kind: str, out: dict[str, Any], o: dict[str, Any], value: float | None,
                  origin: int | None) -> None:
        """The call did not return a commit but the log says committed: record it."""
        self.m.count("in_doubt_resolved")
        out.update(status="committed", version=o["version"])
        v = int(o["version"])
        self.m.record_commit(v, value, v if kind == "refit" else origin, returned=False)

    def _aborted(self, o: dict[str, Any]) -> None:
        if o.get("version") is not None:
            with self.m.lock:
                self.m.aborted_versions.add(int(o["version"]))

    def transact(self, kind: str, key: str, *, value: float | None = None, to: int | None = None,
                 expect_value: float | None = None, expect_origin: int | None = None) -> dict[str, Any]:
        """Run one refit (``value``) or rollback (``to``; ``expect_value`` its weights' value) and
        update the model. Returns what happened."""
        m = self.m
        t = time.monotonic()
        out: dict[str, Any] = {"op": kind, "key": key}
        committed_value = value if kind == "refit" else expect_value
        try:
            if kind == "refit":
                res = self.fleet.refit(probe_weights(value, m.weights, m.width), key=key)
            else:
                res = self.fleet.rollback(to=to, key=key)
            out.update(status="noop" if res.noop else "committed", version=res.version,
                       excluded=res.excluded, replicas=res.replicas)
            if not res.noop:
                m.record_commit(res.version, committed_value,
                                res.version if kind == "refit" else expect_origin, returned=True)
        except RefitAborted as exc:
            out.update(status="aborted", reason=exc.reason[:300])
            o = self.outcome(key, self.settle_s)
            out["outcome"] = o.get("status")
            if o.get("status") == "committed":
                if "in doubt" not in exc.reason:  # RefitAborted promises the fleet stayed put
                    m.violation("aborted_but_committed", f"{kind} {key} raised RefitAborted "
                                                         f"({exc.reason[:200]}) but the log says "
                                                         f"committed v{o.get('version')}")
                self._resolved(kind, out, o, committed_value, expect_origin)
            elif o.get("status") not in ("aborted", "unknown"):
                m.violation("in_doubt", f"{kind} {key}: outcome still {o} after {self.settle_s}s")
            if out["status"] == "aborted":
                self._aborted(o)
        except Exception as exc:  # noqa: BLE001  (a refit call that failed some other way)
            out.update(status="error", reason=f"{type(exc).__name__}: {str(exc)[:300]}")
            o = self.outcome(key, self.settle_s)
            out["outcome"] = o.get("status")
            if o.get("status") == "committed":
                self._resolved(kind, out, o, committed_value, expect_origin)
            elif o.get("status") in ("aborted", "unknown"):
                out["status"] = "aborted"
                self._aborted(o)
            else:
                m.violation("in_doubt", f"{kind} {key}: outcome still {o} after {self.settle_s}s")
        out["duration_s"] = round(time.monotonic() - t, 3)
        ok = out["status"] == "committed"
        if kind == "refit":
            if out["status"] != "noop":
                m.count("refits_committed" if ok else "refits_aborted")
        else:
            m.count("rollbacks_committed" if ok else "rollbacks_aborted")
        return out

    def new_refit(self, key: str) -> dict[str, Any]:
        with self.m.lock:
            value = self.m.next_value
            self.m.next_value += 1.0
        out = self.transact("refit", key, value=value)
        out["value"] = value
        return out

    def new_rollback(self, key: str) -> dict[str, Any]:
        """Half the time to an explicit stored version, else the default target."""
        m = self.m
        with m.lock:
            active = m.last_committed
            committed = sorted(m.values)
            origins = dict(m.origins)
        to: int | None = None
        if self.rng.random() < 0.5:
            try:
                stored = set(ray.get(self.coord.versions.remote(), timeout=10)["stored"])
            except Exception:  # noqa: BLE001
                stored = set()
            choices = [v for v in committed if v in stored and v != active]
            if choices:
                to = self.rng.choice(choices)
        target = to if to is not None else default_rollback_target(active, origins, committed)
        expect = m.values.get(target) if target is not None else None
        origin = origins.get(target) if target is not None else None
        out = self.transact("rollback", key, to=to, expect_value=expect, expect_origin=origin)
        out.update(to=to, target=target, value=expect)
        if out["status"] == "committed" and target is None:
            m.violation("rollback_without_target", f"rollback {key} committed v{out.get('version')} "
                                                   f"although no earlier version exists")
        return out

    def refit_or_rollback(self, key: str) -> dict[str, Any]:
        return self.new_rollback(key) if self.rng.random() < 0.3 else self.new_refit(key)
