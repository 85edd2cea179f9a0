from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from actors import log as logmod
from actors.log import (
    AbortRecord,
    ActivatedRecord,
    BeginRecord,
    CommitRecord,
    EpochRecord,
    LogCorrupted,
    MemberRecord,
    StaleEpoch,
    TxnLog,
    replay,
)
from engines.checksum import set_digest

CS1 = {"w": "00000000000000a1", "b": "00000000000000b1"}
CS2 = {"w": "00000000000000a2", "b": "00000000000000b1"}


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
        log.append(r, fsync=isinstance(r, CommitRecord))
    got = TxnLog.open(tmp_path / "state").records()
    assert got == [EpochRecord(epoch=1, ts=got[0].ts), *recs]
    assert isinstance(got[1], BeginRecord)
    assert got[1].digest == set_digest(CS1)
    assert (tmp_path / "state" / "txn.log").read_text().count("\n") == 6


def test_commit_and_epoch_require_fsync(tmp_path: Path) -> None:
    log = TxnLog.open(tmp_path)
    log.bump_epoch()
    log.append(begin(1, "t1", 1), fsync=False)
    with pytest.raises(ValueError, match="fsync"):
        log.append(CommitRecord(epoch=1, txn="t1", version=1), fsync=False)
    with pytest.raises(ValueError, match="fsync"):
        log.append(EpochRecord(epoch=2), fsync=False)
    assert len(log.records()) == 2


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
    assert (ei.value.record_epoch, ei.value.log_epoch) == (1, 2)
    with pytest.raises(StaleEpoch):
        old.append(MemberRecord(epoch=1, replica_id="r0", event="join"), fsync=False)
    new.append(AbortRecord(epoch=2, txn="t1", reason="presumed abort"), fsync=False)
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
    log.append(AbortRecord(epoch=1, txn="t2", reason="r1 voted NO", votes={"r1": "NO: nan"}), fsync=False)
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


def test_rollback_target_walks_back() -> None:
    recs: list = [EpochRecord(epoch=1)]
    for v in (1, 2, 3):
        recs += [
            begin(1, f"t{v}", v),
            CommitRecord(epoch=1, txn=f"t{v}", version=v),
            ActivatedRecord(epoch=1, txn=f"t{v}", version=v, duration_s=0),
        ]
    s = replay(recs)
    assert s.rollback_target() == 2
    recs += [
        begin(1, "t4", 4, origin_version=2),
        CommitRecord(epoch=1, txn="t4", version=4),
        ActivatedRecord(epoch=1, txn="t4", version=4, duration_s=0),
    ]
    s = replay(recs)
    assert s.versions[4].origin_version == 2
    assert s.rollback_target() == 1
    assert replay([]).rollback_target() is None


def test_members() -> None:
    s = replay(
        [
            EpochRecord(epoch=1),
            MemberRecord(epoch=1, replica_id="r0", event="join"),
            MemberRecord(epoch=1, replica_id="r1", event="join"),
            MemberRecord(epoch=1, replica_id="r1", event="evict"),
        ]
    )
    assert s.members == {"r0": "join", "r1": "evict"}


def test_closed_log_refuses(tmp_path: Path) -> None:
    log = TxnLog.open(tmp_path)
    log.close()
    with pytest.raises(ValueError, match="closed"):
        log.records()
    assert os.path.exists(tmp_path / "txn.log")
