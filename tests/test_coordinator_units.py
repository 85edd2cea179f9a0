"""The coordinator's logic without Ray: the two-phase commit, recovery, repair, leases and
membership, driven through a fake ``ReplicaClient`` over a real transaction log on disk.

The loose ends of the coordinator review each have a test here that fails on the code before it
(named in the docstring).
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from coordinator_fakes import FakePersister, FakeReplicas, FakeRetention

from actors.coordinator_protocol import CoordinatorTxn, Phase
from actors.failpoints import Failpoints
from actors.leases import LeaseKeeper, Repairer, run_loop
from actors.ledger import Ledger
from actors.log import ActivatedRecord, BeginRecord, CommitRecord, MemberRecord, TxnLog
from actors.membership import Membership, MembershipError, MemberState
from actors.persistence import PersistTracker, export_job
from actors.recovery import (
    Recovery,
    RecoveryState,
    finish_the_log,
    persist_the_log,
    restore_membership,
    sync_members,
)
from actors.replies import Failed, FailureKind
from actors.settings import CoordinatorSettings, Timeouts
from actors.two_phase import RefitRequest, TwoPhaseCommit

SUMS = {"w": "00000000000000a1"}
RIDS = ["r0", "r1", "r2"]


class Rig:
    """One coordinator's parts over fakes: ``rig.txns.run(rig.request())`` is one refit."""

    def __init__(self, state_dir: Path, *, policy: str = "strict", max_exclude: int = 0,
                 lease_s: float = 0.05, durability: str = "disk") -> None:
        self.fp = Failpoints(owner="coordinator")
        self.settings = CoordinatorSettings(
            fleet="f", namespace="n", state_dir=str(state_dir), commit_policy=policy, max_exclude=max_exclude,
            durability=durability,
            timeouts=Timeouts(prepare_s=1, commit_s=1, activate_s=1, lease_s=lease_s, launch_s=1,
                              persist_s=1))
        self.ledger = Ledger.open(state_dir, self.fp)
        self.ledger.bump_epoch()
        self.client = FakeReplicas(RIDS)
        self.membership = Membership()
        for rid in RIDS:
            self.membership.admit(rid)
        self.failed: list[tuple[str, str]] = []
        self.leases = LeaseKeeper(self.client, self.membership, epoch=self.ledger.epoch, lease_s=lease_s,
                                  on_failed=lambda rid, why: self.failed.append((rid, why)),
                                  aborted=lambda txn: self.txns.aborted_reason(txn))
        self.persister = FakePersister()
        self.retention = FakeRetention()
        self.txns = TwoPhaseCommit(self.settings, self.ledger, self.client, self.persister, self.membership,
                                   self.leases, self.retention, self.fp, lambda in_flight: {0})
        self.stop = threading.Event()
        self.lost: list[tuple[str, int, str]] = []
        self.tracker = PersistTracker(self.persister, self.ledger, persist_s=1, retry_s=0.01,
                                      export=functools.partial(
                                          export_job, ledger=self.ledger, client=self.client,
                                          membership=self.membership, settings=self.settings,
                                          timeouts=self.settings.timeouts),
                                      drop=self.retention.drop,
                                      on_lost=lambda *a: self.lost.append(a), stop=self.stop)
        self.txns.tracker = self.tracker

    def request(self, key: str | None = None) -> RefitRequest:
        return RefitRequest(refs=["ref"], specs={"w": {"shape": [1], "dtype": "float32"}}, checksums=SUMS,
                            full=SUMS, key=key, base_version=self.ledger.state.active_version)

    def kinds(self) -> list[str]:
        return [r.kind for r in TxnLog.open(self.settings.state_dir, readonly=True).records()]


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp_path / "state")


# ----------------------------------------------------------------------------- the two-phase commit


