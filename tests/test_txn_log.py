from __future__ import annotations

import errno
import fcntl
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from actors import failpoints
from actors import log as logmod
from actors.durable import describe_os_error
from actors.failpoints import Failpoints
from actors.log import (
    AbortRecord,
    ActivatedRecord,
    BeginRecord,
    CommitRecord,
    CutTail,
    EpochRecord,
    LogCorrupted,
    LogRecord,
    LogState,
    MemberRecord,
    StaleEpoch,
    TxnLog,
    replay,
)
from engines.checksum import set_digest

CS1 = {"w": "00000000000000a1", "b": "00000000000000b1"}
CS2 = {"w": "00000000000000a2", "b": "00000000000000b1"}
BIG = {f"layer.{i}.weight": f"{i:016x}" for i in range(200)}  # a ~8 KiB line: more than a page


def begin(epoch: int, txn: str, version: int, **kw: object) -> BeginRecord:
    return BeginRecord(epoch=epoch, txn=txn, version=version, checksums=kw.pop("checksums", CS1), **kw)


def test_append_and_replay_round_trip(tmp_path: Path) -> None:
    log = TxnLog.open(tmp_path / "state")
    assert (tmp_path / "state" / "txn.log").is_file()
    assert log.records() == []
    assert log.bump_epoch() == 1
    recs = [
        begin(1, "t1", 1, key="k1"),
        CommitRecord(epoch=1, txn="t1", version=1),
        ActivatedRecord(epoch=1, txn="t1", version=1, duration_s=0.25),
        MemberRecord(epoch=1, replica_id="r0", event="join"),
        AbortRecord(epoch=1, txn="t0", reason="r0 voted NO", votes={"r0": "NO: bad dtype"}),
    ]
    for r in recs:
        log.append(r)
    got = TxnLog.open(tmp_path / "state").records()
    assert got == [EpochRecord(epoch=1, ts=got[0].ts), *recs]
    assert isinstance(got[1], BeginRecord)
    assert got[1].digest == set_digest(CS1)
    assert (tmp_path / "state" / "txn.log").read_text().count("\n") == 6


def test_commit_and_epoch_require_fsync(tmp_path: Path) -> None:
    log = TxnLog.open(tmp_path)
    log.bump_epoch()
    log.append(begin(1, "t1", 1), fsync=False)
    with pytest.raises(ValueError, match="COMMIT records are always fsync"):
        log.append(CommitRecord(epoch=1, txn="t1", version=1), fsync=False)
    with pytest.raises(ValueError, match="EPOCH records are always fsync"):
        log.append(EpochRecord(epoch=2), fsync=False)
    with pytest.raises(ValueError, match="ABORT records are always fsync"):
        log.append(AbortRecord(epoch=1, txn="t1", reason="NO"), fsync=False)
    with pytest.raises(ValueError, match="MEMBER exclude records are always fsync"):
        log.append(MemberRecord(epoch=1, replica_id="r0", event="exclude"), fsync=False)
    log.append(MemberRecord(epoch=1, replica_id="r0", event="leave"), fsync=False)
    assert [r.kind for r in log.records()] == ["EPOCH", "BEGIN", "MEMBER"]


def test_fsync_path_syncs_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = logmod._fdatasync

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(logmod, "_fdatasync", counting)
    log = TxnLog.open(tmp_path)
    log.bump_epoch()
    assert len(calls) == 1
    log.append(begin(1, "t1", 1), fsync=False)
    assert len(calls) == 1
    log.append(CommitRecord(epoch=1, txn="t1", version=1), fsync=True)
    assert len(calls) == 2
    assert [r.kind for r in TxnLog.open(tmp_path).records()] == ["EPOCH", "BEGIN", "COMMIT"]

    # fsync=None (the default) follows the record kind's policy; True forces a sync for any kind.
    policy = [
        (begin(1, "t2", 2), 0),
        (AbortRecord(epoch=1, txn="t2", reason="NO"), 1),
        (begin(1, "t3", 3), 0),
        (CommitRecord(epoch=1, txn="t3", version=3), 1),
        (ActivatedRecord(epoch=1, txn="t3", version=3, duration_s=0.1), 0),
        (MemberRecord(epoch=1, replica_id="r0", event="join"), 0),
        (MemberRecord(epoch=1, replica_id="r0", event="leave"), 0),
        (MemberRecord(epoch=1, replica_id="r0", event="exclude"), 1),
    ]
    for record, syncs in policy:
        before = len(calls)
        log.append(record)
        assert len(calls) - before == syncs, record.kind
    before = len(calls)
    log.append(begin(1, "t4", 4), fsync=True)
    assert len(calls) - before == 1


