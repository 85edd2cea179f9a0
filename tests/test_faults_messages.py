"""The fault matrix for lost and delayed messages between the coordinator and its replicas.

Real actors under client load. Messages are lost or delayed at the replica (failpoints
``message.<m>``: before the work; ``reply.<m>``: after the work, only the answer is lost) or inside
Ray itself (``RAY_testing_rpc_failure`` in the coordinator's process drops actor calls before or
after the callee ran them). Each case ends with every member on one version with equal checksums,
no failed client request, and, where a refit aborted, its cause named in ``RefitAborted.reason``
and in the history.
"""

from __future__ import annotations

import glob
import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
import torch
from fleet_models import (
    PROBE_WEIGHTS,
    PROBE_WIDTH,
    ClientLoad,
    converged,
    fleet_config,
    probe_input,
    probe_value,
    probe_weights,
    wait_for,
)

from cluster import Fleet, RefitAborted
from engines.checksum import tensor_checksum

TIMEOUTS = {"prepare_s": 4, "commit_s": 4, "activate_s": 4, "request_s": 15, "lease_s": 2,
            "launch_s": 60}
# a lost message: the sender's wait for it runs out before the failpoint raises
LOST = f"drop:{TIMEOUTS['commit_s'] + 1}"


@pytest.fixture
def make_fleet(ray_session: None, probe_engine_path: Path, tmp_path: Path):
    fleets: list[Fleet] = []

    def make(first_refit: bool = True, **over: Any) -> Fleet:
        over.setdefault("timeouts", TIMEOUTS)
        cfg = fleet_config(probe_engine_path, tmp_path, replicas=3, **over)
        fleets.append(Fleet.launch(cfg))
        if first_refit:
            fleets[-1].refit(probe_weights(1.0))
        return fleets[-1]

    yield make
    for f in fleets:
        f.shutdown()


def _handles(fleet: Fleet) -> dict[str, Any]:
    return ray.get(fleet._coord.member_handles.remote())


def _arm(handle: Any, name: str, action: str | None) -> None:
    ray.get(handle.arm_failpoint.remote(name, action), timeout=30)


def _status(handle: Any) -> dict[str, Any]:
    return ray.get(handle.status.remote(), timeout=10)


def _clean(handle: Any) -> bool:
    """No staged set held, no transaction pending."""
    st = _status(handle)
    return st["staged_bytes"] == 0 and st["pending"] == []


def _values(fleet: Fleet, n: int = 6) -> set:
    return {probe_value(fleet.infer(probe_input()).outputs) for _ in range(n)}


def _row(fleet: Fleet, txn: str | None) -> dict[str, Any]:
    rows = [r for r in fleet.history() if r["txn"] == txn]
    assert len(rows) == 1, (txn, fleet.history())
    return rows[0]


def _assert_abort_recorded(fleet: Fleet, err: RefitAborted) -> dict[str, Any]:
    """The aborted transaction is in the history with the reason the caller got."""
    row = _row(fleet, err.txn)
    assert row["status"] == "aborted" and not row["activated"], row
    assert row["reason"] and row["reason"] in err.reason, (row, err.reason)
    return row


# ----------------------------------------------------------------- lost COMMIT / ACTIVATE reply


@pytest.mark.parametrize("commit_lost, activate_lost", [("message.commit", "reply.activate"),
                                                        ("reply.commit", "message.activate")],
                         ids=["commit-lost+activate-answer-lost", "commit-answer-lost+activate-lost"])
def test_a_commit_and_an_activate_lost_once_are_resent_and_the_refit_commits(
        make_fleet, commit_lost: str, activate_lost: str) -> None:
    """r1 loses its first COMMIT (or only its answer), r2 its first ACTIVATE (or only its answer).
    The coordinator resends both (idempotent) and the refit commits on every member. sync_to
    raises on both, so a fall-back to a catch-up would exclude them: committing with nobody
    excluded proves the resent messages delivered."""
    fleet = make_fleet()
    h = _handles(fleet)
    with ClientLoad(fleet) as load:
        _arm(h["r1"], commit_lost, f"{LOST}@1")
        _arm(h["r2"], activate_lost, f"{LOST}@1")
        for rid in ("r1", "r2"):
            _arm(h[rid], "message.sync_to", "raise")
        t0 = time.monotonic()
        res = fleet.refit(probe_weights(2.0))
        assert time.monotonic() - t0 < 2 * (TIMEOUTS["commit_s"] + TIMEOUTS["activate_s"]) + 30  # no hang
        assert res.excluded == []
        for rid in ("r1", "r2"):
            _arm(h[rid], "message.sync_to", None)
        st = converged(fleet)
        assert st["version"] == res.version
        assert [r["version"] for r in st["replicas"]] == [res.version] * 3
        assert _values(fleet) == {2.0}
        row = _row(fleet, res.txn)
        assert row["status"] == "committed" and row["activated"], row
        wait_for(lambda: all(_clean(x) for x in h.values()), 30, "no staged set left anywhere")
    load.check()


