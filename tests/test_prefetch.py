"""Buckets fetched, copied and hashed ahead of their PREPARE (``actors.prefetch``).

Without Ray: the prefetcher's bookkeeping (what a PREPARE gets, what is freed and when), the
engine's ``prestage`` and ``stage(adopt=...)`` on a real engine, and a ``ReplicaCore`` voting on
prefetched buckets, a corrupted copy included. The fleet path runs against real actors in
``test_shared_memory`` and ``test_real_models`` (every refit there announces its buckets).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fleet_models import build_probe_engine, probe_input, probe_value, probe_weights

from actors.failpoints import Failpoints
from actors.payload import spec_dict, to_wire
from actors.prefetch import Prefetcher
from actors.replica_core import ReplicaCore
from actors.store import CheckpointStore
from engines import load_engine
from engines.checksum import ChecksumMismatch, checksums

WIDTH = 64 << 10  # 256 KiB per weight: copied on the helper threads as large tensors are


class Ref:
    """An object-store ref as far as the prefetcher and the replica can tell: a bucket with a key."""

    def __init__(self, key: str, wire: Any) -> None:
        self.key, self.wire = key, wire

    def hex(self) -> str:
        return self.key


def tensors_of(value: float, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    return {n: torch.from_numpy(a) for n, a in probe_weights(value, width=WIDTH).items()
            if names is None or n in names}


class Publication:
    """A version in two buckets (``Ref``), with its specs and checksums."""

    def __init__(self, value: float, tag: str = "pub") -> None:
        tensors = tensors_of(value)
        names = list(tensors)
        halves = [names[:2], names[2:]]
        self.refs = [Ref(f"{tag}-{k}", to_wire({n: tensors[n] for n in half}))
                     for k, half in enumerate(halves)]
        self.specs = spec_dict(tensors)
        self.checksums = checksums(tensors)
        self.bucket_specs = [{n: self.specs[n] for n in half} for half in halves]


@pytest.fixture(scope="module")
def engine_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("engine") / "wide.engine"
    build_probe_engine(path, width=WIDTH)
    return path


def make_core(engine_path: Path, tmp_path: Path, **engine_kw: Any) -> ReplicaCore:
    def fetch(refs: list[Any]) -> list[Any]:
        return [r.wire if isinstance(r, Ref) else r for r in refs]

    return ReplicaCore("r0", lambda: load_engine(engine_path, device="cpu", **engine_kw),
                       CheckpointStore(tmp_path / "store"), fetch, Failpoints(owner="r0"))


def offer_all(core: ReplicaCore, pub: Publication, tag: str = "pub", verify: bool = True) -> None:
    for ref, specs in zip(pub.refs, pub.bucket_specs, strict=True):
        assert core.prefetch.offer(tag, ref, specs, verify)


def prepare(core: ReplicaCore, txn: str, version: int, pub: Publication, verify: bool = True) -> Any:
    return core.prepare(1, txn, version, pub.refs, pub.specs, pub.checksums, None, None, verify)


def served(core: ReplicaCore) -> float | None:
    return probe_value(core.engine.infer(probe_input(WIDTH)).outputs)


# ----------------------------------------------------------------------------- the bookkeeping


class Recorder:
    """A prefetcher's fetch, prestage and release, recording what was released."""

    def __init__(self) -> None:
        self.released: list[str] = []
        self.copied: list[str] = []
        self.gate: dict[str, threading.Event] = {}
        self.entered = threading.Event()

    def prefetcher(self, **kw: Any) -> Prefetcher:
        return Prefetcher(self.fetch, self.prestage, lambda t: self.released.extend(sorted(t)), **kw)

    def fetch(self, ref: Any, specs: dict[str, Any]) -> dict[str, Any]:
        self.entered.set()
        if ref.key in self.gate:
            assert self.gate[ref.key].wait(10)
        if ref.key.startswith("bad"):
            raise ConnectionError("the object is gone")
        return {f"{ref.key}.w": torch.zeros(4)}

    def prestage(self, tensors: dict[str, Any], verify: bool) -> tuple[dict[str, Any], bool]:
        self.copied.extend(tensors)
        return {n: (t.clone(), "sum" if verify else None) for n, t in tensors.items()}, True


def ready(pf: Prefetcher, buckets: int) -> bool:
    """Whether ``buckets`` are ready within 10 s (the worker runs on its own thread)."""
    done = threading.Event()
    for _ in range(1000):
        if pf.held()["buckets"] >= buckets:
            return True
        done.wait(0.01)
    return False