def test_a_refit_logs_begin_commit_activated_and_every_member_serves_it(rig: Rig) -> None:
    res = rig.txns.run(rig.request(key="k1"))
    assert res.status == "committed" and res.version == 1 and res.activated
    assert rig.kinds() == ["EPOCH", "BEGIN", "COMMIT", "ACTIVATED"]
    assert {r.version for r in rig.client.replicas.values()} == {1}
    assert rig.client.methods() == ["prepare", "commit"]  # COMMIT carries ACTIVATE: two rounds
    assert rig.ledger.state.active_version == 1 and rig.txns.current is None
    assert rig.txns.outcome("k1").status == "committed"
    assert rig.retention.scheduled  # retention runs after every activation


def test_one_no_vote_aborts_logs_the_abort_and_tells_every_member(rig: Rig) -> None:
    rig.client.replicas["r1"].vote_no = "ChecksumMismatch: w"
    res = rig.txns.run(rig.request())
    assert res.status == "aborted" and "r1: ChecksumMismatch: w" in res.reason
    assert res.votes == {"r0": "YES", "r1": "NO: ChecksumMismatch: w", "r2": "YES"}
    assert rig.kinds() == ["EPOCH", "BEGIN", "ABORT"]
    assert ("abort", tuple(RIDS)) in rig.client.calls
    assert all(not r.staged for r in rig.client.replicas.values())
    assert rig.retention.dropped == [1]


def test_a_failure_after_begin_aborts_logs_it_and_frees_every_staged_set(rig: Rig) -> None:
    """Loose end 3: an error after BEGIN (here the COMMIT record cannot be written: disk full)
    used to leave the transaction undecided, the replicas holding their PREPARED sets."""
    rig.fp.arm("log.write", "oserror:ENOSPC@2")  # BEGIN is the first write, COMMIT the second
    res = rig.txns.run(rig.request(key="k-full"))
    assert res.status == "aborted"
    assert "disk full (ENOSPC) writing the transaction log" in res.reason
    assert rig.kinds() == ["EPOCH", "BEGIN", "ABORT"]
    assert rig.ledger.state.outcomes["k-full"].status == "aborted"
    assert ("abort", tuple(RIDS)) in rig.client.calls
    assert all(not r.staged for r in rig.client.replicas.values())
    assert rig.txns.current is None
    rig.fp.arm("log.write", None)
    assert rig.txns.run(rig.request()).status == "committed"  # no manual repair


def test_an_exception_of_the_coordinators_own_after_begin_aborts_too(rig: Rig) -> None:
    rig.persister.raise_on_wait = RuntimeError("worker exploded")
    res = rig.txns.run(rig.request())
    assert res.status == "aborted" and "RuntimeError: worker exploded" in res.reason
    assert rig.kinds()[-1] == "ABORT" and all(not r.staged for r in rig.client.replicas.values())


def test_a_refit_refused_before_its_begin_is_named_in_outcome_and_history(rig: Rig) -> None:
    rig.fp.arm("log.write", "oserror:ENOSPC@1")
    res = rig.txns.run(rig.request(key="k-nobegin"))
    assert res.status == "aborted" and "refused before it began: disk full" in res.reason
    assert rig.client.calls == []  # nothing was sent
    assert rig.kinds() == ["EPOCH"]
    out = rig.txns.outcome("k-nobegin")
    assert out is not None and out.status == "aborted" and "disk full" in out.reason
    [row] = [h for h in rig.ledger.history() if h["key"] == "k-nobegin"]
    assert row["status"] == "aborted" and "not in the log" in row["reason"]


def test_an_abort_record_that_cannot_be_written_yet_is_written_with_the_next_record(rig: Rig) -> None:
    rig.client.replicas["r2"].vote_no = "no"
    rig.fp.arm("log.write", "oserror:ENOSPC@2")  # BEGIN ok, ABORT fails
    res = rig.txns.run(rig.request(key="k-late-abort"))
    assert res.status == "aborted" and "not logged yet" in res.reason
    assert rig.ledger.deferred == 1 and rig.kinds() == ["EPOCH", "BEGIN"]
    assert rig.txns.outcome("k-late-abort").status == "aborted"
    rig.client.replicas["r2"].vote_no = ""
    assert rig.txns.run(rig.request()).status == "committed"
    assert rig.kinds() == ["EPOCH", "BEGIN", "ABORT", "BEGIN", "COMMIT", "ACTIVATED"]
    assert rig.ledger.deferred == 0