# ----------------------------------------------------------------- delayed PREPARE


def test_a_prepare_delayed_past_its_timeout_aborts_and_stages_nothing_when_it_lands(make_fleet) -> None:
    fleet = make_fleet()
    before = fleet.status()
    r1 = _handles(fleet)["r1"]
    delay = TIMEOUTS["prepare_s"] + 2
    with ClientLoad(fleet) as load:
        _arm(r1, "message.prepare", f"sleep:{delay}@1")
        sent = time.monotonic()
        with pytest.raises(RefitAborted) as info:
            fleet.refit(probe_weights(2.0))
        assert time.monotonic() - sent < TIMEOUTS["prepare_s"] + 30  # a NO, not a hung refit
        err = info.value
        assert f"r1: no answer to prepare within {TIMEOUTS['prepare_s']}s" in err.reason, err.reason
        assert err.votes["r1"].startswith("NO: no answer to prepare"), err.votes
        row = _assert_abort_recorded(fleet, err)

        # the replica already holds the ABORT: a PREPARE of that transaction is refused and
        # stages nothing (what the delayed one does when it lands) ...
        ref = ray.put({f"w.{i}": np.full(PROBE_WIDTH, 2.0, np.float32) for i in range(PROBE_WEIGHTS)})
        sums = {f"w.{i}": tensor_checksum(torch.full((PROBE_WIDTH,), 2.0)) for i in range(PROBE_WEIGHTS)}
        specs = {f"w.{i}": {"shape": [PROBE_WIDTH], "dtype": "float32"} for i in range(PROBE_WEIGHTS)}
        replay = ray.get(r1.prepare.remote(before["epoch"], err.txn, row["version"], [ref], specs, sums),
                         timeout=30)
        assert not replay.yes and "already aborted" in replay.reason, replay
        # ... and the delayed one itself, once it has landed (it left the coordinator before the
        # refit's PREPARE timed out, so it lands within its delay of `sent`): r1 never holds a
        # staged set or a pending transaction in the meantime or afterwards.
        samples = []
        while True:
            samples.append(_status(r1))
            if time.monotonic() > sent + delay + 2:
                break
            time.sleep(0.2)
        assert all(s["staged_bytes"] == 0 and s["pending"] == [] for s in samples), \
            [(s["staged_bytes"], s["pending"]) for s in samples]
        assert converged(fleet)["version"] == before["version"]
        assert _values(fleet) == {1.0}

        _arm(r1, "message.prepare", None)
        res = fleet.refit(probe_weights(3.0))
        assert converged(fleet)["version"] == res.version and _values(fleet) == {3.0}
        assert all(_clean(x) for x in _handles(fleet).values())
    load.check()


# ----------------------------------------------------------------- lost ABORT


