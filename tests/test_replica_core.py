"""A replica's part in refits without Ray (``ReplicaCore``): a real engine, a real checkpoint store,
the transaction records that hold the staged sets, and the replica's lifecycle."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from fleet_models import build_probe_engine, probe_input, probe_value, probe_weights

from actors.failpoints import Failpoints
from actors.payload import spec_dict, to_wire
from actors.replica_core import ReplicaCore
from actors.replica_protocol import Lifecycle, TxnState
from actors.store import CheckpointStore
from engines import load_engine
from engines.checksum import checksums


class Published:
    """What a refit hands a replica: one inline bucket (as the "refs"), specs and checksums."""

    def __init__(self, value: float, names: list[str] | None = None) -> None:
        tensors = {n: torch.from_numpy(a) for n, a in probe_weights(value).items()
                   if names is None or n in names}
        self.refs = [to_wire(tensors)]
        self.specs = spec_dict(tensors)
        self.checksums = checksums(tensors)


@pytest.fixture(scope="module")
def engine_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("engine") / "probe.engine"
    build_probe_engine(path)
    return path


def make_core(engine_path: Path, store_dir: Path, fetch: Any = None) -> ReplicaCore:
    store = CheckpointStore(store_dir)
    return ReplicaCore("r0", lambda: load_engine(engine_path, device="cpu"), store,
                       fetch or (lambda refs: refs), Failpoints(owner="r0"))


def prepare(core: ReplicaCore, txn: str, version: int, pub: Published, *, epoch: int = 1,
            base: int | None = None) -> Any:
    return core.prepare(epoch, txn, version, pub.refs, pub.specs, pub.checksums, None, base)


def staged_bytes(core: ReplicaCore) -> int:
    return core.engine.memory().staged_bytes


def served_value(core: ReplicaCore) -> float | None:
    return probe_value(core.engine.infer(probe_input()).outputs)


def store_version(core: ReplicaCore, version: int, value: float) -> None:
    tensors = {n: torch.from_numpy(a) for n, a in probe_weights(value).items()}
    core.store.save(version, tensors, checksums(tensors))


def test_a_repeated_prepare_while_the_first_is_staging_leaves_the_first_alone(engine_path: Path,
                                                                              tmp_path: Path) -> None:
    """Loose end 8: a duplicate PREPARE of a transaction still PREPARING marked the original
    REFUSED, and the original's staged set leaked."""
    entered, release = threading.Event(), threading.Event()

    def slow_fetch(refs: list[Any]) -> list[Any]:
        entered.set()
        release.wait(10)
        return refs

    core = make_core(engine_path, tmp_path, slow_fetch)
    pub = Published(2.0)
    first: list[Any] = []
    worker = threading.Thread(target=lambda: first.append(prepare(core, "t1", 1, pub)))
    worker.start()
    assert entered.wait(10)
    again = prepare(core, "t1", 1, pub)
    assert not again.yes and "already preparing" in again.reason
    release.set()
    worker.join(10)
    assert first[0].yes, first[0].reason
    rec = core.participant.get("t1")
    assert rec.state is TxnState.PREPARED and rec.staged is not None
    assert prepare(core, "t1", 1, pub).yes  # a repeat of a PREPARED one answers YES again
    core.abort(1, "t1", "done")
    assert staged_bytes(core) == 0 and core.participant.get("t1").staged is None


def test_a_catch_up_supersedes_every_staged_set_and_frees_it(engine_path: Path, tmp_path: Path) -> None:
    """Two maps (records and staged sets) used to drift apart: ``sync_to`` cleared one only, and a
    later ACTIVATE found no staged set (KeyError)."""
    core = make_core(engine_path, tmp_path)
    store_version(core, 3, 3.0)
    assert prepare(core, "t1", 1, Published(1.0)).yes
    core.commit(1, "t1")
    assert staged_bytes(core) > 0
    ack = core.sync(3)
    assert ack.version == 3 and served_value(core) == 3.0
    rec = core.participant.get("t1")
    assert rec.state is TxnState.SUPERSEDED and rec.staged is None and staged_bytes(core) == 0
    with pytest.raises(Exception, match="ACTIVATE needs a committed staged set"):
        core.activate(1, "t1")
    assert served_value(core) == 3.0


def test_a_draining_replica_stays_draining_through_a_catch_up(engine_path: Path, tmp_path: Path) -> None:
    core = make_core(engine_path, tmp_path)
    store_version(core, 2, 2.0)
    core.sync(0)
    assert core.lifecycle.move(Lifecycle.DRAINING)
    core.sync(2)
    assert core.engine.version == 2 and core.lifecycle.state is Lifecycle.DRAINING
    assert not core.lifecycle.move(Lifecycle.SERVING)


def test_a_prepare_of_a_newer_version_frees_a_set_whose_abort_was_lost(engine_path: Path,
                                                                       tmp_path: Path) -> None:
    core = make_core(engine_path, tmp_path)
    assert prepare(core, "t1", 1, Published(1.0)).yes
    one_set = staged_bytes(core)
    assert one_set > 0
    assert prepare(core, "t2", 2, Published(2.0)).yes  # t1's ABORT never arrived
    assert core.participant.get("t1").state is TxnState.ABORTED
    assert staged_bytes(core) == one_set
    core.abort(1, "t2", "x")
    assert staged_bytes(core) == 0


def test_a_partial_refit_built_on_a_version_this_replica_does_not_serve_is_refused(
        engine_path: Path, tmp_path: Path) -> None:
    core = make_core(engine_path, tmp_path)
    vote = prepare(core, "t1", 5, Published(5.0, names=["w.1"]), base=4)
    assert not vote.yes and "serves v0" in vote.reason and "builds on v4" in vote.reason
    assert staged_bytes(core) == 0
    full = prepare(core, "t2", 6, Published(6.0), base=4)  # a full set needs no base
    assert full.yes


def test_a_failed_catch_up_leaves_the_replica_failed_and_voting_no(engine_path: Path, tmp_path: Path) -> None:
    core = make_core(engine_path, tmp_path)
    core.sync(0)
    store_version(core, 4, 4.0)
    data = core.store.data_path(4)
    raw = bytearray(data.read_bytes())
    raw[-3] ^= 0x01  # one bit of the last tensor
    data.write_bytes(bytes(raw))
    with pytest.raises(Exception, match="checksum"):
        core.sync(4)
    assert core.lifecycle.state is Lifecycle.FAILED and "ChecksumMismatch" in core.lifecycle.error
    assert core.engine.version == 0  # never the corrupted weights
    vote = prepare(core, "t9", 9, Published(9.0))
    assert not vote.yes and "cannot serve" in vote.reason and "ChecksumMismatch" in vote.reason
    store_version(core, 5, 5.0)
    core.sync(5)  # a good version heals it
    assert core.lifecycle.state is Lifecycle.SERVING and served_value(core) == 5.0


def test_a_prepare_says_what_it_allocated_because_the_pool_had_no_buffer_to_reuse(engine_path: Path,
                                                                                   tmp_path: Path) -> None:
    core = make_core(engine_path, tmp_path)
    first = prepare(core, "t1", 1, Published(1.0))
    assert first.yes and first.timings["allocated_bytes"] == staged_bytes(core) > 0
    core.abort(1, "t1", "x")  # its buffers go back to the pool
    second = prepare(core, "t2", 2, Published(2.0))
    assert second.yes and second.timings["allocated_bytes"] == 0.0