def test_one_verifier_per_node_is_named_once_the_votes_named_the_nodes(rig: Rig) -> None:
    """The members of a node read one object-store copy: one of them hashes it."""
    rig.client.nodes = {"r0": "node-a", "r1": "node-a", "r2": "node-b"}
    assert rig.txns.run(rig.request()).status == "committed"
    assert rig.client.verifiers == [None]  # no node known yet: every member hashes its copy
    assert rig.txns.run(rig.request()).status == "committed"
    assert rig.client.verifiers[-1] == {"node-a": "r0", "node-b": "r2"}
    assert rig.client.hashed_on == [None, None]
    rollback = RefitRequest(refs=None, specs={}, checksums=SUMS, full=SUMS, key=None, from_version=1,
                            hashed_on="node-a")
    rig.txns.run(rollback)
    assert rig.client.verifiers[-1] is None  # a stored version: each member reads its own
    assert rig.client.hashed_on[-1] is None  # ... and hashes it: the caller's hash was not of it
    assert rig.persister.jobs[-1].hashed_on is None  # the checkpoint writer too
    inline = RefitRequest(refs=[(None, {}, {})], specs={}, checksums=SUMS, full=SUMS, key=None,
                          base_version=rig.ledger.state.active_version, hashed_on="node-a")
    rig.txns.run(inline)
    assert rig.client.verifiers[-1] is None  # a small version inside the call: a copy per member
    assert rig.client.hashed_on[-1] is None
    assert rig.persister.jobs[-1].hashed_on is None


def test_the_node_whose_stored_copy_the_caller_hashed_is_passed_on_with_its_verifiers(rig: Rig) -> None:
    rig.client.nodes = {"r0": "node-a", "r1": "node-a", "r2": "node-b"}
    assert rig.txns.run(dataclasses.replace(rig.request(), hashed_on="node-a")).status == "committed"
    assert rig.client.hashed_on == ["node-a"]
    assert rig.persister.jobs[-1].hashed_on == "node-a"  # the checkpoint writer there need not hash it


def test_progress_follows_the_phases_and_counts_each_activation_as_it_arrives(rig: Rig) -> None:
    """``progress()`` says "preparing" during PREPARE, "activating" once COMMIT is logged and
    COMMIT+ACTIVATE are out, and lists each member as activated when its answer arrives."""
    seen: dict[str, Any] = {}
    rig.client.on_call["prepare"] = lambda rids: seen.setdefault("prepare", rig.txns.current.phase.value)
    rig.client.on_call["commit"] = lambda rids: seen.setdefault("commit", rig.txns.current.progress())
    rig.txns.run(rig.request())
    assert seen["prepare"] == "preparing"
    assert seen["commit"]["phase"] == "activating" and seen["commit"]["activated"] == []
    replies: list[list[str]] = []
    rig.client.on_call["commit"] = lambda rids: None
    real = rig.client.commit

    def watch(*args: Any, **kw: Any) -> Any:
        inner = kw.pop("on_reply")

        def on_reply(rid: str, reply: Any) -> None:
            inner(rid, reply)
            replies.append(list(rig.txns.current.progress()["activated"]))
        return real(*args, on_reply=on_reply, **kw)

    rig.client.commit = watch
    rig.txns.run(rig.request())
    assert replies == [["r0"], ["r0", "r1"], ["r0", "r1", "r2"]]


def test_lost_commit_messages_are_retried_once(rig: Rig) -> None:
    rig.client.lose("commit", "r1")
    rig.client.lose("commit", "r2", kind=FailureKind.TIMEOUT)
    res = rig.txns.run(rig.request())
    assert res.status == "committed" and res.excluded == []
    assert ("commit", ("r1", "r2")) in rig.client.calls
    assert "catch_up" not in rig.client.methods()  # the retry sufficed
    assert {r.version for r in rig.client.replicas.values()} == {1}