def test_a_lost_abort_leaves_a_staged_set_that_the_next_prepare_frees(make_fleet) -> None:
    fleet = make_fleet()
    before = fleet.status()["version"]
    h = _handles(fleet)
    with ClientLoad(fleet) as load:
        _arm(h["r2"], "message.abort", LOST)  # the ABORT and its retry
        _arm(h["r1"], "replica.before_vote", "raise")
        with pytest.raises(RefitAborted) as info:
            fleet.refit(probe_weights(2.0))
        err = info.value
        assert "r1: FailpointError" in err.reason and "replica.before_vote" in err.reason, err.reason
        assert err.votes["r1"].startswith("NO") and err.votes["r2"] == "YES"
        _assert_abort_recorded(fleet, err)

        lossy = _status(h["r2"])
        assert lossy["staged_bytes"] > 0, lossy  # it never heard of the ABORT
        assert [txn for txn, _ in lossy["pending"]] == [err.txn], lossy["pending"]
        for rid in ("r0", "r1"):
            assert _clean(h[rid]), _status(h[rid])
        assert converged(fleet)["version"] == before and _values(fleet) == {1.0}

        _arm(h["r2"], "message.abort", None)
        _arm(h["r1"], "replica.before_vote", None)
        # freed by this refit's PREPARE (a newer version of the same epoch), unless a lease
        # renewal's answer reported it first and the coordinator re-sent the ABORT
        res = fleet.refit(probe_weights(3.0))
        statuses = {rid: _status(x) for rid, x in h.items()}
        assert all(s["staged_bytes"] == 0 and s["pending"] == [] for s in statuses.values()), statuses
        assert converged(fleet)["version"] == res.version and _values(fleet) == {3.0}
    load.check()


# ----------------------------------------------------------------- delayed renewals and exclusion


def test_delayed_renewals_cannot_undo_an_exclusion_and_the_excluded_replica_never_serves_old(
        make_fleet) -> None:
    """Commit policy exclude: r1 hangs in PREPARE and every lease renewal reaches it 1.5 s late.
    The refit commits without it. Renewals sent just before the exclusion land after it and are
    ignored (older membership generation): from its first "excluded" answer on, and for every
    request issued after ``refit`` returned, r1 never answers with the old version. Once healed it
    is re-admitted and converged."""
    fleet = make_fleet(commit_policy="exclude", max_exclude=1)
    old = fleet.status()["version"]
    r1 = _handles(fleet)["r1"]
    answers: list[tuple[float, dict[str, Any]]] = []
    stop = threading.Event()

    def direct() -> None:  # a client that talks to r1 only, with no version floor
        while not stop.is_set():
            issued = time.monotonic()
            answers.append((issued, ray.get(r1.infer.remote([probe_input()], 0), timeout=30)))

    with ClientLoad(fleet) as load:
        _arm(r1, "message.renew_lease", "sleep:1.5")
        _arm(r1, "replica.before_vote", "sleep:8")
        th = threading.Thread(target=direct, daemon=True)
        th.start()
        try:
            res = fleet.refit(probe_weights(9.0))
            returned = time.monotonic()
            late = ray.get(r1.infer.remote([probe_input()], 0), timeout=10)
            readmitted = "r1" in _handles(fleet)  # the repair loop may already have taken it back
            assert (late["stale"] and late["reason"] == "excluded") or \
                (readmitted and not late["stale"] and late["version"] == res.version), late
            assert res.excluded == ["r1"] and res.version > old
            # a few more answers, then heal it
            wait_for(lambda: sum(t > returned for t, _ in answers) >= 5, 30, "answers from r1")
            _arm(r1, "message.renew_lease", None)
            _arm(r1, "replica.before_vote", None)
            wait_for(lambda: "r1" in _handles(fleet), 60, "r1 re-admitted")
            wait_for(lambda: any(t > returned and not a["stale"] for t, a in answers), 30,
                     "r1 serving again")
        finally:
            stop.set()
            th.join(timeout=60)
        seen = [a for _, a in answers]
        first = next((i for i, a in enumerate(seen) if a["stale"] and a["reason"] == "excluded"), None)
        assert first is not None and answers[first][0] < returned, "r1 was not excluded before refit returned"
        wrong = [(round(t - returned, 3), a) for t, a in answers[first:]
                 if not a["stale"] and a["version"] <= old]
        assert not wrong, f"r1 served the old version after its exclusion: {wrong[:3]}"
        after = [a for t, a in answers if t > returned]
        assert all(a["stale"] or a["version"] >= res.version for a in after)
        assert {a["reason"] for a in after if a["stale"]} <= {"excluded", "catching_up"}
        st = converged(fleet)
        assert st["version"] == res.version and all(_clean(x) for x in _handles(fleet).values())
        assert _values(fleet) == {9.0}
    load.check()


# ----------------------------------------------------------------- lost catch-up


