"""Pure-logic tests of the two-phase-commit state machines (no Ray, no engine).

``actors/replica_protocol.py``: transitions (table-driven over every pair), epoch fencing,
idempotent COMMIT/ABORT/ACTIVATE, PREPARE-after-ABORT, ``committed_at_least``, the ``remember``
bound. ``actors/coordinator_protocol.py``: ``tally`` under both policies (exhaustive over small vote
counts), ``CoordinatorTxn.move`` (table-driven), ``default_rollback_target`` walking back through
origins.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest

from actors.coordinator_protocol import (
    PHASE_TRANSITIONS,
    CoordinatorTxn,
    Decision,
    Phase,
    PhaseError,
    Vote,
    default_rollback_target,
    tally,
)
from actors.replica_protocol import (
    DECIDED,
    TRANSITIONS,
    NodeDuty,
    ProtocolViolation,
    ReplicaParticipant,
    StaleEpoch,
    TxnRecord,
    TxnState,
)

S = TxnState
ALL_STATES: list[TxnState | None] = [None, *TxnState]
TXN = "t1"
EPOCH = 3
VERSION = 7


# ----------------------------------------------------------------------------- helpers


def participant_in(state: TxnState | None, *, txn: str = TXN, epoch: int = EPOCH, version: int = VERSION,
                   remember: int = 1024) -> ReplicaParticipant:
    """A participant holding ``txn`` in ``state``, reached only through the public API."""
    p = ReplicaParticipant(remember=remember)
    if state is None:
        return p
    if state is S.ABORTED:
        p.begin_prepare(epoch, txn, version)
        p.abort(epoch, txn, "setup")
    elif state is S.SUPERSEDED:
        p.begin_prepare(epoch, txn, version)
        p.supersede(txn, "setup")
    else:
        p.begin_prepare(epoch, txn, version)
        if state is S.REFUSED:
            assert p.finish_prepare(txn, False, "setup NO") is False
        elif state is not S.PREPARING:
            assert p.finish_prepare(txn, True) is True
            if state in (S.COMMITTED, S.ACTIVE):
                p.commit(epoch, txn)
            if state is S.ACTIVE:
                p.activate(epoch, txn)
    rec = p.get(txn)
    assert rec is not None and rec.state is state
    return p


def state_of(p: ReplicaParticipant, txn: str = TXN) -> TxnState | None:
    rec = p.get(txn)
    return rec.state if rec is not None else None


# The message that tries to move TXN into each state.
MESSAGE: dict[TxnState, Callable[[ReplicaParticipant], object]] = {
    S.PREPARING: lambda p: p.begin_prepare(EPOCH, TXN, VERSION),
    S.PREPARED: lambda p: p.finish_prepare(TXN, True),
    S.REFUSED: lambda p: p.finish_prepare(TXN, False, "NO"),
    S.COMMITTED: lambda p: p.commit(EPOCH, TXN),
    S.ACTIVE: lambda p: p.activate(EPOCH, TXN),
    S.ABORTED: lambda p: p.abort(EPOCH, TXN, "abort"),
    S.SUPERSEDED: lambda p: p.supersede(TXN, "caught up"),
}

# Repeating a decision that already took effect is a no-op (COMMIT on ACTIVE included: the commit
# took effect before the activation).
IDEMPOTENT_NOOP = {(S.COMMITTED, S.COMMITTED), (S.ACTIVE, S.COMMITTED), (S.ACTIVE, S.ACTIVE),
                   (S.ABORTED, S.ABORTED), (S.SUPERSEDED, S.SUPERSEDED)}
# finish_prepare after an abort or a catch-up reports False (the actor discards what it staged).
VOTE_AFTER_ABORT = {(S.ABORTED, S.PREPARED), (S.ABORTED, S.REFUSED), (S.SUPERSEDED, S.PREPARED),
                    (S.SUPERSEDED, S.REFUSED)}


def _pair_id(pair: tuple[TxnState | None, TxnState]) -> str:
    old, new = pair
    return f"{old.value if old else 'unknown'}->{new.value}"


ALL_PAIRS = list(itertools.product(ALL_STATES, TxnState))


# ----------------------------------------------------------------------------- transition table


def test_transition_table_covers_every_state():
    assert set(TRANSITIONS) == set(ALL_STATES)
    for targets in TRANSITIONS.values():
        assert targets <= set(TxnState)
    # terminal states
    assert TRANSITIONS[S.ACTIVE] == frozenset()
    assert TRANSITIONS[S.ABORTED] == frozenset()
    assert TRANSITIONS[S.SUPERSEDED] == frozenset()
    # a commit is never undone: COMMITTED only goes live, or is passed by a catch-up; and nothing
    # goes back to PREPARING
    assert TRANSITIONS[S.COMMITTED] == frozenset({S.ACTIVE, S.SUPERSEDED})
    assert S.ABORTED not in TRANSITIONS[S.COMMITTED]
    assert all(S.PREPARING not in t for old, t in TRANSITIONS.items() if old is not None)
    assert frozenset({S.COMMITTED, S.ACTIVE, S.ABORTED, S.SUPERSEDED}) == DECIDED


@pytest.mark.parametrize("pair", ALL_PAIRS, ids=[_pair_id(p) for p in ALL_PAIRS])
def test_move_gate_matches_table(pair):
    """``_move`` (the gate every message goes through) allows exactly the pairs in TRANSITIONS."""
    old, new = pair
    p = ReplicaParticipant()
    rec = None if old is None else TxnRecord(TXN, EPOCH, VERSION, old)
    if new in TRANSITIONS[old]:
        p._move(rec, TXN, new)  # does not raise
    else:
        with pytest.raises(ProtocolViolation, match="not allowed"):
            p._move(rec, TXN, new)


def _api_pair_param(pair):
    return pytest.param(pair, id=_pair_id(pair))


@pytest.mark.parametrize("pair", [_api_pair_param(p) for p in ALL_PAIRS])
def test_message_transitions_follow_table(pair):
    """Every (state, message) pair through the public API: allowed pairs move, the documented
    idempotent repeats are no-ops, everything else raises ProtocolViolation and changes nothing."""
    old, new = pair
    p = participant_in(old)
    send = MESSAGE[new]
    if new in TRANSITIONS[old]:
        result = send(p)
        assert state_of(p) is new
        if new in (S.COMMITTED, S.ACTIVE):
            assert result[1] is True  # changed
        if new is S.PREPARED:
            assert result is True
        if new is S.REFUSED:
            assert result is False
            assert p.get(TXN).reason == "NO"
        if new is S.ABORTED and old is not None:
            assert result[1] is True
            assert p.get(TXN).reason == "abort"
        if new is S.SUPERSEDED:
            assert result[1] is True
            assert p.get(TXN).reason == "caught up"
    elif pair in IDEMPOTENT_NOOP:
        rec, changed = send(p)
        assert changed is False
        assert rec.state is old
        assert state_of(p) is old
    elif pair in VOTE_AFTER_ABORT:
        assert send(p) is False
        assert state_of(p) is old
    elif old is None and new in (S.PREPARED, S.REFUSED):
        assert send(p) is False  # a vote for a forgotten txn: discard what was staged
        assert state_of(p) is None
    else:
        before = p.get(TXN)
        before_state = before.state if before else None
        with pytest.raises(ProtocolViolation):
            send(p)
        assert state_of(p) is before_state


def test_every_state_is_reachable_and_moves_are_consistent():
    """Walk the happy path and the abort paths end to end."""
    p = ReplicaParticipant()
    assert p.begin_prepare(1, "a", 1) == []
    assert state_of(p, "a") is S.PREPARING
    assert p.finish_prepare("a", True) is True
    assert [r.txn for r in p.pending()] == ["a"]
    rec, changed = p.commit(1, "a")
    assert changed and rec.state is S.COMMITTED
    assert [r.txn for r in p.pending()] == ["a"]
    rec, changed = p.activate(1, "a")
    assert changed and rec.state is S.ACTIVE
    assert p.pending() == []

    p.begin_prepare(1, "b", 2)
    assert p.finish_prepare("b", False, "checksum mismatch") is False
    assert p.get("b").reason == "checksum mismatch"
    assert p.pending() == []
    rec, changed = p.abort(1, "b", "NO vote")
    assert changed and rec.state is S.ABORTED and rec.reason == "NO vote"


# ----------------------------------------------------------------------------- epoch fencing


def _stale_calls(txn: str) -> dict[str, Callable[[ReplicaParticipant], object]]:
    return {
        "prepare": lambda p: p.begin_prepare(4, "fresh", 99),
        "commit": lambda p: p.commit(4, txn),
        "abort": lambda p: p.abort(4, txn, "late"),
        "activate": lambda p: p.activate(4, txn),
    }


@pytest.mark.parametrize("message", ["prepare", "commit", "abort", "activate"])
@pytest.mark.parametrize("state", [S.PREPARING, S.PREPARED, S.COMMITTED])
def test_older_epoch_is_refused(message, state):
    p = participant_in(state, epoch=5)
    assert p.epoch == 5
    with pytest.raises(StaleEpoch, match="epoch 4"):
        _stale_calls(TXN)[message](p)
    assert state_of(p) is state  # nothing changed
    assert p.get("fresh") is None  # a stale PREPARE records nothing
    assert p.epoch == 5


def test_stale_epoch_is_a_protocol_violation():
    assert issubclass(StaleEpoch, ProtocolViolation)
    p = ReplicaParticipant()
    p.check_epoch(2)
    with pytest.raises(ProtocolViolation):
        p.check_epoch(1)


def test_epoch_only_grows_and_same_epoch_drops_nothing():
    p = ReplicaParticipant()
    assert p.epoch == 0
    p.begin_prepare(2, "a", 1)
    assert p.epoch == 2
    assert p.check_epoch(2) == []
    assert state_of(p, "a") is S.PREPARING
    p.check_epoch(9)
    assert p.epoch == 9
    with pytest.raises(StaleEpoch):
        p.check_epoch(8)
    assert p.epoch == 9


def _mixed_fleet_of_txns() -> ReplicaParticipant:
    """epoch 1: preparing, prepared, refused, committed, active, aborted."""
    p = ReplicaParticipant()
    p.begin_prepare(1, "preparing", 1)
    p.begin_prepare(1, "prepared", 2)
    p.finish_prepare("prepared", True)
    p.begin_prepare(1, "refused", 3)
    p.finish_prepare("refused", False, "bad bytes")
    p.begin_prepare(1, "committed", 4)
    p.finish_prepare("committed", True)
    p.commit(1, "committed")
    p.begin_prepare(1, "active", 5)
    p.finish_prepare("active", True)
    p.commit(1, "active")
    p.activate(1, "active")
    p.begin_prepare(1, "aborted", 6)
    p.abort(1, "aborted", "told to")
    return p


def test_newer_epoch_drops_undecided_older_txns_and_returns_them():
    p = _mixed_fleet_of_txns()
    dropped = p.check_epoch(2)
    assert sorted(r.txn for r in dropped) == ["prepared", "preparing", "refused"]
    for r in dropped:
        assert r.state is S.ABORTED
        assert "epoch 2" in r.reason
        assert p.get(r.txn) is r
    assert state_of(p, "committed") is S.COMMITTED  # never dropped: the decision was COMMIT
    assert state_of(p, "active") is S.ACTIVE
    assert state_of(p, "aborted") is S.ABORTED
    assert p.get("aborted").reason == "told to"  # not re-dropped
    assert [r.txn for r in p.pending()] == ["committed"]
    # a second look at the same epoch drops nothing more
    assert p.check_epoch(2) == []
    # a dropped PREPARED can no longer be committed
    with pytest.raises(ProtocolViolation):
        p.commit(2, "preparing")


def test_newer_epoch_keeps_the_txn_named_by_keep():
    p = _mixed_fleet_of_txns()
    dropped = p.check_epoch(2, keep="prepared")
    assert sorted(r.txn for r in dropped) == ["preparing", "refused"]
    assert state_of(p, "prepared") is S.PREPARED


def test_commit_from_a_new_epoch_keeps_its_own_txn_and_drops_the_others():
    """A recovering coordinator (new epoch) finishing a logged COMMIT."""
    p = _mixed_fleet_of_txns()
    rec, changed = p.commit(2, "prepared")
    assert changed and rec.state is S.COMMITTED
    assert state_of(p, "preparing") is S.ABORTED
    assert p.epoch == 2


def test_activate_from_a_new_epoch_keeps_its_own_txn():
    p = _mixed_fleet_of_txns()
    rec, changed = p.activate(3, "committed")
    assert changed and rec.state is S.ACTIVE
    assert state_of(p, "prepared") is S.ABORTED
    assert p.epoch == 3


def test_prepare_in_a_new_epoch_returns_what_it_dropped():
    p = _mixed_fleet_of_txns()
    dropped = p.begin_prepare(2, "new", 10)
    assert sorted(r.txn for r in dropped) == ["prepared", "preparing", "refused"]
    assert state_of(p, "new") is S.PREPARING
    assert p.get("new").epoch == 2


def test_newer_epoch_does_not_drop_txns_of_its_own_epoch():
    p = ReplicaParticipant()
    p.begin_prepare(1, "old", 1)
    p.begin_prepare(2, "cur", 2)  # drops "old"
    assert state_of(p, "old") is S.ABORTED
    assert p.check_epoch(2) == []
    assert state_of(p, "cur") is S.PREPARING


def test_finish_prepare_after_an_epoch_drop_reports_false():
    p = ReplicaParticipant()
    p.begin_prepare(1, "a", 1)
    p.check_epoch(2)
    assert p.finish_prepare("a", True) is False
    assert state_of(p, "a") is S.ABORTED


def test_local_activation_without_epoch_skips_fencing():
    """activate(None, ...) is the replica's own early activation for a client's min_version."""
    p = participant_in(S.COMMITTED, epoch=1)
    p.check_epoch(5)
    rec, changed = p.activate(None, TXN)
    assert changed and rec.state is S.ACTIVE
    assert p.epoch == 5
    # the coordinator's ACTIVATE that follows is a no-op
    rec, changed = p.activate(5, TXN)
    assert not changed and rec.state is S.ACTIVE


# ----------------------------------------------------------------------------- idempotence


def test_commit_is_idempotent():
    p = participant_in(S.PREPARED)
    rec1, changed1 = p.commit(EPOCH, TXN)
    rec2, changed2 = p.commit(EPOCH, TXN)
    assert (changed1, changed2) == (True, False)
    assert rec1 is rec2 and rec2.state is S.COMMITTED


def test_commit_after_activate_is_a_noop():
    p = participant_in(S.ACTIVE)
    rec, changed = p.commit(EPOCH, TXN)
    assert changed is False and rec.state is S.ACTIVE


def test_activate_is_idempotent():
    p = participant_in(S.COMMITTED)
    assert p.activate(EPOCH, TXN)[1] is True
    rec, changed = p.activate(EPOCH, TXN)
    assert changed is False and rec.state is S.ACTIVE


@pytest.mark.parametrize("state", [S.PREPARING, S.PREPARED, S.REFUSED])
def test_abort_is_idempotent(state):
    p = participant_in(state)
    rec1, changed1 = p.abort(EPOCH, TXN, "first")
    rec2, changed2 = p.abort(EPOCH, TXN, "second")
    assert (changed1, changed2) == (True, False)
    assert rec1 is rec2 and rec2.state is S.ABORTED
    assert rec2.reason == "first"  # the repeat changes nothing, not even the reason


@pytest.mark.parametrize("state", [S.COMMITTED, S.ACTIVE])
def test_abort_after_commit_is_refused(state):
    p = participant_in(state)
    with pytest.raises(ProtocolViolation):
        p.abort(EPOCH, TXN, "too late")
    assert state_of(p) is state


def test_commit_and_activate_of_unknown_txn_are_refused():
    p = ReplicaParticipant()
    with pytest.raises(ProtocolViolation, match="never prepared"):
        p.commit(1, "ghost")
    with pytest.raises(ProtocolViolation, match="never prepared"):
        p.activate(1, "ghost")
    assert p.get("ghost") is None


# ----------------------------------------------------------------------------- abort before prepare


def test_abort_of_unknown_txn_is_remembered_and_refuses_a_late_prepare():
    p = ReplicaParticipant()
    rec, changed = p.abort(2, "late", "coordinator gave up")
    assert changed is False
    assert rec.state is S.ABORTED and rec.epoch == 2 and rec.reason == "coordinator gave up"
    with pytest.raises(ProtocolViolation, match="PREPARE refused"):
        p.begin_prepare(2, "late", 5)
    assert state_of(p, "late") is S.ABORTED
    assert p.pending() == []
    # and a second ABORT is still a no-op
    assert p.abort(2, "late")[1] is False


@pytest.mark.parametrize("state", [S.PREPARING, S.PREPARED, S.REFUSED, S.COMMITTED, S.ACTIVE, S.ABORTED])
def test_prepare_of_a_known_txn_is_refused(state):
    p = participant_in(state)
    with pytest.raises(ProtocolViolation, match="PREPARE refused"):
        p.begin_prepare(EPOCH, TXN, VERSION)
    assert state_of(p) is state


@pytest.mark.parametrize("ok", [True, False])
def test_finish_prepare_after_abort_returns_false(ok):
    p = participant_in(S.PREPARING)
    p.abort(EPOCH, TXN, "aborted while staging")
    assert p.finish_prepare(TXN, ok, "whatever") is False
    rec = p.get(TXN)
    assert rec.state is S.ABORTED and rec.reason == "aborted while staging"
    assert p.pending() == []


# ----------------------------------------------------------------------------- queries


def test_committed_at_least_picks_the_highest_committed_version():
    p = ReplicaParticipant()
    for txn, version in [("c7", 7), ("c3", 3), ("c5", 5)]:  # not in version order
        p.begin_prepare(1, txn, version)
        p.finish_prepare(txn, True)
        p.commit(1, txn)
    p.begin_prepare(1, "a9", 9)
    p.finish_prepare("a9", True)
    p.commit(1, "a9")
    p.activate(1, "a9")  # active: not "committed-not-active"
    p.begin_prepare(1, "p10", 10)
    p.finish_prepare("p10", True)  # only prepared
    p.abort(1, "x11")  # aborted
    assert p.committed_at_least(0).txn == "c7"
    assert p.committed_at_least(4).txn == "c7"
    assert p.committed_at_least(7).txn == "c7"
    assert p.committed_at_least(8) is None
    assert p.committed_at_least(10) is None
    assert p.committed_at_least(11) is None
    p.activate(1, "c7")
    assert p.committed_at_least(4).txn == "c5"
    assert p.committed_at_least(6) is None


def test_committed_at_least_on_empty_participant():
    assert ReplicaParticipant().committed_at_least(0) is None


def test_pending_lists_prepared_and_committed_only():
    p = _mixed_fleet_of_txns()
    assert sorted(r.txn for r in p.pending()) == ["committed", "prepared"]


# ----------------------------------------------------------------------------- remember bound


def test_remember_bound_forgets_oldest_decisions():
    p = ReplicaParticipant(remember=3)
    for i in range(6):
        p.abort(1, f"a{i}")
    assert [p.get(f"a{i}") is not None for i in range(6)] == [False] * 3 + [True] * 3
    # a forgotten abort no longer blocks a PREPARE: that is the price of the bound
    p.begin_prepare(1, "a0", 1)
    assert state_of(p, "a0") is S.PREPARING


def test_remember_bound_never_forgets_undecided_txns():
    p = ReplicaParticipant(remember=2)
    p.begin_prepare(1, "preparing", 1)
    p.begin_prepare(1, "prepared", 2)
    p.finish_prepare("prepared", True)
    p.begin_prepare(1, "refused", 3)
    p.finish_prepare("refused", False, "NO")
    for i in range(10):
        p.abort(1, f"a{i}")
    assert state_of(p, "preparing") is S.PREPARING
    assert state_of(p, "prepared") is S.PREPARED
    assert state_of(p, "refused") is S.REFUSED
    # once they are decided, the bound applies again
    p.abort(1, "preparing")
    p.abort(1, "prepared")
    p.abort(1, "refused")
    p.abort(1, "last")
    remembered = [t for t in ["preparing", "prepared", "refused", *(f"a{i}" for i in range(10)), "last"]
                  if p.get(t) is not None]
    assert len(remembered) == 2
    assert "last" in remembered


def test_remember_bound_trims_only_when_exceeded():
    p = ReplicaParticipant(remember=4)
    for i in range(4):
        p.abort(1, f"a{i}")
    assert all(p.get(f"a{i}") is not None for i in range(4))
    p.abort(1, "a4")
    assert p.get("a0") is None
    assert all(p.get(f"a{i}") is not None for i in range(1, 5))


def test_remember_bound_survives_a_refused_txn_orphaned_by_a_coordinator_crash():
    p = ReplicaParticipant(remember=2)
    p.begin_prepare(1, "orphan", 1)
    p.finish_prepare("orphan", False, "bad checksum")
    # the coordinator of epoch 1 dies before sending ABORT; epoch 2 takes over
    p.check_epoch(2)
    for i in range(10):
        p.abort(2, f"a{i}")
    assert p.get("a0") is None  # the bound still applies


def test_remember_bound_keeps_committed_not_active_txn():
    p = participant_in(S.COMMITTED, remember=1)
    p.abort(EPOCH, "other")  # one more decided record: the bound is exceeded
    assert state_of(p) is S.COMMITTED
    rec, changed = p.activate(EPOCH, TXN)
    assert changed and rec.state is S.ACTIVE


def test_finish_prepare_after_a_trimmed_abort_returns_false():
    p = ReplicaParticipant(remember=1)
    p.begin_prepare(1, "a", 1)
    p.abort(1, "a", "gave up")
    p.abort(1, "b")  # pushes "a" out of the remembered window
    assert p.finish_prepare("a", True) is False


# ----------------------------------------------------------------------------- tally


def _votes(yes: int, no: int) -> dict[str, Vote]:
    votes = {f"y{i}": Vote(f"y{i}", True) for i in range(yes)}
    votes.update({f"n{i}": Vote(f"n{i}", False, f"reason-{i}") for i in range(no)})
    return votes


CASES = list(itertools.product(["strict", "exclude"], range(4), range(4), range(4)))


@pytest.mark.parametrize(("policy", "n_yes", "n_no", "max_exclude"), CASES)
def test_tally_exhaustive(policy, n_yes, n_no, max_exclude):
    votes = _votes(n_yes, n_no)
    d = tally(votes, policy=policy, max_exclude=max_exclude)
    assert isinstance(d, Decision)
    yes = sorted(r for r in votes if r.startswith("y"))
    no = sorted(r for r in votes if r.startswith("n"))
    may_exclude = policy == "exclude" and n_no <= max_exclude and n_yes >= 1
    should_commit = bool(votes) and (n_no == 0 or may_exclude)
    assert d.commit is should_commit
    if d.commit:
        assert d.excluded == no  # every NO voter is excluded; the YES voters commit
        assert yes and set(yes).isdisjoint(d.excluded)
    else:
        assert d.excluded == []
    # every NO reason is listed, whichever way it went
    for i in range(n_no):
        assert f"n{i}: reason-{i}" in d.reason


@pytest.mark.parametrize("policy", ["strict", "exclude"])
def test_tally_no_votes_aborts(policy):
    d = tally({}, policy=policy, max_exclude=5)
    assert d.commit is False and d.excluded == []
    assert "no members" in d.reason


@pytest.mark.parametrize("policy", ["strict", "exclude"])
def test_tally_all_yes_commits(policy):
    d = tally({"b": Vote("b", True), "a": Vote("a", True)}, policy=policy, max_exclude=0)
    assert d == Decision(True, [], "all members voted YES")


def test_tally_strict_any_no_aborts_with_reasons():
    votes = {"r0": Vote("r0", True), "r1": Vote("r1", False, "timeout after 30s"),
             "r2": Vote("r2", False, "checksum mismatch on w")}
    d = tally(votes, policy="strict", max_exclude=10)
    assert d.commit is False
    assert d.excluded == []
    assert "2 NO vote(s)" in d.reason
    assert "r1: timeout after 30s" in d.reason
    assert "r2: checksum mismatch on w" in d.reason
    assert "r0" not in d.reason


def test_tally_exclude_within_bound_commits_among_the_rest():
    votes = {"r0": Vote("r0", True), "r1": Vote("r1", False, "timeout"), "r2": Vote("r2", True)}
    d = tally(votes, policy="exclude", max_exclude=1)
    assert d.commit is True
    assert d.excluded == ["r1"]
    assert "excluding 1" in d.reason and "r1: timeout" in d.reason


def test_tally_exclude_over_bound_aborts():
    votes = {"r0": Vote("r0", True), "r1": Vote("r1", False, "a"), "r2": Vote("r2", False, "b")}
    d = tally(votes, policy="exclude", max_exclude=1)
    assert d.commit is False and d.excluded == []
    assert "r1: a" in d.reason and "r2: b" in d.reason


def test_tally_exclude_needs_one_yes():
    votes = {"r0": Vote("r0", False, "x"), "r1": Vote("r1", False, "y")}
    d = tally(votes, policy="exclude", max_exclude=5)
    assert d.commit is False and d.excluded == []


def test_tally_exclude_with_zero_max_exclude_is_strict():
    votes = {"r0": Vote("r0", True), "r1": Vote("r1", False, "x")}
    assert tally(votes, policy="exclude", max_exclude=0).commit is False


# ----------------------------------------------------------------------------- coordinator phases


PHASE_PAIRS = list(itertools.product(Phase, Phase))


def _txn(phase: Phase = Phase.BEGUN) -> CoordinatorTxn:
    return CoordinatorTxn(txn="t", epoch=1, version=3, key=None, members=["r0", "r1"], phase=phase)


def test_phase_table_covers_every_phase():
    assert set(PHASE_TRANSITIONS) == set(Phase)
    assert PHASE_TRANSITIONS[Phase.DONE] == frozenset()
    assert PHASE_TRANSITIONS[Phase.ABORTED] == frozenset()
    # after the commit point there is no way to abort
    for p in (Phase.COMMITTING, Phase.ACTIVATING, Phase.DONE):
        assert Phase.ABORTED not in PHASE_TRANSITIONS[p]
    # the commit point is reached only from PREPARING: votes were collected
    assert [p for p, t in PHASE_TRANSITIONS.items() if Phase.COMMITTING in t] == [Phase.PREPARING]


@pytest.mark.parametrize("pair", PHASE_PAIRS, ids=[f"{a.value}->{b.value}" for a, b in PHASE_PAIRS])
def test_coordinator_move_follows_table(pair):
    old, new = pair
    t = _txn(old)
    if new in PHASE_TRANSITIONS[old]:
        t.move(new)
        assert t.phase is new
    else:
        with pytest.raises(PhaseError, match="not allowed"):
            t.move(new)
        assert t.phase is old


def test_coordinator_txn_happy_and_abort_paths():
    t = _txn()
    assert t.phase is Phase.BEGUN and not t.committed
    for p in (Phase.PREPARING, Phase.COMMITTING, Phase.ACTIVATING, Phase.DONE):
        t.move(p)
        assert t.committed is (p is not Phase.PREPARING)
    assert t.phase is Phase.DONE
    a = _txn()
    a.move(Phase.PREPARING)
    a.move(Phase.ABORTED)
    with pytest.raises(PhaseError):
        a.move(Phase.COMMITTING)
    # defaults are per instance
    a.votes["r0"] = Vote("r0", True)
    a.commit_acks.add("r0")
    assert t.votes == {} and t.commit_acks == set() and t.activated == set()


def test_progress_reports_the_phase_votes_and_acks_as_they_are():
    t = _txn()
    t.move(Phase.PREPARING)
    t.votes["r0"] = Vote("r0", True)
    t.votes["r1"] = Vote("r1", False, "timeout")
    t.move(Phase.COMMITTING)
    t.commit_acks.add("r0")
    p = t.progress()
    assert p["phase"] == "committing" and p["votes"] == {"r0": "YES", "r1": "NO"}
    assert p["committed"] == ["r0"] and p["activated"] == []


# ----------------------------------------------------------------------------- rollback target


def test_rollback_target_walks_back_through_origins():
    origins = {1: 1, 2: 2, 3: 3}
    committed = [1, 2, 3]
    assert default_rollback_target(3, origins, committed) == 2
    # v4 = rollback to 2: its origin is 2's origin
    origins[4] = origins[2]
    committed.append(4)
    assert default_rollback_target(4, origins, committed) == 1  # not 3: no bouncing
    # v5 = rollback to 1
    origins[5] = origins[1]
    committed.append(5)
    assert default_rollback_target(5, origins, committed) is None  # nothing older than 1


def test_rollback_target_reaches_base_version_zero():
    committed = [0, 1, 2, 3]
    origins = {1: 1, 2: 2, 3: 3}
    target = default_rollback_target(1, origins, committed)
    assert target == 0 and target is not None
    # a rollback whose origin is 1 also lands on 0
    origins[4] = 1
    assert default_rollback_target(4, origins, [*committed, 4]) == 0
    # from the base itself (or a rollback to it) there is nowhere older
    assert default_rollback_target(0, origins, committed) is None
    origins[5] = 0
    assert default_rollback_target(5, origins, [*committed, 4, 5]) is None


def test_rollback_target_missing_origin_is_the_version_itself_and_order_does_not_matter():
    assert default_rollback_target(3, {}, [3, 0, 2, 1]) == 2
    assert default_rollback_target(3, {}, []) is None
    # gaps (aborted versions leave holes) are skipped
    assert default_rollback_target(9, {}, [0, 2, 5, 9]) == 5


def test_repeated_default_rollbacks_walk_all_the_way_back():
    """Simulate the coordinator: each rollback is a new version whose origin is its target's."""
    committed = [0, 1, 2, 3]
    origins = {v: v for v in committed}
    active = 3
    targets = []
    while (to := default_rollback_target(active, origins, committed)) is not None:
        targets.append(to)
        assert len(targets) <= 4, f"rollbacks do not terminate: {targets}"
        new = max(committed) + 1
        origins[new] = origins.get(to, to)
        committed.append(new)
        active = new
    assert targets == [2, 1, 0]