def test_members_lost_during_activate_are_caught_up_together_and_excluded_if_they_cannot(rig: Rig) -> None:
    """Loose end 9: lost members used to be caught up one at a time, each for up to launch_s."""
    for rid in ("r1", "r2"):
        rig.client.lose("commit", rid, times=2, kind=FailureKind.TIMEOUT)
    rig.client.replicas["r2"].catch_up_fails = "ChecksumMismatch: v1 is corrupted"
    res = rig.txns.run(rig.request())
    assert res.status == "committed" and res.excluded == ["r2"]
    assert [c for c in rig.client.calls if c[0] == "catch_up"] == [("catch_up", ("r1", "r2"))]
    assert rig.client.replicas["r1"].version == 1
    seat = rig.membership.get("r2")
    assert seat.state is MemberState.EXCLUDED and "corrupted" in seat.reason
    assert rig.client.exclusions == [("r2", rig.ledger.epoch, seat.generation)]
    records = TxnLog.open(rig.settings.state_dir, readonly=True).records()
    assert any(isinstance(r, MemberRecord) and r.event == "exclude" and r.replica_id == "r2" for r in records)


def test_an_exclude_policy_commit_takes_the_no_voters_out_before_the_commit_point(tmp_path: Path) -> None:
    rig = Rig(tmp_path, policy="exclude", max_exclude=1)
    rig.client.replicas["r0"].vote_no = "timeout"
    res = rig.txns.run(rig.request())
    assert res.status == "committed" and res.excluded == ["r0"]
    kinds = rig.kinds()
    assert kinds.index("MEMBER") < kinds.index("COMMIT")
    assert "r0" not in [r for m, rids in rig.client.calls if m == "commit" for r in rids]


def test_outcome_reads_the_transaction_in_flight_once(rig: Rig) -> None:
    """Loose end 6: ``outcome``/``status`` read ``current`` twice while the refit thread could
    clear it in between (an AttributeError)."""
    txn = CoordinatorTxn(txn="t-live", epoch=1, version=9, key="k-live", members=RIDS)

    class Vanishing(TwoPhaseCommit):
        reads = 0

        @property
        def current(self) -> Any:
            Vanishing.reads += 1
            return txn if Vanishing.reads == 1 else None

        @current.setter
        def current(self, value: Any) -> None:
            pass

    vanishing = Vanishing(rig.settings, rig.ledger, rig.client, rig.persister, rig.membership, rig.leases,
                          rig.retention, rig.fp, lambda v: {0})
    out = vanishing.outcome("k-live")
    assert out is not None and out.txn == "t-live" and out.status == "in_doubt" and Vanishing.reads == 1


# ----------------------------------------------------------------------------- recovery


def _log_committed_in_an_earlier_epoch(state_dir: Path) -> None:
    with TxnLog.open(state_dir) as log:
        log.bump_epoch()
        log.append(BeginRecord(epoch=1, txn="t-logged", version=1, key="k-logged", checksums=SUMS))
        log.append(CommitRecord(epoch=1, txn="t-logged", version=1))
        log.append(BeginRecord(epoch=1, txn="t-undecided", version=2, key="k-undecided", checksums=SUMS))
        for rid in RIDS:
            log.append(MemberRecord(epoch=1, replica_id=rid, event="join"))
        log.append(MemberRecord(epoch=1, replica_id="r2", event="exclude"))