def test_a_lost_catch_up_reply_ends_with_the_replica_on_the_version_or_excluded_and_readmitted(
        make_fleet) -> None:
    """r2 gets neither ACTIVATE (the first nor the retry), so the coordinator catches it up from
    the store; that sync_to is done but its answer is lost. The refit commits; r2 is on the
    version, or excluded and re-admitted by the repair loop."""
    fleet = make_fleet()
    r2 = _handles(fleet)["r2"]
    with ClientLoad(fleet) as load:
        _arm(r2, "message.activate", LOST)
        _arm(r2, "reply.sync_to", "drop:0.5@1")
        res = fleet.refit(probe_weights(5.0))
        _arm(r2, "message.activate", None)
        assert res.excluded in ([], ["r2"]), res.excluded
        wait_for(lambda: "r2" in _handles(fleet), 60, "r2 a member again")
        st = wait_for(lambda: converged(fleet), 30, "the fleet converged")
        assert st["version"] == res.version and _values(fleet) == {5.0}
        row = _row(fleet, res.txn)
        assert row["status"] == "committed" and row["activated"], row
        _arm(r2, "reply.sync_to", None)
        nxt = fleet.refit(probe_weights(6.0))
        assert nxt.excluded == [] and converged(fleet)["version"] == nxt.version
        assert _values(fleet) == {6.0}
        assert all(_clean(x) for x in _handles(fleet).values())
    load.check()


# ----------------------------------------------------------------- Ray-level lost calls

PUSH_TASK = "CoreWorkerService.grpc_client.PushTask"
INJECTIONS = 10
# what a refit aborted by a lost call may say: a PREPARE (or its answer) lost, or the checkpoint
# write's call lost twice
LOST_CALL = re.compile(r"prepare not delivered: the message was lost|"
                       r"persisting version \d+ failed: ActorUnavailableError")


def _injected() -> int:
    """Calls Ray's RPC chaos has failed so far in this session (each one logs a line)."""
    ctx = ray.get_runtime_context()
    logs = os.path.join(ctx.get_temp_dir(), ctx.get_session_name(), "logs")
    n = 0
    for path in glob.glob(os.path.join(logs, "python-core-worker-*.log")):
        with open(path, errors="replace") as f:
            n += sum(f"RPC request failure for {PUSH_TASK}" in line
                     or f"RPC response failure for {PUSH_TASK}" in line for line in f)
    return n


def test_calls_lost_inside_ray_abort_or_commit_cleanly_and_the_fleet_converges(make_fleet) -> None:
    chaos = {PUSH_TASK: {"num_failures": INJECTIONS, "req_failure_prob": 10, "resp_failure_prob": 10,
                         "in_flight_failure_prob": 0}}
    env = {"RAY_testing_rpc_failure": json.dumps(chaos), "RAY_timeout_ms_task_wait_for_death_info": "0"}
    baseline = _injected()
    # longer leases: fewer renewals, so the lost calls fall mostly on the refits' messages; and
    # those messages through Ray, not over the control channel (its faults: test_control_channel.py)
    fleet = make_fleet(first_refit=False, coordinator_env=env, timeouts={**TIMEOUTS, "lease_s": 6},
                       control_channel=False)
    committed: list[int] = []
    aborted: list[RefitAborted] = []
    with ClientLoad(fleet) as load:
        before_refits = _injected()
        for i in range(8):
            try:
                committed.append(fleet.refit(probe_weights(20.0 + i)).version)
            except RefitAborted as err:
                aborted.append(err)
        during_refits = _injected() - before_refits
        for err in aborted:
            assert LOST_CALL.search(err.reason), err.reason
            assert all(v == "YES" or LOST_CALL.search(v) for v in err.votes.values()), err.votes
            _assert_abort_recorded(fleet, err)
        assert committed == sorted(committed)
        assert during_refits > 0 or aborted, "no injected failure hit a refit: the test tested nothing"
        # spend what is left of the budget (status fans out to every replica), then run clean
        wait_for(lambda: fleet.status() and _injected() - baseline >= INJECTIONS, 60,
                 "every injected failure spent")
        res = fleet.refit(probe_weights(99.0))
        assert res.excluded == []
        st = wait_for(lambda: converged(fleet), 60, "the fleet converged")
        assert st["version"] == res.version and _values(fleet) == {99.0}
        wait_for(lambda: all(_clean(x) for x in _handles(fleet).values()), 30, "no staged set left")
        assert [_status(x)["control_calls"] for x in _handles(fleet).values()] == [0, 0, 0]
    load.check()