def test_torn_last_line_is_ignored_and_cut_by_next_writer(tmp_path: Path) -> None:
    log = TxnLog.open(tmp_path)
    log.bump_epoch()
    log.append(begin(1, "t1", 1), fsync=False)
    path = tmp_path / "txn.log"
    with open(path, "ab") as f:
        f.write(b'{"epoch":1,"ts":1.0,"kind":"COMMIT","txn":"t1","ver')
    assert [r.kind for r in log.records()] == ["EPOCH", "BEGIN"]
    log2 = TxnLog.open(tmp_path)  # recovery cuts the torn tail
    assert [r.kind for r in log2.records()] == ["EPOCH", "BEGIN"]
    assert path.read_bytes().endswith(b"\n")
    log2.append(CommitRecord(epoch=1, txn="t1", version=1), fsync=True)
    assert [r.kind for r in TxnLog.open(tmp_path).records()] == ["EPOCH", "BEGIN", "COMMIT"]
    assert replay(log2.records()).versions[1].checksums == CS1


def test_torn_tail_written_after_open_is_cut_by_append(tmp_path: Path) -> None:
    log = TxnLog.open(tmp_path)
    log.bump_epoch()
    with open(tmp_path / "txn.log", "ab") as f:
        f.write(b'{"epoch":1,"ki')
    log.append(MemberRecord(epoch=1, replica_id="r1", event="join"), fsync=False)
    assert [r.kind for r in log.records()] == ["EPOCH", "MEMBER"]


def test_corrupt_middle_line_raises_with_line_number(tmp_path: Path) -> None:
    log = TxnLog.open(tmp_path)
    log.bump_epoch()
    log.append(begin(1, "t1", 1), fsync=False)
    log.append(CommitRecord(epoch=1, txn="t1", version=1), fsync=True)
    path = tmp_path / "txn.log"
    lines = path.read_bytes().split(b"\n")
    lines[1] = lines[1].replace(b'"BEGIN"', b'"BEGUN"')
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(LogCorrupted) as ei:
        log.records()
    assert ei.value.line == 2
    assert str(path) in str(ei.value)
    with pytest.raises(LogCorrupted):
        TxnLog.open(tmp_path)


def test_corrupt_terminated_last_line_raises(tmp_path: Path) -> None:
    log = TxnLog.open(tmp_path)
    log.bump_epoch()
    with open(tmp_path / "txn.log", "ab") as f:
        f.write(b"not json\n")
    with pytest.raises(LogCorrupted) as ei:
        log.records()
    assert ei.value.line == 2


def test_epoch_fencing_between_two_logs_on_one_file(tmp_path: Path) -> None:
    old = TxnLog.open(tmp_path)
    assert old.bump_epoch() == 1
    old.append(begin(1, "t1", 1), fsync=False)
    new = TxnLog.open(tmp_path)
    assert new.epoch == 1
    assert new.bump_epoch() == 2
    # The old incarnation has not re-read the file; its append must still be refused.
    with pytest.raises(StaleEpoch) as ei:
        old.append(CommitRecord(epoch=old.epoch, txn="t1", version=1), fsync=True)
    assert (ei.value.epoch, ei.value.seen) == (1, 2)
    with pytest.raises(StaleEpoch):
        old.append(MemberRecord(epoch=1, replica_id="r0", event="join"), fsync=False)
    new.append(AbortRecord(epoch=2, txn="t1", reason="presumed abort"))
    kinds = [r.kind for r in new.records()]
    assert kinds == ["EPOCH", "BEGIN", "EPOCH", "ABORT"]
    assert old.file_epoch == 2
    # An epoch above the log's is a bug, not a fence.
    with pytest.raises(ValueError, match="bump_epoch"):
        new.append(MemberRecord(epoch=3, replica_id="r0", event="join"), fsync=False)
    # A third incarnation fences the second.
    third = TxnLog.open(tmp_path)
    assert third.bump_epoch() == 3
    with pytest.raises(StaleEpoch):
        new.append(MemberRecord(epoch=2, replica_id="r0", event="join"), fsync=False)
    with pytest.raises(StaleEpoch):
        new.append(EpochRecord(epoch=3), fsync=True)