def test_a_prepare_gets_the_buckets_prefetched_for_its_refs_and_the_rest_is_freed() -> None:
    rec = Recorder()
    pf = rec.prefetcher()
    a, b, other = Ref("a", None), Ref("b", None), Ref("c", None)
    for ref in (other, a, b):  # in this order: c is copied (or skipped) before b
        assert pf.offer("t", ref, {}, True)
    got = pf.claim([b, ("an", "inline", "bucket"), a], timeout=10)
    assert sorted(got) == [0, 2]
    assert list(got[0].tensors) == ["b.w"] and got[0].checksums == {"b.w": "sum"} and got[0].copied
    assert "c.w" not in rec.copied or rec.released == ["c.w"]  # not a ref of this PREPARE: freed
    assert pf.held()["buckets"] == 0
    pf.release(got)
    assert sorted(rec.released) == sorted(rec.copied)  # every copy made went back


def test_a_bucket_of_a_new_publication_frees_the_buckets_of_the_old_one() -> None:
    rec = Recorder()
    pf = rec.prefetcher()
    old, new = Ref("old", None), Ref("new", None)
    assert pf.offer("first", old, {}, True)
    assert pf.offer("second", new, {}, True)
    got = pf.claim([old, new], timeout=10)
    assert list(got) == [1], "the old publication's bucket was freed when the new one came"
    assert rec.released == (["old.w"] if "old.w" in rec.copied else [])  # copied before the new one


def test_a_bucket_announced_after_its_prepare_or_its_withdrawal_or_twice_is_ignored() -> None:
    rec = Recorder()
    pf = rec.prefetcher()
    late = Ref("late", None)
    assert pf.claim([late], timeout=0) == {}
    assert not pf.offer("t", late, {}, True)
    pf.forget("failed")  # the withdrawal overtook the publication's last announcements
    assert not pf.offer("failed", Ref("y", None), {}, True)
    assert pf.offer("t", Ref("x", None), {}, True)
    assert not pf.offer("t", Ref("x", None), {}, True)
    assert pf.held()["tag"] == "t"


def test_a_bucket_that_cannot_be_fetched_is_simply_not_there() -> None:
    rec = Recorder()
    pf = rec.prefetcher()
    assert pf.offer("t", Ref("bad", None), {}, True)
    assert pf.offer("t", Ref("good", None), {}, True)
    got = pf.claim([Ref("bad", None), Ref("good", None)], timeout=10)
    assert list(got) == [1]
    assert pf.held()["skipped"] == 1


def test_a_bucket_still_being_copied_when_it_is_dropped_is_freed_once_its_copy_ends() -> None:
    rec = Recorder()
    pf = rec.prefetcher()
    rec.gate["slow"] = threading.Event()
    assert pf.offer("t", Ref("slow", None), {}, True)
    assert rec.entered.wait(10)
    pf.forget("t")
    assert rec.released == []  # still copying
    assert pf.offer("t2", Ref("next", None), {}, True)
    rec.gate["slow"].set()
    got = pf.claim([Ref("next", None)], timeout=10)  # the worker took "slow" first
    assert list(got) == [0]
    assert rec.released == ["slow.w"]


def test_buckets_whose_refit_never_came_are_freed_once_older_than_max_age() -> None:
    rec = Recorder()
    pf = rec.prefetcher(max_age_s=3600.0)
    assert pf.offer("t", Ref("a", None), {}, True)
    assert ready(pf, 1)
    pf.expire()
    assert pf.held()["buckets"] == 1 and rec.released == []
    pf.max_age_s = 0.0
    pf.expire()
    assert pf.held()["tag"] is None and rec.released == ["a.w"]


# ----------------------------------------------------------------------------- the engine


def test_a_prestaged_copy_is_staged_as_it_is_and_served_after_commit(engine_path: Path) -> None:
    engine = load_engine(engine_path, device="cpu")
    new = tensors_of(2.0, ["w.0", "w.1"])
    copies = engine.prestage(new, checksum=True)
    assert copies is not None
    assert {n: c for n, (_, c) in copies.items()} == checksums(new)
    staged = engine.stage({n: b for n, (b, _) in copies.items()} | tensors_of(2.0, ["w.2", "w.3"]), 1,
                          values_checked=True, adopt={"w.0", "w.1"})
    engine.commit(staged)
    live = engine.weights()
    assert live["w.0"].data_ptr() == copies["w.0"][0].data_ptr()  # adopted: no second copy
    assert probe_value(engine.infer(probe_input(WIDTH)).outputs) == 2.0


