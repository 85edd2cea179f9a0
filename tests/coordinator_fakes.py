"""Fakes of the coordinator's Ray-facing parts, for pure-logic tests (not a test module).

``FakeReplicas`` implements ``ReplicaClient`` over in-memory replicas that follow the protocol's
rules closely enough for the coordinator's logic: a YES vote remembers the transaction's version,
COMMIT (with its ACTIVATE) serves it, a catch-up serves the version asked for. Scripted failures
(``fail``) make a given call to a given replica come back as ``Failed``; ``on_call`` hooks observe
the coordinator while a call is "in flight".
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from actors.persist import PersistJob
from actors.replica_client import Exported, OnReply, ReplicaClient
from actors.replies import Ack, Failed, FailureKind, LeaseReply, PrepareReply


@dataclass
class FakeReplica:
    rid: str
    version: int = 0
    state: str = "serving"
    error: str = ""
    staged: dict[str, int] = field(default_factory=dict)  # txn -> version
    active: set[str] = field(default_factory=set)  # txns activated here
    vote_no: str = ""  # a NO reason for every PREPARE
    catch_up_fails: str = ""
    lease: tuple[int, int] = (0, 0)  # (epoch, generation) of the newest renewal accepted
    excluded_by: tuple[int, int] | None = None


class FakeReplicas(ReplicaClient):
    def __init__(self, rids: list[str], version: int = 0) -> None:
        self.replicas = {rid: FakeReplica(rid, version) for rid in rids}
        self.calls: list[tuple[str, tuple[str, ...]]] = []  # (method, rids) per call, in order
        self.fail: dict[tuple[str, str], list[Failed]] = defaultdict(list)  # (method, rid) -> next
        self.on_call: dict[str, Callable[[list[str]], None]] = {}
        self.renewals: list[tuple[str, int, int]] = []
        self.exclusions: list[tuple[str, int, int]] = []
        self.verifiers: list[dict[str, str] | None] = []  # per PREPARE round
        self.hashed_on: list[str | None] = []  # per PREPARE round
        self.nodes: dict[str, str] = {}  # rid -> the node its votes name

    # -- scripting

    def lose(self, method: str, rid: str, times: int = 1,
             kind: FailureKind = FailureKind.UNAVAILABLE) -> None:
        self.fail[(method, rid)].extend(Failed(kind, f"replica {rid}: lost {method}") for _ in range(times))

    def _failure(self, method: str, rid: str) -> Failed | None:
        if rid not in self.replicas:
            return Failed(FailureKind.UNKNOWN, f"replica {rid}: no handle")
        queue = self.fail.get((method, rid))
        return queue.pop(0) if queue else None

    def _each(self, method: str, rids: list[str], act: Callable[[FakeReplica], Any],
              on_reply: OnReply | None = None) -> dict[str, Any]:
        self.calls.append((method, tuple(rids)))
        if method in self.on_call:
            self.on_call[method](list(rids))
        out = {}
        for rid in rids:
            out[rid] = self._failure(method, rid) or act(self.replicas[rid])
            if on_reply is not None:
                on_reply(rid, out[rid])
        return out

    def methods(self) -> list[str]:
        return [m for m, _ in self.calls]

    # -- ReplicaClient

    def attach(self, rid: str) -> bool:
        return rid in self.replicas

    def forget(self, rid: str) -> None:
        self.replicas.pop(rid, None)

    def prefetch(self, rids: list[str], tag: str, refs: list[Any], specs: dict[str, Any],
                 verifiers: dict[str, str] | None, hashed_on: str | None = None) -> None:
        self.calls.append(("prefetch", tuple(rids)))

    def withdraw(self, rids: list[str], tag: str) -> None:
        self.calls.append(("withdraw", tuple(rids)))

    def handles(self, rids: list[str]) -> dict[str, Any]:
        return {rid: self.replicas[rid] for rid in rids if rid in self.replicas}

    def prepare(self, rids: list[str], timeout: float, epoch: int, txn: str, version: int,
                refs: list[Any] | None, specs: dict[str, Any], checksums: dict[str, str],
                source: dict[str, Any] | None, base_version: int | None,
                on_reply: OnReply | None = None,
                verifiers: dict[str, str] | None = None,
                probes: list[Any] | None = None,
                hashed_on: str | None = None) -> dict[str, PrepareReply | Failed]:
        self.verifiers.append(verifiers)
        self.hashed_on.append(hashed_on)
        def vote(r: FakeReplica) -> PrepareReply:
            if r.vote_no:
                return PrepareReply(r.rid, txn, False, r.vote_no, r.version)
            r.staged[txn] = version
            return PrepareReply(r.rid, txn, True, "", r.version, {"prepare_s": 0.001},
                                self.nodes.get(r.rid, ""))
        return self._each("prepare", rids, vote, on_reply)

    def commit(self, rids: list[str], timeout: float, epoch: int, txn: str,
               on_reply: OnReply | None = None, *, activate: bool = True) -> dict[str, Ack | Failed]:
        def ack(r: FakeReplica) -> Ack | Failed:
            if txn in r.active:
                return Ack(r.rid, txn, r.version, "active")
            if txn not in r.staged:
                return Failed(FailureKind.ERROR, f"replica {r.rid}: ProtocolViolation: never prepared")
            if not activate:
                return Ack(r.rid, txn, r.version, "committed")
            r.version = r.staged.pop(txn)
            r.active.add(txn)
            return Ack(r.rid, txn, r.version, "active")
        return self._each("commit", rids, ack, on_reply)

    def abort(self, rids: list[str], timeout: float, epoch: int, txn: str, reason: str,
              on_reply: OnReply | None = None) -> dict[str, Ack | Failed]:
        def ack(r: FakeReplica) -> Ack:
            r.staged.pop(txn, None)
            return Ack(r.rid, txn, r.version, "aborted")
        return self._each("abort", rids, ack, on_reply)

    def catch_up(self, rids: list[str], version: int, timeout: float) -> dict[str, Ack | Failed]:
        def sync(r: FakeReplica) -> Ack | Failed:
            if r.catch_up_fails:
                r.state, r.error = "failed", r.catch_up_fails
                return Failed(FailureKind.ERROR, f"replica {r.rid}: {r.catch_up_fails}")
            r.version, r.state, r.staged = version, "serving", {}
            return Ack(r.rid, None, version, "serving")
        return self._each("catch_up", rids, sync)

    def status(self, rids: list[str], timeout: float) -> dict[str, dict[str, Any] | Failed]:
        return self._each("status", rids, lambda r: {"id": r.rid, "version": r.version, "state": r.state,
                                                      "retained": [] if r.state == "failed" else [r.version]})

    def export(self, rid: str, version: int, timeout: float) -> Exported | None | Failed:
        def put(r: FakeReplica) -> tuple[list[Any], dict[str, Any]] | None:
            return ([f"exported-v{version}-by-{r.rid}"], {}) if r.version == version else None
        return self._each("export", [rid], put)[rid]

    def renew(self, rid: str, epoch: int, lease_s: float, generation: int,
              on_reply: Callable[[str, LeaseReply | Failed], None] | None = None,
              cohort: str = "main") -> None:
        r = self.replicas.get(rid)
        if r is None:
            return
        self.renewals.append((rid, epoch, generation))
        accepted = (epoch, generation) >= r.lease
        if accepted:
            r.lease = (epoch, generation)
        if on_reply is not None:
            on_reply(rid, LeaseReply(rid, accepted, r.version, r.state, r.error, tuple(r.staged)))

    def exclude(self, rid: str, epoch: int, generation: int) -> None:
        self.exclusions.append((rid, epoch, generation))
        r = self.replicas.get(rid)
        if r is not None and (epoch, generation) >= r.lease:
            r.lease, r.excluded_by = (epoch, generation), (epoch, generation)

    def ping(self, rid: str, timeout: float) -> bool:
        return rid in self.replicas

    def drain(self, rid: str, timeout: float) -> int | Failed:
        return 0

    def kill(self, rid: str) -> None:
        self.replicas.pop(rid, None)


class FakePersister:
    """Stands in for the persistence worker: ``error`` makes every write fail with it; ``fail_next``
    only the next ones; ``written`` lists the versions written."""

    def __init__(self) -> None:
        self.jobs: list[PersistJob] = []
        self.error = ""
        self.fail_next: list[str] = []
        self.written: list[int] = []
        self.raise_on_wait: BaseException | None = None
        self.hold: Any = None  # a threading.Event: writes wait until it is set
        self.raise_on_start: list[BaseException] = []  # the next starts raise these

    def ensure(self) -> None:
        pass

    def start(self, job: PersistJob) -> PersistJob:
        if self.raise_on_start:
            raise self.raise_on_start.pop(0)
        self.jobs.append(job)
        return job

    def wait(self, pending: PersistJob, deadline: float) -> tuple[dict[str, float], str]:
        if self.hold is not None:
            self.hold.wait(30)
        if self.raise_on_wait is not None:
            raise self.raise_on_wait
        if self.error:
            return {}, self.error
        if self.fail_next:
            return {}, self.fail_next.pop(0)
        self.written.append(pending.version)
        return {"write_s": 0.001}, ""


class FakeRetention:
    def __init__(self) -> None:
        self.scheduled: list[tuple[set[int], int]] = []
        self.dropped: list[int] = []

    def schedule(self, keep: set[int], below: int) -> None:
        self.scheduled.append((keep, below))

    def drop(self, version: int) -> None:
        self.dropped.append(version)

    def later(self, work: Any) -> None:
        work()