def test_concurrent_appends_from_two_logs_never_interleave(tmp_path: Path) -> None:
    a = TxnLog.open(tmp_path)
    a.bump_epoch()
    b = TxnLog.open(tmp_path)
    n = 200
    big = {f"layer.{i}.weight": f"{i:016x}" for i in range(200)}  # ~8 KiB lines

    def work(log: TxnLog, tag: str) -> None:
        for i in range(n):
            log.append(begin(1, f"{tag}{i}", 1 + i, checksums=big), fsync=False)

    threads = [threading.Thread(target=work, args=(lg, tag)) for lg, tag in ((a, "a"), (b, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    recs = TxnLog.open(tmp_path).records()
    assert len(recs) == 1 + 2 * n
    assert {r.txn for r in recs if isinstance(r, BeginRecord)} == {f"{t}{i}" for t in "ab" for i in range(n)}


def test_replay_outcomes(tmp_path: Path) -> None:
    log = TxnLog.open(tmp_path)
    log.bump_epoch()
    log.append(begin(1, "t1", 1, key="k1"), fsync=False)
    log.append(CommitRecord(epoch=1, txn="t1", version=1), fsync=True)
    log.append(ActivatedRecord(epoch=1, txn="t1", version=1, duration_s=0.5), fsync=False)
    log.append(begin(1, "t2", 2, key="k2", checksums=CS2), fsync=False)
    log.append(AbortRecord(epoch=1, txn="t2", reason="r1 voted NO", votes={"r1": "NO: nan"}))
    log.append(begin(1, "t3", 3, key="k3", checksums=CS2), fsync=False)
    log.append(CommitRecord(epoch=1, txn="t3", version=3), fsync=True)
    log.append(begin(1, "t4", 4, key="k4"), fsync=False)

    s = log.state()
    assert s.epoch == 1
    assert (s.active_version, s.active_txn) == (1, "t1")
    assert sorted(s.versions) == [1, 3]  # v2 aborted: a gap
    assert s.versions[3].checksums == CS2
    assert s.versions[3].digest == set_digest(CS2)
    assert s.last_version == 4
    assert s.committed_not_activated == ["t3"]
    assert s.undecided == ["t4"]
    assert s.outcomes["t1"].status == "committed" and s.outcomes["t1"].activated
    assert s.outcomes["k1"] is s.outcomes["t1"]
    assert s.outcomes["k2"].status == "aborted"
    assert s.outcomes["k2"].reason == "r1 voted NO"
    assert s.outcomes["k2"].votes == {"r1": "NO: nan"}
    assert s.outcomes["k2"].version == 2
    assert s.outcomes["k3"].status == "committed" and not s.outcomes["k3"].activated
    assert s.outcomes["t4"].status == "in_doubt"  # its own epoch is still current
    assert [h.txn for h in s.history] == ["t1", "t2", "t3", "t4"]
    assert [h.status for h in s.history] == ["committed", "aborted", "committed", "in_doubt"]
    assert s.history[0].duration_s == 0.5 and s.history[1].duration_s is None

    # A new incarnation: the undecided transaction is presumed aborted.
    TxnLog.open(tmp_path).bump_epoch()
    s2 = log.state()
    assert s2.epoch == 2
    assert s2.undecided == ["t4"]
    assert s2.outcomes["k4"].status == "aborted"
    assert "presumed abort" in (s2.outcomes["k4"].reason or "")
    assert s2.committed_not_activated == ["t3"]  # committed stays committed: recovery finishes it
    assert s2.outcomes["t3"].status == "committed"


def test_replay_finishing_and_versions_only_grow() -> None:
    recs = [
        EpochRecord(epoch=1),
        begin(1, "t1", 1),
        CommitRecord(epoch=1, txn="t1", version=1),
        ActivatedRecord(epoch=1, txn="t1", version=1, duration_s=0.1),
        begin(1, "t2", 2),
        AbortRecord(epoch=1, txn="t2", reason="timeout"),
        begin(1, "t3", 5),  # gaps are allowed
        EpochRecord(epoch=2),
        CommitRecord(epoch=2, txn="t3", version=5),
        ActivatedRecord(epoch=2, txn="t3", version=5, duration_s=0.2),
    ]
    s = replay(recs)
    assert s.active_version == 5 and s.active_txn == "t3"
    assert s.committed_not_activated == [] and s.undecided == []
    assert s.last_version == 5
    assert sorted(s.versions) == [1, 5]
    assert s.active is not None and s.active.txn == "t3"


def test_replay_first_key_wins_and_fenced_records_ignored() -> None:
    recs = [
        EpochRecord(epoch=1),
        begin(1, "t1", 1, key="k"),
        AbortRecord(epoch=1, txn="t1", reason="NO"),
        begin(1, "t2", 2, key="k"),
        CommitRecord(epoch=1, txn="t2", version=2),
        EpochRecord(epoch=2),
        # Written by the epoch-1 coordinator after epoch 2 began (not possible through TxnLog).
        begin(1, "t3", 3),
        CommitRecord(epoch=1, txn="t3", version=3),
    ]
    s = replay(recs)
    assert s.outcomes["k"].txn == "t1" and s.outcomes["k"].status == "aborted"
    assert s.outcomes["t2"].status == "committed"
    assert "t3" not in s.outcomes and 3 not in s.versions
    assert s.last_version == 2


def test_replay_rejects_inconsistent_records() -> None:
    with pytest.raises(LogCorrupted) as ei:
        replay([EpochRecord(epoch=1), CommitRecord(epoch=1, txn="x", version=1)])
    assert ei.value.line == 2
    with pytest.raises(LogCorrupted):
        replay([EpochRecord(epoch=1), begin(1, "t", 1), CommitRecord(epoch=1, txn="t", version=2)])
    with pytest.raises(LogCorrupted):
        replay(
            [
                EpochRecord(epoch=1),
                begin(1, "t", 1),
                ActivatedRecord(epoch=1, txn="t", version=1, duration_s=0),
            ]
        )
    with pytest.raises(LogCorrupted):
        replay(
            [
                EpochRecord(epoch=1),
                begin(1, "t", 1),
                AbortRecord(epoch=1, txn="t", reason="x"),
                CommitRecord(epoch=1, txn="t", version=1),
            ]
        )


def test_members() -> None:
    s = replay(
        [
            EpochRecord(epoch=1),
            MemberRecord(epoch=1, replica_id="r0", event="join"),
            MemberRecord(epoch=1, replica_id="r1", event="join"),
            MemberRecord(epoch=1, replica_id="r1", event="exclude"),
        ]
    )
    assert s.members == {"r0": "join", "r1": "exclude"}


def test_closed_log_refuses(tmp_path: Path) -> None:
    log = TxnLog.open(tmp_path)
    log.close()
    with pytest.raises(ValueError, match="closed"):
        log.records()
    assert os.path.exists(tmp_path / "txn.log")


def test_apply_names_the_line_it_is_given_and_leaves_the_state_unchanged_on_corruption() -> None:
    state = replay([EpochRecord(epoch=1), begin(1, "t1", 1, key="k1")])
    before = _view(state)
    with pytest.raises(LogCorrupted) as ei:
        state.apply(CommitRecord(epoch=1, txn="t1", version=2), line=7)
    assert ei.value.line == 7 and "record 7" in str(ei.value)
    with pytest.raises(LogCorrupted) as ei:
        state.apply(begin(1, "t1", 2))
    assert ei.value.line is None
    assert str(ei.value) == "transaction log corrupted: duplicate BEGIN for transaction t1"
    assert _view(state) == before


# -- incremental replay ---------------------------------------------------------------------------


def _view(state: LogState) -> dict[str, Any]:
    """Every public field of a LogState, as plain values that compare by content."""
    return {
        "epoch": state.epoch,
        "active_version": state.active_version,
        "active_txn": state.active_txn,
        "versions": dict(state.versions),
        "committed_not_activated": list(state.committed_not_activated),
        "undecided": list(state.undecided),
        "outcomes": dict(state.outcomes),
        "last_version": state.last_version,
        "history": [vars(h) for h in state.history],
        "members": dict(state.members),
    }


def _every_kind_log() -> list[LogRecord]:
    """Every record kind; presumed aborts across two epoch bumps; fenced records of each kind
    (one that would be corruption if it were not fenced); rollbacks with origin_version; commits
    out of BEGIN order."""
    return [
        EpochRecord(epoch=1),  # 1
        MemberRecord(epoch=1, replica_id="r0", event="join"),
        MemberRecord(epoch=1, replica_id="r1", event="join"),
        begin(1, "t1", 1, key="k1"),
        CommitRecord(epoch=1, txn="t1", version=1),  # 5
        ActivatedRecord(epoch=1, txn="t1", version=1, duration_s=0.5),
        begin(1, "t2", 2, key="k2", checksums=CS2),
        AbortRecord(epoch=1, txn="t2", reason="r1 voted NO", votes={"r1": "NO: nan"}),
        begin(1, "t3", 3, key="k2"),  # the key again: k2 keeps naming t2
        CommitRecord(epoch=1, txn="t3", version=3),  # 10
        ActivatedRecord(epoch=1, txn="t3", version=3, duration_s=0.25),
        begin(1, "t4", 4, origin_version=1),  # a rollback to v1: committed, not activated
        CommitRecord(epoch=1, txn="t4", version=4),
        begin(1, "t5", 5, key="k5"),  # undecided when epoch 2 begins
        AbortRecord(epoch=1, txn="ghost", reason="aborted before its BEGIN was logged"),  # 15
        EpochRecord(epoch=2),
        begin(1, "t6", 6),  # fenced, as are the next three
        CommitRecord(epoch=1, txn="t5", version=5),
        AbortRecord(epoch=1, txn="t4", reason="late"),
        MemberRecord(epoch=1, replica_id="r0", event="leave"),  # 20
        begin(2, "t7", 6, key="k7", origin_version=3),
        EpochRecord(epoch=3),  # t5 and t7 are now presumed aborted before epoch 3
        AbortRecord(epoch=3, txn="t5", reason="presumed abort: coordinator restarted before COMMIT"),
        CommitRecord(epoch=3, txn="t7", version=6),  # an older epoch's undecided txn may still commit
        ActivatedRecord(epoch=3, txn="t4", version=4, duration_s=2.0),  # 25
        ActivatedRecord(epoch=3, txn="t7", version=6, duration_s=1.5),
        MemberRecord(epoch=3, replica_id="r1", event="exclude"),
        begin(3, "t8", 7, key="k1"),  # k1 keeps naming t1
        EpochRecord(epoch=4),
        begin(4, "t9", 8),  # 30
        begin(4, "t10", 9),
        CommitRecord(epoch=4, txn="t10", version=9),  # committed out of BEGIN order
        CommitRecord(epoch=4, txn="t9", version=8),
    ]


def test_applying_records_one_at_a_time_matches_replay_at_every_prefix() -> None:
    records = _every_kind_log()
    state = LogState()
    for n, record in enumerate(records, start=1):
        state.apply(record, n)
        assert _view(state) == _view(replay(records[:n])), f"after record {n} ({record.kind})"
        assert state == replay(records[:n])

    presumed = "presumed abort: not committed before coordinator epoch {}"
    s16 = replay(records[:16])
    assert s16.undecided == ["t5"] and s16.committed_not_activated == ["t4"]
    assert (s16.outcomes["k5"].status, s16.outcomes["k5"].reason) == ("aborted", presumed.format(2))
    s22 = replay(records[:22])
    assert s22.undecided == ["t5", "t7"]
    assert [s22.outcomes[t].reason for t in ("t5", "t7")] == [presumed.format(3)] * 2
    s24 = replay(records[:24])
    assert s24.undecided == [] and s24.committed_not_activated == ["t4", "t7"]
    assert s24.outcomes["t5"].reason == "presumed abort: coordinator restarted before COMMIT"
    assert s24.outcomes["t7"].status == "committed"

    assert state.epoch == 4
    assert (state.active_version, state.active_txn) == (6, "t7")
    assert sorted(state.versions) == [1, 3, 4, 6, 8, 9]
    assert (state.versions[4].origin_version, state.versions[6].origin_version) == (1, 3)
    assert state.versions[3].digest == set_digest(CS1)
    assert state.committed_not_activated == ["t9", "t10"]  # BEGIN order, as recovery finishes them
    assert state.undecided == ["t8"]
    assert state.last_version == 9
    assert state.members == {"r0": "join", "r1": "exclude"}
    assert state.outcomes["k1"].txn == "t1" and state.outcomes["k2"].txn == "t2"
    assert state.outcomes["k2"].votes == {"r1": "NO: nan"}
    assert (state.outcomes["t8"].status, state.outcomes["t8"].reason) == ("aborted", presumed.format(4))
    assert replay(records[:30]).outcomes["t9"].status == "in_doubt"  # its own epoch is current
    assert "t6" not in state.outcomes and "ghost" not in state.outcomes
    assert [(h.txn, h.status) for h in state.history] == [
        ("t1", "committed"), ("t2", "aborted"), ("t3", "committed"), ("t4", "committed"),
        ("t5", "aborted"), ("t7", "committed"), ("t8", "aborted"), ("t9", "committed"),
        ("t10", "committed"),
    ]
    assert [h.duration_s for h in state.history][:4] == [0.5, None, 0.25, 2.0]


class _NoWalk(dict):  # type: ignore[type-arg]
    """A dict that fails the test when it is iterated while armed."""

    armed = True

    def _walked(self) -> None:
        if self.armed:
            raise AssertionError("apply iterated a table that grows with the history")

    def __iter__(self) -> Any:
        self._walked()
        return super().__iter__()

    def keys(self) -> Any:
        self._walked()
        return super().keys()

    def values(self) -> Any:
        self._walked()
        return super().values()

    def items(self) -> Any:
        self._walked()
        return super().items()


def test_apply_never_walks_the_history_and_stays_correct_at_ten_thousand_transactions() -> None:
    n = 10_000
    records: list[LogRecord] = [EpochRecord(epoch=1)]
    for i in range(1, n + 1):
        records.append(begin(1, f"t{i}", i, key=f"k{i}", checksums={"w": f"{i:016x}"}))
        if i % 10 == 0:
            records.append(AbortRecord(epoch=1, txn=f"t{i}", reason="NO"))
        elif i % 10 != 9:  # every tenth-but-one is left undecided
            records.append(CommitRecord(epoch=1, txn=f"t{i}", version=i))
            records.append(ActivatedRecord(epoch=1, txn=f"t{i}", version=i, duration_s=0.0))
    state = replay(records)

    tables = ("versions", "members", "_txns", "_first_by_key", "_undecided", "_unactivated")
    guarded = {name: _NoWalk(getattr(state, name)) for name in tables}
    for name, table in guarded.items():
        setattr(state, name, table)
    more: list[LogRecord] = [
        EpochRecord(epoch=2),
        begin(2, "new", n + 1, key="k1"),
        CommitRecord(epoch=2, txn="new", version=n + 1),
        ActivatedRecord(epoch=2, txn="new", version=n + 1, duration_s=0.5),
        AbortRecord(epoch=2, txn="t9", reason="presumed abort: coordinator restarted before COMMIT"),
        MemberRecord(epoch=2, replica_id="r0", event="join"),
        CommitRecord(epoch=1, txn="t19", version=19),  # fenced
    ]
    for record in more:
        state.apply(record)
    assert state.outcomes["t19"].status == "aborted"  # a lookup does not walk either
    assert state.outcomes["k1"].txn == "t1"
    for table in guarded.values():
        table.armed = False

    assert _view(state) == _view(replay(records + more))
    assert (state.active_version, state.active_txn) == (n + 1, "new")
    assert len(state.history) == n + 1
    assert len(state.undecided) == n // 10 - 1 and "t9" not in state.undecided
    assert state.outcomes["t19"].reason == "presumed abort: not committed before coordinator epoch 2"


# -- readers --------------------------------------------------------------------------------------


def test_a_reader_leaves_a_torn_tail_in_place_and_ignores_it(tmp_path: Path) -> None:
    log = TxnLog.open(tmp_path)
    log.bump_epoch()
    log.append(begin(1, "t1", 1))
    log.append(CommitRecord(epoch=1, txn="t1", version=1))
    path = tmp_path / "txn.log"
    with open(path, "ab") as f:
        f.write(b'{"epoch":1,"ts":1.0,"kind":"ACTIVATED","txn":"t1"')
    before = path.read_bytes()

    reader = TxnLog.open(tmp_path, readonly=True)
    assert reader.readonly
    assert fcntl.fcntl(reader._fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
    state = reader.state()
    assert [r.kind for r in reader.records()] == ["EPOCH", "BEGIN", "COMMIT"]
    assert state.versions[1].txn == "t1" and state.active_version == 0
    assert reader.epoch == 1 and reader.cut_tails == []
    with pytest.raises(ValueError, match="read-only"):
        reader.append(ActivatedRecord(epoch=1, txn="t1", version=1, duration_s=0.1))
    with pytest.raises(ValueError, match="read-only"):
        reader.bump_epoch()
    reader.close()
    assert path.read_bytes() == before


def test_records_wait_for_a_writer_so_a_record_it_cuts_back_is_never_seen(tmp_path: Path) -> None:
    log = TxnLog.open(tmp_path)
    log.bump_epoch()
    log.append(begin(1, "t1", 1))
    path = tmp_path / "txn.log"
    size = path.stat().st_size
    reader = TxnLog.open(tmp_path, readonly=True)
    seen: list[list[str]] = []
    with open(path, "ab") as writer:
        fcntl.flock(writer, fcntl.LOCK_EX)  # a writer whose COMMIT is written but whose sync fails
        writer.write(logmod.dump_record(CommitRecord(epoch=1, txn="t1", version=1)))
        writer.flush()
        thread = threading.Thread(target=lambda: seen.append([r.kind for r in reader.records()]))
        thread.start()
        thread.join(0.2)
        assert seen == []  # still waiting for the lock
        os.ftruncate(writer.fileno(), size)
        fcntl.flock(writer, fcntl.LOCK_UN)
    thread.join()
    assert seen == [["EPOCH", "BEGIN"]]


def test_a_reader_creates_neither_the_directory_nor_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        TxnLog.open(tmp_path / "missing", readonly=True)
    assert not (tmp_path / "missing").exists()
    with pytest.raises(FileNotFoundError):
        TxnLog.open(tmp_path, readonly=True)
    assert not (tmp_path / "txn.log").exists()


# -- torn tails -----------------------------------------------------------------------------------


def test_a_cut_torn_tail_is_recorded_and_logged_with_path_line_and_size(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = TxnLog.open(tmp_path)
    log.bump_epoch()
    log.append(begin(1, "t1", 1))
    path = tmp_path / "txn.log"
    size = path.stat().st_size
    torn = b'{"epoch":1,"ts":1.0,"kind":"COMMIT","txn":"t1","ver'
    with open(path, "ab") as f:
        f.write(torn)
    with caplog.at_level(logging.WARNING, logger="weight_refit.log"):
        reopened = TxnLog.open(tmp_path)
    assert reopened.cut_tails == [CutTail(line=3, offset=size, nbytes=len(torn))]
    [warning] = [r for r in caplog.records if r.name == "weight_refit.log"]
    assert warning.levelno == logging.WARNING
    assert str(path) in warning.getMessage()
    assert f"line 3, {len(torn)} bytes" in warning.getMessage()

    # A tail torn after open is cut (and named) by the next append.
    reopened.append(CommitRecord(epoch=1, txn="t1", version=1))
    size = path.stat().st_size
    with open(path, "ab") as f:
        f.write(b'{"ep')
    reopened.append(MemberRecord(epoch=1, replica_id="r0", event="join"))
    assert reopened.cut_tails[1:] == [CutTail(line=4, offset=size, nbytes=4)]
    assert log.cut_tails == []


# -- failed writes --------------------------------------------------------------------------------


@pytest.fixture
def fp(monkeypatch: pytest.MonkeyPatch) -> Failpoints:
    monkeypatch.delenv(failpoints.ENV, raising=False)
    return Failpoints()


@pytest.mark.parametrize(
    ("name", "code"),
    [("log.write", errno.ENOSPC), ("log.fsync", errno.EIO)],
    ids=["write-ENOSPC", "fsync-EIO"],
)
def test_an_injected_os_error_leaves_the_log_unchanged_and_the_next_append_succeeds(
    tmp_path: Path, fp: Failpoints, name: str, code: int
) -> None:
    log = TxnLog.open(tmp_path, fp=fp)
    log.bump_epoch()
    log.append(begin(1, "t1", 1, key="k1"))
    path = tmp_path / "txn.log"
    before = path.read_bytes()
    fp.arm(name, f"oserror:{errno.errorcode[code]}")
    commit = CommitRecord(epoch=1, txn="t1", version=1)
    with pytest.raises(OSError) as ei:
        log.append(commit)
    assert ei.value.errno == code
    assert ei.value.filename == str(path)
    assert path.read_bytes() == before

    fp.arm(name, None)
    # The in-memory offsets still match the file: a tail torn now is found at the right line.
    with open(path, "ab") as f:
        f.write(b'{"epo')
    log.append(commit)
    assert log.cut_tails == [CutTail(line=3, offset=len(before), nbytes=5)]
    assert path.read_bytes() == before + logmod.dump_record(commit)
    state = TxnLog.open(tmp_path).state()
    assert state.outcomes["k1"].status == "committed" and sorted(state.versions) == [1]


def _short_writes(monkeypatch: pytest.MonkeyPatch, path: Path, then: OSError | None) -> list[int]:
    """Make the first write to ``path`` write half its bytes; the second raises ``then`` (or goes
    through). Returns the sizes asked of each write to ``path``."""
    real, ino, asked = os.write, path.stat().st_ino, []

    def write(fd: int, data: Any) -> int:
        if os.fstat(fd).st_ino != ino:
            return real(fd, data)
        asked.append(len(data))
        if len(asked) == 1:
            return real(fd, bytes(data)[: len(data) // 2])
        if then is not None:
            raise then
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)
    return asked


def test_a_short_write_is_retried_for_the_rest_of_the_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = TxnLog.open(tmp_path)
    log.bump_epoch()
    record = begin(1, "t1", 1, checksums=BIG)
    asked = _short_writes(monkeypatch, tmp_path / "txn.log", then=None)
    log.append(record)
    monkeypatch.undo()
    line = len(logmod.dump_record(record))
    assert asked == [line, line - line // 2]
    assert TxnLog.open(tmp_path).records()[1] == record


def test_a_failure_after_a_short_write_cuts_the_partial_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = TxnLog.open(tmp_path)
    log.bump_epoch()
    path = tmp_path / "txn.log"
    before = path.read_bytes()
    asked = _short_writes(monkeypatch, path, then=OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    with pytest.raises(OSError) as ei:
        log.append(begin(1, "t1", 1, checksums=BIG))
    monkeypatch.undo()
    assert len(asked) == 2
    assert (ei.value.errno, ei.value.filename) == (errno.ENOSPC, str(path))
    assert path.read_bytes() == before
    log.append(begin(1, "t1", 1, checksums=BIG))
    assert log.cut_tails == []
    assert TxnLog.open(tmp_path).state().undecided == ["t1"]


@pytest.mark.skipif(
    sys.platform != "linux" or os.geteuid() != 0, reason="mounting a small tmpfs needs root on Linux"
)
def test_a_full_disk_fails_the_append_leaving_the_log_unchanged_and_it_recovers_once_space_is_freed(
    tmp_path: Path,
) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        log = TxnLog.open(mnt)
        log.bump_epoch()
        log.append(begin(1, "t1", 1))
        filler = mnt / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        try:
            for chunk in (4096, 256, 1):
                while True:
                    try:
                        os.write(fd, b"\0" * chunk)
                    except OSError as e:
                        assert e.errno == errno.ENOSPC
                        break
        finally:
            os.close(fd)
        path = mnt / "txn.log"
        before = path.read_bytes()
        # Longer than a page, so the slack in the log file's last page cannot hold it.
        big = begin(1, "t2", 2, checksums=BIG)
        with pytest.raises(OSError) as ei:
            log.append(big)
        assert ei.value.errno == errno.ENOSPC
        assert describe_os_error(ei.value, "writing the transaction log") == (
            f"disk full (ENOSPC) writing the transaction log {path}"
        )
        assert path.read_bytes() == before

        filler.unlink()
        log.append(big)
        log.append(CommitRecord(epoch=1, txn="t2", version=2))
        log.close()
        with TxnLog.open(mnt, readonly=True) as reader:
            assert [r.kind for r in reader.records()] == ["EPOCH", "BEGIN", "BEGIN", "COMMIT"]
            assert reader.state().versions[2].checksums == BIG
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_a_member_record_of_the_former_word_evict_is_read_as_exclude(tmp_path: Path) -> None:
    log = TxnLog.open(tmp_path)
    log.bump_epoch()
    with open(tmp_path / "txn.log", "ab") as f:  # as an older version of the project wrote it
        f.write(b'{"epoch":1,"ts":1.0,"kind":"MEMBER","replica_id":"r3","event":"evict"}\n')
    [record] = [r for r in log.records() if isinstance(r, MemberRecord)]
    assert record.event == "exclude"
    assert log.state().members == {"r3": "exclude"}


# ----------------------------------------------------------------------------- compaction


def _view_of_recent(state: LogState, txns: list[str]) -> tuple[object, ...]:
    return (state.epoch, state.active_version, state.active_txn, state.last_version, state.members,
            state.undecided, state.committed_not_activated, state.unpersisted,
            {t: state.outcomes[t] for t in txns}, {v: state.versions[v] for v in state.versions})


def test_compaction_keeps_what_the_state_needs_and_replays_to_it() -> None:
    """Every kind of record (presumed aborts across epochs, rollbacks, out-of-order commits):
    the compacted log replays to the same state for every transaction it keeps, and keeps every
    transaction still needed whatever its age."""
    records = _every_kind_log()
    full = replay(records)
    kept, dropped = full.compacted(keep_recent=2, keep_versions={1})
    again = replay(kept)
    recent = [h.txn for h in full.history][-2:]
    needed = set(full.undecided) | set(full.committed_not_activated) | {full.versions[1].txn, full.active_txn}
    assert {h.txn for h in again.history} == set(recent) | needed
    assert again.transactions < full.transactions and dropped
    for attr in ("epoch", "active_version", "active_txn", "last_version", "members", "undecided",
                 "committed_not_activated", "unpersisted"):
        assert getattr(again, attr) == getattr(full, attr), attr
    for txn in {h.txn for h in again.history}:
        assert again.outcomes[txn] == full.outcomes[txn], txn
    assert set(again.versions) <= set(full.versions)
    for v, info in again.versions.items():
        assert info == full.versions[v]


def test_a_rewritten_log_keeps_fencing_and_appends_where_it_should(tmp_path: Path) -> None:
    log = TxnLog.open(tmp_path)
    log.bump_epoch()
    for i in range(1, 41):
        log.append(begin(1, f"t{i}", i, key=f"k{i}"))
        log.append(CommitRecord(epoch=1, txn=f"t{i}", version=i))
        log.append(ActivatedRecord(epoch=1, txn=f"t{i}", version=i, duration_s=0.01))
    log.bump_epoch()
    kept, dropped = log.state().compacted(keep_recent=5, keep_versions=set())
    log.rewrite(kept)
    assert (tmp_path / "txn.log").read_bytes().count(b"\n") == len(kept) < 40
    log.append(begin(2, "t41", 41))
    state = TxnLog.open(tmp_path).state()
    assert state.last_version == 41 and state.active_version == 40 and state.epoch == 2
    assert "k36" in state.outcomes and "k35" not in state.outcomes
    with pytest.raises(StaleEpoch):  # an append of the older epoch is still fenced
        log.append(CommitRecord(epoch=1, txn="t41", version=41))
    other = TxnLog.open(tmp_path)
    other.bump_epoch()
    with pytest.raises(StaleEpoch):  # and so is this object once a newer incarnation took over
        log.append(CommitRecord(epoch=2, txn="t41", version=41))