def test_a_prestaged_copy_that_fails_its_checksum_stages_nothing_and_its_buffer_is_pooled(
        engine_path: Path) -> None:
    engine = load_engine(engine_path, device="cpu")
    serving = probe_value(engine.infer(probe_input(WIDTH)).outputs)
    new = tensors_of(2.0)
    copies = engine.prestage(new, checksum=False)
    assert copies is not None and all(c is None for _, c in copies.values())
    buffers = {n: b for n, (b, _) in copies.items()}
    buffers["w.3"][7] = 9.0  # the copy no longer holds the published bytes
    with pytest.raises(ChecksumMismatch, match="w.3"):
        engine.stage(buffers, 1, values_checked=True, checksums=checksums(new), adopt=set(buffers))
    mem = engine.memory()
    assert mem.staged_bytes == 0 and mem.pool_bytes == sum(b.nbytes for b in buffers.values())
    assert engine.version == 0 and probe_value(engine.infer(probe_input(WIDTH)).outputs) == serving


@pytest.mark.parametrize("kw", [{"memory_mode": "copy"}, {"memory_mode": "shared"},
                                {"memory_budget_bytes": 1 << 30}])
def test_an_engine_that_stages_otherwise_prestages_nothing(engine_path: Path, kw: dict[str, Any]) -> None:
    engine = load_engine(engine_path, device="cpu", **kw)
    assert engine.prestage(tensors_of(2.0), checksum=True) is None


def test_prestage_checks_names_and_shapes_before_copying(engine_path: Path) -> None:
    engine = load_engine(engine_path, device="cpu")
    with pytest.raises(ValueError, match="w.9"):
        engine.prestage({"w.9": torch.zeros(WIDTH)}, checksum=True)
    with pytest.raises(ValueError, match="w.0"):
        engine.prestage({"w.0": torch.zeros(3)}, checksum=True)
    assert engine.memory().pool_bytes == 0


# ----------------------------------------------------------------------------- a replica's PREPARE


def test_a_prepare_adopts_the_buckets_prefetched_for_it_and_the_version_serves(engine_path: Path,
                                                                               tmp_path: Path) -> None:
    core = make_core(engine_path, tmp_path)
    pub = Publication(2.0)
    offer_all(core, pub)
    vote = prepare(core, "t1", 1, pub)
    assert vote.yes, vote.reason
    assert vote.timings["prefetched"] == 2.0
    core.commit(1, "t1")
    core.activate(1, "t1")
    assert served(core) == 2.0
    assert core.prefetch.held()["buckets"] == 0


def corrupt(pub: Publication, name: str) -> None:
    """Flip a value of ``name`` in its bucket, after the caller checksummed it."""
    for ref in pub.refs:
        if name in ref.wire[2]:
            ref.wire[2][name][5] = np.float32(7.0)


@pytest.mark.parametrize("hashed_ahead", [True, False])
def test_a_prefetched_copy_of_bytes_that_do_not_match_the_checksums_is_a_no_vote_naming_the_tensor(
        engine_path: Path, tmp_path: Path, hashed_ahead: bool) -> None:
    """Hashed as it was copied, or (prefetched by a replica that was not its node's verifier)
    hashed at the PREPARE that asks this replica to verify."""
    core = make_core(engine_path, tmp_path)
    serving = served(core)
    pub = Publication(2.0)
    corrupt(pub, "w.2")
    offer_all(core, pub, verify=hashed_ahead)
    vote = prepare(core, "t1", 1, pub, verify=True)
    assert not vote.yes
    assert vote.timings["prefetched"] == 2.0
    assert "w.2" in vote.reason and "replica r0" in vote.reason
    mem = core.engine.memory()
    assert mem.staged_bytes == 0 and core.engine.version == 0
    assert mem.pool_bytes == 4 * WIDTH * 4  # every prefetched copy went back to the pool
    assert served(core) == serving


def test_a_catch_up_frees_what_was_prefetched(engine_path: Path, tmp_path: Path) -> None:
    core = make_core(engine_path, tmp_path)
    tensors = tensors_of(3.0)
    core.store.save(3, tensors, checksums(tensors))
    offer_all(core, Publication(2.0))
    core.sync(3)
    assert served(core) == 3.0 and core.prefetch.held()["buckets"] == 0