def test_one_member_per_node_checks_its_copy_and_hashes_it_unless_the_caller_hashed_that_copy():
    named = {"node-a": "r0", "node-b": "r2"}
    assert NodeDuty.of(named, None, "node-a", "r0") == NodeDuty(designated=True, hash=True)
    assert NodeDuty.of(named, None, "node-a", "r1") == NodeDuty(designated=False, hash=False)
    # the caller took the checksums of node-a's copy: its member still runs the probes, unhashed
    assert NodeDuty.of(named, "node-a", "node-a", "r0") == NodeDuty(designated=True, hash=False)
    assert NodeDuty.of(named, "node-a", "node-b", "r2") == NodeDuty(designated=True, hash=True)
    # a node nobody was named for (or no names at all): each member checks its own copy
    assert NodeDuty.of(named, None, "node-c", "r5") == NodeDuty(designated=True, hash=True)
    assert NodeDuty.of(None, None, "node-a", "r1") == NodeDuty(designated=True, hash=True)
    assert NodeDuty.of(None, "node-a", "node-a", "r1") == NodeDuty(designated=True, hash=False)


def test_a_member_named_for_a_node_it_is_not_on_must_refuse():
    duty = NodeDuty.of({"node-a": "r0"}, "node-b", "node-b", "r0")
    assert duty.refused == "replica r0 was named the verifier of node node-a but runs on node-b"
    assert not duty.designated and not duty.hash