def test_recovery_finishes_a_logged_commit_visibly_and_presumes_the_rest_aborted(tmp_path: Path) -> None:
    state = tmp_path / "state"
    _log_committed_in_an_earlier_epoch(state)
    rig = Rig(state)
    rig.membership = Membership()
    restore_membership(rig.ledger.state.members, rig.client, rig.membership)
    assert rig.membership.members() == ["r0", "r1"] and rig.membership.excluded() == ["r2"]
    rig.txns._membership = rig.membership
    for rid in RIDS:  # they voted YES before the crash
        rig.client.replicas[rid].staged["t-logged"] = 1
    seen: list[Any] = []
    rig.client.on_call["commit"] = lambda rids: seen.append(
        (rig.txns.current.phase, rig.txns.outcome("k-logged")))
    finish_the_log(rig.ledger, rig.txns)
    phase, outcome = seen[0]
    assert phase is Phase.ACTIVATING and outcome.status == "committed" and not outcome.activated
    state_after = rig.ledger.state
    assert state_after.active_version == 1 and state_after.undecided == []
    assert state_after.outcomes["k-undecided"].status == "aborted"
    assert "presumed abort" in (state_after.outcomes["k-undecided"].reason or "")
    assert rig.client.replicas["r0"].version == rig.client.replicas["r1"].version == 1
    assert rig.client.replicas["r2"].version == 0  # excluded: caught up later by the repair loop


def test_sync_members_catches_members_up_and_excludes_those_that_cannot(rig: Rig) -> None:
    rig.txns.run(rig.request())
    rig.client.replicas["r1"].version = 0
    rig.client.replicas["r2"].version = 0
    rig.client.replicas["r2"].catch_up_fails = "CheckpointMissing"
    sync_members(rig.ledger, rig.txns, rig.client, rig.membership, request_s=1, catch_up_s=1)
    assert rig.client.replicas["r1"].version == 1
    assert rig.membership.excluded() == ["r2"]


def test_recovery_is_retried_until_it_succeeds_and_refusals_name_the_failure() -> None:
    """Loose end 4: recovery errors were swallowed and refits ran on an unrecovered log."""
    stop = threading.Event()
    attempts: list[int] = []
    healed = threading.Event()

    def attempt() -> None:
        attempts.append(1)
        if not healed.is_set():
            raise OSError(28, "No space left on device", "/s/txn.log")

    recovery = Recovery(attempt, retry_s=0.01, stop=stop)
    recovery.start()
    try:
        why = recovery.wait(5.0)
        assert recovery.state is RecoveryState.FAILED
        assert "could not recover" in why and "disk full (ENOSPC)" in why and "/s/txn.log" in why
        assert recovery.summary()["state"] == "failed"
        healed.set()
        deadline = time.monotonic() + 5
        while not recovery.ready and time.monotonic() < deadline:
            recovery.wait(0.5)
        assert recovery.ready and recovery.state is RecoveryState.READY and len(attempts) >= 2
    finally:
        stop.set()


# ----------------------------------------------------------------------------- leases and repair


def test_a_renewal_computed_before_an_exclusion_records_nothing_and_is_refused(rig: Rig) -> None:
    """Loose end 1: the lease loop renewed from a snapshot of the members, and the replica
    cleared its exclusion on any renewal; a renewal landing after ``exclude`` re-admitted it."""
    snapshot = rig.membership.renewal_targets()
    rig.txns.exclude("r1", "hung")
    for rid, generation in snapshot:  # the loop's round, sent after the exclusion
        rig.leases.grant(rid, generation)
    assert rig.membership.get("r1").renewed_at == 0.0  # not counted as a lease granted
    replica = rig.client.replicas["r1"]
    assert replica.excluded_by is not None and replica.lease == replica.excluded_by  # still excluded


def test_repair_readmits_with_a_new_generation_and_records_the_lease_it_grants(rig: Rig) -> None:
    """Loose end 2: a re-admission did not record its renewal, so a second exclusion waited out a
    stale lease."""
    rig.txns.exclude("r2", "hung")
    lock = threading.Lock()
    admitted = []

    def admit(rid: str, version: int) -> bool:
        generation = rig.membership.admit(rid)
        rig.leases.grant(rid, generation)
        admitted.append(rid)
        return True

    repairer = Repairer(rig.client, rig.membership, rig.leases, active_version=lambda: 0, admit=admit,
                        refit_lock=lock, catch_up_s=1)
    before = time.monotonic()
    assert repairer.repair() == ["r2"]
    seat = rig.membership.get("r2")
    assert seat.state is MemberState.MEMBER and seat.renewed_at >= before
    assert rig.client.replicas["r2"].lease == (rig.ledger.epoch, seat.generation)


