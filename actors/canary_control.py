"""The coordinator's canaries: start one, judge it, promote it or abort it (``actors.canary`` holds
the pure rules, ``TwoPhaseCommit`` the commits; Ray only behind the ``ReplicaClient``).

Contract:
- While a canary runs (from its COMMIT until its version or the version that ends it is active
  everywhere), refits and rollbacks are refused with a reason that says how to end it.
- ``start`` turns a refit into a canary refit: the cohort is picked from the members now
  (``actors.canary.cohort``), the pre-canary version's checkpoint must be durable (an abort
  re-installs it), and a judge's probes are saved in ``<state_dir>/canary/`` (a URL state: there,
  from a working copy on the coordinator's node) so that a restarted
  coordinator judges with them too; the next canary with probes deletes them.
- ``promote`` and ``abort`` run under the caller's refit lock. ``abort`` logs its decision first, so
  a coordinator that dies before the re-install commits finishes it when it recovers (``resume``);
  a judge interrupted by a restart resumes with the rest of its window.
- The judge runs on its own thread, reads each member's serving statistics for the window and runs
  its probes on every canary member (a ``max_drift`` probe compares with a member of the rest of
  the fleet), then promotes or aborts; the reason goes into the log and ``history``.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .canary import Canary, CohortStats, Verdict, cohort, verdict
from .errors import CanaryRefused, NoCanary
from .ledger import Ledger
from .log import CanarySpec, CanaryState
from .membership import Membership
from .object_state import drop_kept, kept, local_copy
from .replica_client import ReplicaClient
from .replies import Failed
from .requests import Requests
from .store import CheckpointStore
from .two_phase import RefitRequest, TwoPhaseCommit, TxnResult

logger = logging.getLogger("weight_refit.coordinator")

__all__ = ["CanaryControl"]

RETRY_S = 5.0


class CanaryControl:
    def __init__(self, state_dir: str, ledger: Ledger, txns: TwoPhaseCommit, client: ReplicaClient,
                 membership: Membership, requests: Requests, store: CheckpointStore, *,
                 refit_lock: threading.Lock, stop: threading.Event, request_s: float,
                 wait_stored: Callable[[int], None], url: str | None = None,
                 options: dict[str, Any] | None = None) -> None:
        self._dir = Path(state_dir) / "canary"
        self._url = f"{url.rstrip('/')}/canary" if url else None  # a URL state: probes are kept there
        self._options = options or {}
        self._ledger = ledger
        self._txns = txns
        self._client = client
        self._membership = membership
        self._requests = requests
        self._store = store
        self._lock = refit_lock
        self._stop = stop
        self._request_s = request_s
        self._wait_stored = wait_stored
        self.judge_note = ""  # what the judge last said or could not do (status)
        self._retrying: set[str] = set()  # canaries whose abort is being retried
        self._retry_lock = threading.Lock()

    @property
    def running(self) -> CanaryState | None:
        return self._ledger.state.canary

    def cohort_of(self, rid: str) -> str:
        c = self.running
        return "canary" if c is not None and rid in c.cohort else "main"

    def refusal(self, key: str | None, what: str) -> TxnResult | None:
        """An aborted answer for a refit or rollback while a canary runs, else None."""
        c = self.running
        if c is None:
            return None
        state = f"being {'promoted' if c.decision == 'promote' else 'aborted'}" if c.decision else "running"
        return TxnResult(status="aborted", txn=None, version=None, key=key,
                         reason=f"a canary of v{c.version} is {state} on {', '.join(c.cohort)}: {what} is "
                                "refused until it ends (Fleet.promote() or Fleet.abort_canary(); CLI: "
                                "weight-refit promote / abort-canary)")

    # ------------------------------------------------------------------ start

    def request(self, canary: Canary, req: RefitRequest) -> RefitRequest:
        """``req`` as a canary refit (see the module docstring); CanaryRefused if it cannot be one."""
        if not isinstance(canary, Canary):
            raise CanaryRefused(f"canary must be a cluster.Canary, got {type(canary).__name__}")
        try:
            members = cohort(canary, self._membership.members())
        except ValueError as exc:
            raise CanaryRefused(str(exc)) from None
        state = self._ledger.state
        self._wait_stored(state.active_version)
        judge = None
        if canary.judge is not None:
            judge = canary.judge.settings()
            if canary.judge.probes:
                from engines.probes import save_probes

                self._dir.mkdir(parents=True, exist_ok=True)
                # no canary runs now: the probes of those that ended are not needed any more
                drop_kept(self._dir, self._url, "v*.probes.safetensors", self._options)
                path = self._dir / f"v{state.last_version + 1}.probes.safetensors"
                save_probes(list(canary.judge.probes), path)
                judge["probes_file"] = kept(path, self._url, self._options)
        spec = CanarySpec(cohort=members, traffic=canary.traffic, judge=judge)
        return dataclasses.replace(req, canary=spec)

    def started(self, result: TxnResult) -> None:
        c = self.running
        if c is None or c.version != result.version:
            return
        result.canary = {"cohort": list(c.cohort), "traffic": c.traffic, "base_version": c.base_version,
                         "judge": c.judge}
        if c.judge is not None:
            self._judge_later(c.txn)

    # ------------------------------------------------------------------ decisions

    def promote(self, reason: str, key: str | None = None) -> TxnResult:
        c = self._decidable("promote")
        sums = dict(self._ledger.state.versions[c.version].checksums)
        req = RefitRequest(None, {}, sums, sums, key, from_version=c.version)
        result = self._txns.promote(c, req, reason or "promoted by hand")
        self.judge_note = "" if result.status == "committed" else result.reason
        return result

    def abort(self, reason: str, key: str | None = None) -> TxnResult:
        """Log the abort, then re-install the pre-canary weights as a new version; if that does not
        commit, it is retried in the background until it does (the caller holds the refit lock)."""
        c = self.running
        if c is None:
            raise NoCanary("no canary is running: nothing to abort")
        result = self._abort_once(c, reason, key)
        if result.status != "committed":
            self._retry_abort_later(c.txn)
        return result

    def _abort_once(self, c: CanaryState, reason: str, key: str | None = None) -> TxnResult:
        self._txns.decide_abort(c, reason or "aborted by hand")
        base = c.base_version
        info = self._ledger.state.versions.get(base)
        origin = info.origin_version if info is not None and info.origin_version is not None else base
        sums = self._store.manifest(base).checksums
        req = RefitRequest(None, {}, sums, sums, key, origin=origin, from_version=base)
        result = self._txns.run(req)
        if result.status != "committed":
            self.judge_note = f"aborting the canary failed (retried): {result.reason}"
            result.reason = (f"the canary of v{c.version} is aborted, but re-installing v{base}'s weights "
                             f"failed (it is retried): {result.reason}")
        return result

    def _decidable(self, what: str) -> CanaryState:
        c = self.running
        if c is None:
            raise NoCanary(f"no canary is running: nothing to {what}")
        if c.decision == "abort":
            raise NoCanary(f"the canary of v{c.version} is being aborted: it cannot be promoted")
        return c

    # ------------------------------------------------------------------ recovery

    def resume(self) -> None:
        """After a coordinator restart: finish an abort, or judge on (the caller is recovering)."""
        c = self.running
        if c is None:
            return
        if c.decision == "abort":
            self._retry_abort_later(c.txn)  # its first try after RETRY_S: recovery is finishing
        elif c.decision is None and c.judge is not None:
            self._judge_later(c.txn)

    def _retry_abort_later(self, txn: str) -> None:
        with self._retry_lock:
            if txn in self._retrying:
                return
            self._retrying.add(txn)

        def run() -> None:
            try:
                while not self._stop.wait(RETRY_S):
                    with self._lock:
                        c = self.running
                        if c is None or c.txn != txn or self._abort_once(c, c.reason).status == "committed":
                            return
            finally:
                with self._retry_lock:
                    self._retrying.discard(txn)

        threading.Thread(target=run, name="canary-abort", daemon=True).start()

    # ------------------------------------------------------------------ the judge

    def _judge_later(self, txn: str) -> None:
        threading.Thread(target=self._judge_loop, args=(txn,), name="canary-judge", daemon=True).start()

    def _judge_loop(self, txn: str) -> None:
        while not self._stop.is_set():
            c = self.running
            if c is None or c.txn != txn or c.decision is not None or c.judge is None:
                return
            left = c.started_at + float(c.judge["window_s"]) - time.time()
            if left > 0:
                self._stop.wait(min(left, 1.0))
                continue
            try:
                decided = self.judge_now(c)
            except Exception as exc:  # noqa: BLE001  (judged again after a pause)
                logger.exception("judging the canary of v%s failed", c.version)
                self.judge_note = f"judging failed (retried in {RETRY_S:g}s): {exc}"
                self._stop.wait(RETRY_S)
                continue
            with self._lock:
                c = self.running
                if c is None or c.txn != txn or c.decision is not None:
                    return
                result = self.promote(decided.reason) if decided.promote else self.abort(decided.reason)
            if result.status == "committed" or not decided.promote:
                return  # an abort that did not commit is retried by ``abort``
            self.judge_note = f"the judge could not promote: {result.reason}"
            logger.warning("canary of v%s: %s", c.version, self.judge_note)
            return

    def judge_now(self, c: CanaryState) -> Verdict:
        """The judge's verdict on ``c`` from its window so far."""
        assert c.judge is not None
        members = self._membership.members()
        canaries = [r for r in members if r in c.cohort]
        rest = [r for r in members if r not in c.cohort]
        cohorts = {"canary": CohortStats(), "main": CohortStats()}
        for rid, stats in self._client.serving_stats(members, c.started_at, self._request_s).items():
            if isinstance(stats, dict):
                cohorts["canary" if rid in c.cohort else "main"].add(stats)
        failures = self._probe(c, canaries, rest)
        decided = verdict(c.judge, cohorts["canary"], cohorts["main"], failures)
        logger.info("canary of v%s: %s", c.version, decided.reason)
        return decided

    def _probe(self, c: CanaryState, canaries: list[str], rest: list[str]) -> list[str]:
        path = (c.judge or {}).get("probes_file")
        if not path:
            return []
        from engines.probes import check_probe_outputs, load_probes

        failures: list[str] = []
        for probe in load_probes(local_copy(path, self._dir, self._options)):
            live = None
            if probe.needs_live and rest:
                answer = self._client.infer(rest[0], list(probe.inputs), 0, self._request_s)
                live = answer["outputs"] if isinstance(answer, dict) and not answer["stale"] else None
            for rid in canaries:
                answer = self._client.infer(rid, list(probe.inputs), c.version, self._request_s)
                if isinstance(answer, Failed) or answer["stale"]:
                    why = answer.reason if isinstance(answer, Failed) else answer.get("reason", "stale")
                    failures.append(f"probe {probe.name!r} could not run on {rid}: {why}")
                elif why := check_probe_outputs(probe, answer["outputs"], live):
                    failures.append(f"{why} (on {rid})")
        return failures
