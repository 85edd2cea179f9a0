"""The soak's fault actions (see ``scripts/soak.py``): crashes, lost or delayed protocol messages,
and disk-full episodes on the tmpfs mounts that hold the fleet's state dir.

Each ``run`` performs one action (usually around one refit or rollback through ``Transactions``),
fills ``note`` with what it did and returns an optional check to run after the fleet settled.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
from fleet_models import probe_weights
from soak_checks import Checker, Model, Transactions

from cluster import Canary, CanaryJudge, RefitAborted

REPLICA_FAILPOINTS = ["replica.before_vote", "replica.before_commit", "replica.before_activate",
                      "replica.during_activate"]
SLOW_FAILPOINTS = ["replica.before_vote", "replica.after_vote", "replica.before_commit",
                   "replica.before_activate"]
COORDINATOR_FAILPOINTS = ["coordinator.after_begin", "coordinator.after_decision_logged",
                          "coordinator.mid_activate", "coordinator.before_activated_logged"]

# action -> weight (``--faults crashes``: the soak's original table, drawn in the same order)
CRASH_ACTIONS = {
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
MESSAGES = ("prepare", "commit", "activate", "abort", "sync_to", "renew_lease")
MESSAGE_ACTIONS = {f"message.{m}": w for m, w in zip(MESSAGES, (12, 8, 8, 6, 5, 4), strict=True)}
DISK_ACTIONS = {"disk.log": 7, "disk.store": 7}
CANARY_ACTIONS = {"canary.promote": 5, "canary.abort": 5, "canary.judge": 4, "canary.kill_replica": 3,
                  "canary.kill_coordinator": 3}

PostCheck = Callable[[dict[str, Any]], None]


class CrashFaults:
    """Replica and coordinator kills: ``ray.kill`` while idle or inside a refit call, or an
    ``exit`` failpoint at a protocol step followed by a refit."""

    def __init__(self, model: Model, checker: Checker, tx: Transactions, rng: random.Random) -> None:
        self.m = model
        self.checker = checker
        self.tx = tx
        self.coord = checker.coord
        self.rng = rng
        self.typical_s = 0.15  # moving average of a plain refit's duration (set by the soak)

    def kill_replica(self, rid: str | None = None) -> str:
        handles = self.checker.members()
        rid = rid or self.rng.choice(sorted(handles))
        ray.kill(handles[rid], no_restart=False)
        return rid

    def kill_coordinator(self) -> None:
        ray.kill(self.coord, no_restart=False)

    def replica_pid(self, rid: str) -> int | None:
        try:
            return int(ray.get(self.checker.members()[rid].status.remote(), timeout=10)["pid"])
        except Exception:  # noqa: BLE001
            return None

    def run(self, action: str, key: str, note: dict[str, Any]) -> PostCheck | None:
        c = self.m.count
        if action == "replica.kill_idle":
            note["victim"] = self.kill_replica()
            c("kills_replica")
            c("kills_replica_ray")
        elif action == "coordinator.kill_idle":
            self.kill_coordinator()
            c("kills_coordinator")
            c("kills_coordinator_ray")
        elif action in ("replica.kill_during_refit", "coordinator.kill_during_refit",
                        "double.kill_during_refit"):
            self._kill_during_refit(action, key, note)
        elif action == "replica.failpoint":
            fp = self.rng.choice(REPLICA_FAILPOINTS)
            rid = self.rng.choice(sorted(self.checker.members()))
            pid = self.replica_pid(rid)
            ray.get(self.checker.members()[rid].arm_failpoint.remote(fp, "exit"), timeout=10)
            note.update(failpoint=fp, victim=rid)
            note.update(self.tx.refit_or_rollback(key))
            return lambda n: self._fired("replica", rid, pid, fp, n)
        elif action == "coordinator.failpoint":
            fp = self.rng.choice(COORDINATOR_FAILPOINTS)
            epoch = self.checker.coord_epoch()
            ray.get(self.coord.arm_failpoint.remote(fp, "exit"), timeout=10)
            note.update(failpoint=fp)
            note.update(self.tx.refit_or_rollback(key))
            return lambda n: self._fired("coordinator", None, epoch, fp, n)
        else:
            raise ValueError(f"not a crash action: {action}")
        return None

    def _kill_during_refit(self, action: str, key: str, note: dict[str, Any]) -> None:
        # Aim inside the call: within a typical refit's duration (ray.kill itself takes a few
        # ms). Most of the time one replica is also slowed once at a random protocol step
        # (a sleep failpoint), which widens the window so the kill lands at varied points.
        handles = self.checker.members()
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
        note.update(self.tx.refit_or_rollback(key))
        returned.set()
        timer.join()
        if slow is not None:  # it may be the victim, restarting, or excluded
            self.checker.disarm(slow[0], slow[1])
        note.update(delay=delay, victims=victims)
        c = self.m.count
        c("kills_mid_call", bool(note.get("killed_mid_call")))
        c("kills_replica", rid in victims)
        c("kills_replica_ray", rid in victims)
        c("kills_coordinator", "coordinator" in victims)
        c("kills_coordinator_ray", "coordinator" in victims)

    def _fired(self, who: str, rid: str | None, before: int | None, fp: str, note: dict[str, Any]) -> None:
        """After settling: did the ``exit`` failpoint kill its process? Disarm it if not."""
        if who == "replica":
            assert rid is not None
            fired = before is not None and self.replica_pid(rid) not in (before, None)
        else:
            now_epoch = note.get("epoch") or self.checker.coord_epoch()  # settle may have failed
            fired = before is not None and now_epoch not in (before, None)
        note["fired"] = fired
        if fired:
            self.m.count(f"kills_{who}")
            self.m.count(f"kills_{who}_failpoint")
        else:
            self.m.count("failpoints_not_reached")
            self.checker.disarm(rid, fp)  # so that it does not fire in a later action


class MessageFaults:
    """One protocol message to (``message.<m>``) or from (``reply.<m>``) one replica is lost
    (``drop:S``: S seconds, then ``MessageDropped``) or delayed (``sleep:S``) during one refit or
    rollback. S is drawn around the timeout that bounds the message, so answers come both late
    but in time and too late. A message that only some refits send gets a trigger: ``abort`` a
    NO vote (``replica.before_vote`` raises once), ``sync_to`` an ACTIVATE that fails both times
    (``replica.before_activate`` raises: the coordinator catches the member up from the store).
    Either outcome of the refit is legal; an abort must leave the fleet on its version (the
    settle check) and give a reason."""

    def __init__(self, model: Model, checker: Checker, tx: Transactions, rng: random.Random,
                 timeouts: dict[str, float]) -> None:
        self.m = model
        self.checker = checker
        self.tx = tx
        self.rng = rng
        self.t = timeouts

    def _delay(self, message: str) -> tuple[float, float]:
        """(S, the timeout S is measured against)."""
        bound = {"prepare": self.t["prepare_s"], "commit": self.t["commit_s"],
                 "activate": self.t["activate_s"], "abort": self.t["commit_s"],
                 "renew_lease": self.t["lease_s"]}.get(message)
        if bound is None:  # sync_to: a catch-up may take up to launch_s; mostly short ones
            bound = self.t["launch_s"]
            if self.rng.random() < 0.9:
                return round(self.rng.uniform(0.2, 2.0) * self.t["activate_s"], 2), bound
            return round(bound + self.rng.uniform(1.0, 3.0), 2), bound
        return round(self.rng.uniform(0.25, 2.0) * bound, 2), bound

    def run(self, message: str, key: str, note: dict[str, Any]) -> None:
        handles = self.checker.members()
        rid = self.rng.choice(sorted(handles))
        hook = f"{self.rng.choice(('message', 'reply'))}.{message}"
        kind = self.rng.choice(("drop", "sleep"))
        s, bound = self._delay(message)
        timing = "in_time" if s < bound else "too_late"
        armed: list[tuple[str, str, str]] = [(rid, hook, f"{rid}/{kind}:{s}@1")]
        if message == "abort":
            voter = self.rng.choice(sorted(handles))
            armed.append((voter, "replica.before_vote", f"{voter}/raise@1"))
        elif message == "sync_to":
            armed.append((rid, "replica.before_activate", f"{rid}/raise"))
        for who, name, action in armed:
            ray.get(handles[who].arm_failpoint.remote(name, action), timeout=10)
        note.update(fault=f"{rid}:{hook}={kind}:{s}s ({timing}, bound {bound:g}s)",
                    triggers=[f"{w}:{n}={a}" for w, n, a in armed[1:]])
        self.m.count("message_faults")
        self.m.tally("messages", message, f"{hook.split('.')[0]}.{kind}")
        self.m.tally("message_timing", message, timing)
        try:
            if message == "renew_lease":  # renewals go every lease_s/3, refit or not
                time.sleep(self.t["lease_s"] / 3 + 0.5)
            note.update(self.tx.refit_or_rollback(key))
        finally:
            for who, name, _ in armed:  # by name: the replica may be excluded just now
                self.checker.disarm(who, name)
        status = note.get("status")
        self._reached(message, hook, kind, s, bound, note)
        if status == "committed":
            self.m.count("message_faults_committed")
        else:
            self.m.count("message_faults_aborted")
            if not note.get("reason") and not (note.get("op") == "rollback" and note.get("target") is None):
                self.m.violation("abort_without_reason", f"{note.get('op')} {key} under {note['fault']} "
                                                         f"ended {status} without a reason")
        self.m.tally("message_outcomes", message, str(status))

    def _reached(self, message: str, hook: str, kind: str, s: float, bound: float,
                 note: dict[str, Any]) -> None:
        """Did the fault fire? Not observable directly; but PREPARE, COMMIT, ACTIVATE, ABORT (of an
        aborted transaction) and a catch-up are waited for by the refit, so a fault that fired
        made it last at least min(S, the timeout) (a drop of ACTIVATE or COMMIT is retried)."""
        committed = note.get("status") == "committed"
        if message == "renew_lease" or (message == "abort" and committed) or (
                message in ("commit", "activate", "sync_to") and not committed):
            return  # not sent in this outcome
        if message == "prepare" and note.get("reason", "").startswith("refused"):
            return
        reached = (note.get("duration_s") or 0.0) >= 0.9 * min(s, bound)
        note["reached"] = reached
        if not reached:
            self.m.count("message_faults_not_reached")
            self.m.tally("message_not_reached", message, f"{hook.split('.')[0]}.{kind}")
            print(f"[{self.m.now():7.1f}s] NOTE: {note['fault']} armed but the {note.get('op')} took "
                  f"{note.get('duration_s')}s: not reached? per-replica timings {note.get('replicas')}",
                  flush=True)


class Tmpfs:
    """Size-limited tmpfs mounts the soak makes itself (root); unmounted by ``unmount_all``."""

    def __init__(self) -> None:
        self.mounted: list[Path] = []

    def mount(self, path: Path, size: str) -> None:
        path.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                           capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise OSError(f"mount -t tmpfs -o size={size} tmpfs {path} failed (rc {r.returncode}): "
                          f"{(r.stderr or r.stdout).strip()}"
                          f"{' (the disk faults need root)' if os.geteuid() != 0 else ''}")
        self.mounted.append(path)

    def unmount_all(self) -> None:
        while self.mounted:
            path = self.mounted.pop()
            r = subprocess.run(["umount", str(path)], capture_output=True, text=True, check=False)
            if r.returncode != 0:  # still busy (a process holding a file): detach it lazily
                subprocess.run(["umount", "-l", str(path)], capture_output=True, text=True, check=False)


def fill(path: Path) -> int:
    """Write ``path`` until the filesystem is full (ENOSPC); returns the bytes written."""
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for chunk in (1 << 20, 4096, 1):
            block = b"\0" * chunk
            while True:
                try:
                    n = os.write(fd, block)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
                written += n
    finally:
        os.close(fd)
    return written


class DiskFaults:
    """A disk-full episode: fill the state dir's tmpfs (the log) or the checkpoint store's with a
    filler file; one refit or rollback must then abort with "disk full" in its reason, or commit if
    its bytes fitted (both recorded), while the fleet keeps serving; then the filler goes and the
    next refit must commit, with nothing repaired by hand and no log record left unwritten."""

    FILLER = "soak-filler.bin"

    def __init__(self, model: Model, checker: Checker, tx: Transactions, rng: random.Random,
                 state_dir: Path, lenient: bool) -> None:
        self.m = model
        self.checker = checker
        self.tx = tx
        self.rng = rng
        self.dirs = {"log": state_dir, "store": state_dir / "checkpoints"}
        self.lenient = lenient  # lost RPCs (--rpc-loss) may abort a refit for another reason

    def run(self, which: str, key: str, note: dict[str, Any]) -> None:
        fs = self.dirs[which]
        with contextlib.suppress(Exception):  # background retention deletes files: let it finish
            ray.get(self.checker.coord.versions.remote(), timeout=30)
        self.m.count(f"disk_episodes_{which}")
        served0, _ = self.m.served()
        t_full = time.monotonic()
        filler = fs / self.FILLER
        try:
            note["filled_bytes"] = fill(filler)
            note["free_bytes"] = os.statvfs(fs).f_bavail * os.statvfs(fs).f_frsize
            note.update(self.tx.refit_or_rollback(key))
            self._judge(which, key, note)
            while time.monotonic() - t_full < 1.5:  # serve on a full disk a little longer
                time.sleep(0.1)
            full_note: dict[str, Any] = {}
            self.checker.settle(full_note)  # converged on its version, still full
            note["settle_full_s"] = full_note.get("settle_s")
            served1, _ = self.m.served()
            note["served_while_full"] = served1 - served0
            if served1 == served0:
                self.m.violation("no_service_while_full", f"{which} full for "
                                 f"{time.monotonic() - t_full:.1f}s: no request was served")
        finally:
            filler.unlink(missing_ok=True)
        self._recover(which, key, note)

    def _judge(self, which: str, key: str, note: dict[str, Any]) -> None:
        status, reason = note.get("status"), note.get("reason") or ""
        if status == "committed":
            self.m.count("disk_full_committed")
            self.m.tally("disk", which, "committed_while_full")
        elif "disk full" in reason:
            self.m.count("disk_full_aborted")
            self.m.tally("disk", which, "aborted_disk_full")
        elif note.get("op") == "rollback" and note.get("target") is None:
            self.m.tally("disk", which, "rollback_without_target")
        elif note.get("op") == "rollback" and "version held in the checkpoint store" in reason:
            self.m.tally("disk", which, "rollback_target_pruned")  # refused as documented, full or not
        elif self.lenient:
            self.m.tally("disk", which, "aborted_other")
        else:
            self.m.tally("disk", which, "aborted_other")
            self.m.violation("disk_full_reason", f"{note.get('op')} {key} with the {which} filesystem "
                                                 f"full ended {status}: {reason[:300]!r} (no 'disk full')")

    def _recover(self, which: str, key: str, note: dict[str, Any]) -> None:
        after: dict[str, Any] = {}
        for attempt in range(1, 4 if self.lenient else 2):
            after = self.tx.new_refit(f"{key}-after{attempt}")
            if after["status"] == "committed" or "disk full" in (after.get("reason") or ""):
                break
        note["after"] = (f"refit value={after.get('value')} -> {after['status']} v{after.get('version')} "
                         f"in {after.get('duration_s')}s")
        if after["status"] != "committed":
            self.m.violation("disk_not_recovered", f"{which}: refit {after['key']} after the filler was "
                                                   f"deleted ended {after['status']}: "
                                                   f"{(after.get('reason') or '')[:300]}")
            return
        self.m.count("disk_recovered")
        try:
            unwritten = ray.get(self.checker.coord.status.remote(), timeout=15)["log"]["unwritten_records"]
        except Exception:  # noqa: BLE001  (the settle check that follows reports a lost coordinator)
            return
        if unwritten:
            self.m.violation("log_records_unwritten", f"{which}: {unwritten} log record(s) still kept in "
                                                      f"memory after a commit on a disk with space")


class CanaryEpisodes:
    """A canary refit of a fresh value on one replica with half of new requests, under the client
    load, then its end: ``promote``, ``abort``, ``judge`` (a 1 s window: it promotes a healthy
    canary), or a kill first (``kill_replica``: the canary replica, which must come back on the
    canary's version; ``kill_coordinator``: the restarted coordinator must still hold the canary)
    and then promote or abort. The model records the canary's version when it commits (no floor:
    it is not fleet-wide), and the version that ends it with the value it must carry."""

    def __init__(self, model: Model, checker: Checker, tx: Transactions, crashes: CrashFaults,
                 rng: random.Random) -> None:
        self.m = model
        self.checker = checker
        self.tx = tx
        self.crashes = crashes
        self.rng = rng

    def _status(self) -> dict[str, Any]:
        return ray.get(self.checker.coord.status.remote(), timeout=15)

    def _wait(self, what: str, ok: Callable[[dict[str, Any]], bool], timeout_s: float = 90.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if ok(self._status()):
                    return True
            except Exception:  # noqa: BLE001  (the coordinator restarting)
                pass
            time.sleep(0.3)
        self.m.violation("canary", f"timed out waiting for {what}")
        return False

    def run(self, how: str, key: str, note: dict[str, Any]) -> None:
        m, fleet = self.m, self.tx.fleet
        with m.lock:
            value = m.next_value
            m.next_value += 1.0
        base = int(self._status()["version"])
        with m.lock:
            base_value, base_origin = m.values.get(base), m.origins.get(base)
        judge = CanaryJudge(window_s=1.0, max_error_rate=0.0) if how == "judge" else None
        try:
            res = fleet.refit(probe_weights(value, m.weights, m.width), key=key,
                              canary=Canary(replicas=1, traffic=0.5, judge=judge))
        except RefitAborted as exc:
            note.update(status="aborted", reason=exc.reason[:300])
            m.count("canaries_refused")
            return
        v, cohort = res.version, res.canary["cohort"] if res.canary else []
        m.record_commit(v, value, v, returned=False)
        note.update(status="canary", version=v, value=value, cohort=cohort)
        self.m.count("canaries")
        time.sleep(0.5)  # serve both cohorts for a while (load, not synchronisation)
        if how == "kill_replica":
            self.crashes.kill_replica(cohort[0])
            m.count("kills_replica")
            self._wait(f"{cohort[0]} back on the canary's v{v}", lambda st: any(
                r["id"] == cohort[0] and r["version"] == v and r["healthy"] for r in st["replicas"]))
        elif how == "kill_coordinator":
            self.crashes.kill_coordinator()
            m.count("kills_coordinator")
            self._wait("the restarted coordinator's canary",
                       lambda st: (st.get("canary") or {}).get("version") == v)
        if how == "judge":
            self._wait("the judge's decision", lambda st: st.get("canary") is None)
            ended = int(self._status()["version"])
            promoted = ended == v
        else:
            promoted = how == "promote" or (how != "abort" and self.rng.random() < 0.5)
            try:
                ended = (fleet.promote() if promoted else fleet.abort_canary("soak")).version
            except Exception as exc:  # noqa: BLE001  (a violation: the fleet was settled)
                m.violation("canary", f"{'promote' if promoted else 'abort'} of v{v} failed: "
                                      f"{type(exc).__name__}: {str(exc)[:300]}")
                return
        if promoted:
            m.record_commit(v, value, v, returned=True)
        else:
            m.record_commit(ended, base_value, base_origin, returned=True)
        note.update(ended=ended, end="promoted" if promoted else "aborted")
        m.count("canaries_promoted" if promoted else "canaries_aborted")