def test_repair_catches_up_without_the_refit_lock_and_skips_a_version_that_moved(rig: Rig) -> None:
    """Loose end 5: repair held the refit lock for up to launch_s per excluded replica."""
    rig.txns.exclude("r1", "hung")
    lock = threading.Lock()
    held_during_catch_up: list[bool] = []
    rig.client.on_call["catch_up"] = lambda rids: held_during_catch_up.append(lock.locked())
    versions = iter([3, 4])  # a refit committed while r1 was catching up
    repairer = Repairer(rig.client, rig.membership, rig.leases, active_version=lambda: next(versions),
                        admit=lambda rid, v: rig.membership.admit(rid) > 0, refit_lock=lock, catch_up_s=1)
    assert repairer.repair() == []
    assert held_during_catch_up == [False]
    assert rig.membership.excluded() == ["r1"]  # tried again next round, at the new version


def test_a_failing_round_does_not_end_a_background_loop() -> None:
    """Loose end 5: one exception from repair ended the renewal thread with no trace."""
    stop = threading.Event()
    rounds: list[int] = []
    second = threading.Event()

    def body() -> None:
        rounds.append(1)
        if len(rounds) == 1:
            raise RuntimeError("one bad round")
        second.set()

    run_loop("test-loop", lambda: 0.001, body, stop)
    try:
        assert second.wait(10), "the loop stopped after its first failing round"
    finally:
        stop.set()


def test_a_replica_that_reports_it_cannot_serve_is_reported_once_renewed(rig: Rig) -> None:
    rig.client.replicas["r0"].state = "failed"
    rig.client.replicas["r0"].error = "ChecksumMismatch: w"
    rig.leases.renew_all()
    rig.leases.settle()
    assert rig.failed == [("r0", "ChecksumMismatch: w")]


def test_a_replica_still_holding_an_aborted_set_is_sent_the_abort_again(rig: Rig) -> None:
    """Found by the soak under Ray's RPC-loss injection: both ABORTs to a replica were lost, and
    it kept the aborted transaction's staged set until the next transaction."""
    rig.client.replicas["r2"].vote_no = "no"
    rig.client.lose("abort", "r0", times=2)
    res = rig.txns.run(rig.request())
    assert res.status == "aborted" and rig.client.replicas["r0"].staged  # r0 still holds it
    rig.leases.renew_all()
    rig.leases.settle()
    assert rig.client.calls[-1] == ("abort", ("r0",)) and not rig.client.replicas["r0"].staged


def test_wait_out_returns_only_after_the_last_lease_granted_lapsed(rig: Rig) -> None:
    rig.leases.grant("r0", rig.membership.get("r0").generation)
    granted = rig.membership.get("r0").renewed_at
    rig.leases.wait_out(["r0"])
    assert time.monotonic() >= granted + rig.leases.lease_s


# ----------------------------------------------------------------------------- membership


def test_membership_moves_follow_the_table_and_each_move_bumps_the_generation() -> None:
    m = Membership()
    g1 = m.admit("r0")
    g2 = m.exclude("r0", "hung")
    g3 = m.admit("r0")
    assert g1 < g2 < g3
    assert m.admit("r0") == g3  # re-admitting a member changes nothing
    assert m.exclude("r9", "excluded before a restart") is not None
    assert m.leave("r0") and not m.leave("r0")
    with pytest.raises(MembershipError, match="leaving -> member not allowed"):
        m.admit("r0")
    assert m.members() == [] and m.excluded() == ["r9"]


def test_a_renewal_is_recorded_only_under_the_generation_it_was_sent_with() -> None:
    m = Membership()
    g = m.admit("r0")
    assert m.renewed("r0", g, at=5.0) and m.get("r0").renewed_at == 5.0
    m.exclude("r0", "x")
    assert not m.renewed("r0", g, at=9.0) and m.get("r0").renewed_at == 5.0


def test_timeouts_give_a_refit_call_room_for_every_phase() -> None:
    """Fleet refit timeout: it was 2*prepare + commit + 2*activate + 60 = 210 s by default, shorter
    than persist_s (300 s), so a slow but legal persist surfaced as a raw GetTimeoutError."""
    t = Timeouts()
    assert t.refit_call_s() > t.persist_s + t.commit_s + t.activate_s + t.launch_s + t.lease_s
    slow_prepare = Timeouts(prepare_s=900)
    assert slow_prepare.refit_call_s() > 900 + slow_prepare.commit_s + slow_prepare.activate_s
    with pytest.raises(ValueError, match="launch_s"):
        Timeouts(launch_s=float("inf"))


def test_a_failed_call_is_retryable_unless_the_replica_is_gone() -> None:
    assert Failed(FailureKind.TIMEOUT, "x").retryable and Failed(FailureKind.UNAVAILABLE, "x").retryable
    assert not Failed(FailureKind.DEAD, "x").retryable and not Failed(FailureKind.UNKNOWN, "x").retryable


# ----------------------------------------------------------------------------- durability: replicated


def _settled(rig: Rig) -> None:
    deadline = time.monotonic() + 10
    while not rig.tracker.idle() and time.monotonic() < deadline:
        rig.tracker.wait(10**9, 0.05)
    assert rig.tracker.idle()


def test_under_replicated_durability_commit_does_not_wait_for_the_checkpoint(tmp_path: Path) -> None:
    rig = Rig(tmp_path, durability="replicated")
    rig.persister.hold = threading.Event()  # the write is slow: COMMIT must not wait for it
    res = rig.txns.run(rig.request(key="k-r"))
    assert not res.persisted
    assert res.status == "committed" and res.version == 1
    records = TxnLog.open(rig.settings.state_dir, readonly=True).records()
    assert [r.kind for r in records] == ["EPOCH", "BEGIN", "COMMIT", "ACTIVATED"]
    assert records[1].durability == "replicated"
    rig.persister.hold.set()
    _settled(rig)
    assert rig.kinds()[-1] == "PERSISTED" and rig.ledger.state.is_persisted(1)
    assert rig.ledger.history()[-1]["persisted"] is True


def test_a_checkpoint_write_that_fails_after_commit_is_redone_from_a_replica(tmp_path: Path) -> None:
    rig = Rig(tmp_path, durability="replicated")
    rig.persister.fail_next = ["persisting version 1 failed: disk full (ENOSPC) writing the checkpoint"]
    res = rig.txns.run(rig.request())
    assert res.status == "committed"
    _settled(rig)
    assert "export" in rig.client.methods()
    assert rig.persister.jobs[-1].refs and str(rig.persister.jobs[-1].refs[0]).startswith("exported-v1")
    assert rig.persister.jobs[-1].checksums == SUMS  # verified against the version's own checksums
    assert rig.ledger.state.is_persisted(1) and rig.tracker.summary()["failing"] == {}


def test_a_checkpoint_write_that_cannot_even_start_after_commit_is_redone_from_a_replica(
        tmp_path: Path) -> None:
    rig = Rig(tmp_path, durability="replicated")
    rig.persister.raise_on_start = [RuntimeError("no worker could be placed")]
    assert rig.txns.run(rig.request()).status == "committed"  # the write is not on the refit's path
    _settled(rig)
    assert "export" in rig.client.methods() and rig.ledger.state.is_persisted(1)


def test_the_newest_version_nobody_holds_any_more_is_reported_lost(tmp_path: Path) -> None:
    rig = Rig(tmp_path, durability="replicated")
    rig.persister.error = "the worker's node is gone"
    assert rig.txns.run(rig.request()).status == "committed"
    for r in rig.client.replicas.values():  # every holder restarted without it
        r.state, r.version = "failed", 0
    _settled(rig)
    assert [(v, "no replica holds it" in why) for _, v, why in rig.lost] == [(1, True)]
    assert not rig.ledger.state.is_persisted(1)


def _log_committed_not_persisted(state_dir: Path) -> None:
    with TxnLog.open(state_dir) as log:
        log.bump_epoch()
        log.append(BeginRecord(epoch=1, txn="t-rep", version=1, key="k-rep", checksums=SUMS,
                               durability="replicated"))
        log.append(CommitRecord(epoch=1, txn="t-rep", version=1))
        log.append(ActivatedRecord(epoch=1, txn="t-rep", version=1, duration_s=0.01))
        for rid in RIDS:
            log.append(MemberRecord(epoch=1, replica_id=rid, event="join"))


def test_recovery_writes_a_committed_unpersisted_version_from_a_replica_holding_it(tmp_path: Path) -> None:
    state = tmp_path / "state"
    _log_committed_not_persisted(state)
    rig = Rig(state, durability="replicated")
    for r in rig.client.replicas.values():
        r.version = 1
    assert rig.ledger.state.unpersisted == [("t-rep", 1)]
    persist_the_log(rig.ledger, rig.txns, rig.persister, persist_s=1, export=rig.tracker.export,
                    newest_stored=lambda below: pytest.fail("nothing was lost"))
    assert rig.ledger.state.unpersisted == [] and rig.persister.written == [1]
    assert rig.kinds()[-1] == "PERSISTED"


def test_recovery_replaces_a_version_every_holder_lost_with_a_new_one_carrying_stored_weights(
        tmp_path: Path) -> None:
    state = tmp_path / "state"
    _log_committed_not_persisted(state)
    rig = Rig(state, durability="replicated")
    for r in rig.client.replicas.values():  # restarted: v1 is in no store and no memory
        r.state, r.version = "failed", 0
    stored = {"w": "00000000000000b0"}
    persist_the_log(rig.ledger, rig.txns, rig.persister, persist_s=1, export=rig.tracker.export,
                    newest_stored=lambda below: (0, stored))
    s = rig.ledger.state
    assert s.active_version == 2 and s.versions[2].origin_version == 0 and s.versions[2].checksums == stored
    assert rig.persister.jobs[-1].from_version == 0 and rig.persister.jobs[-1].version == 2
    [row] = [h for h in rig.ledger.history() if h["version"] == 1]
    assert row["lost"] and "replaced by v2" in row["lost"] and "lost before" in row["lost"]
    assert {r.version for r in rig.client.replicas.values()} == {2}  # caught up from the store


# ----------------------------------------------------------------------------- history-independent cost


def test_the_log_and_the_coordinators_memory_stay_bounded_by_the_history_window(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.settings = rig.settings.model_copy(update={"history_window": 10})
    rig.txns._s = rig.settings
    for i in range(60):
        assert rig.txns.run(rig.request(key=f"k{i}")).status == "committed"
    assert rig.ledger.state.transactions <= 2 * 10 + 1
    lines = (tmp_path / "txn.log").read_bytes().count(b"\n")
    assert lines < 4 * (2 * 10 + 1) + 10  # at most a window's records and a few, not 60 refits' 180
    archived = (tmp_path / "txn.archive.jsonl").read_bytes().count(b"\n")
    assert archived >= 3 * (60 - 2 * 10 - 1)  # nothing is thrown away: it is archived
    on_disk = TxnLog.open(tmp_path, readonly=True).state()
    assert on_disk.active_version == rig.ledger.state.active_version == 60
    assert rig.txns.outcome("k59").status == "committed" and rig.txns.outcome("k0") is None
    assert rig.txns.run(rig.request(key="k61")).version == 61  # versions keep growing
