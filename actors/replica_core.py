"""A replica's weights and its part in refits, without Ray: the engine, the transaction records
(which hold the staged sets), and the replica's lifecycle. The ``Replica`` actor is a thin shell
around it; tests drive it directly.

Contract:
- Every protocol move runs under one lock (``ctl``), except the fetch, verify and stage of a
  PREPARE, which run outside it so COMMIT/ABORT of other transactions are not held up.
- ``prepare`` never raises: every failure is a NO vote with its reason. A PREPARE of a known
  transaction answers from its record and changes nothing (YES only while it is still PREPARED).
  A partial refit built on a version this replica does not serve is refused, and so is any
  PREPARE while the replica is ``failed`` (it could not load its weights).
- A PREPARE's tensors must match the caller's checksums: packed small tensors hashed where they
  lie in their bucket, the others by the engine as it copies them (a mismatch stages nothing);
  their values are not scanned again for NaN/Inf (the caller refused those before the put, and
  the checksums prove the bytes are the ones it checked). In ``shared`` mode the staged set
  serves the fetched object-store copy itself. A PREPARE with ``verify=False`` stages without
  hashing: the node's one object-store copy is the one another member of this node verifies
  (its YES vote is needed for the commit all the same); checksums guard what crossed the object
  store, and this replica's own copy of it (swap, copy) is trusted as any memory copy is.
- Every staged set lives in its transaction's record; every move that ends a record's hold on it
  (ABORTED, SUPERSEDED, an epoch change, ACTIVE) frees or commits it right there.
- Buckets announced ahead of their PREPARE are fetched, copied and hashed in the background
  (``actors.prefetch``); a PREPARE adopts those of its own refs, checked against its checksums
  like the rest. Only ``swap`` mode without a memory budget copies ahead, and ``shared`` mode
  hashes ahead; ``copy`` mode stages at PREPARE only.
- ``sync`` serves exactly the given version, supersedes every staged set, and leaves the lifecycle
  ``serving`` (``draining`` stays draining), or ``failed`` with the reason and raises. The set
  comes from a live peer named by the coordinator's ``CatchUpPlan`` (checksums verified against
  the plan's), else from the checkpoint store (verified against its manifest): ``actors.catch_up``.
  ``caught_up`` says which.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from engines.checksum import ChecksumMismatch, ChecksumMissing
from engines.config import MemoryMode
from engines.errors import NotRetainedError

from .catch_up import ENGINE_FILE, PEER, STORE, CatchUpPlan, CaughtUp
from .failpoints import Failpoints
from .payload import Wire, from_wire, packed_checksums, spec_dict, staged_from_wire, to_wire
from .prefetch import Prefetcher
from .replica_protocol import (
    Lifecycle,
    ProtocolViolation,
    ReplicaLifecycle,
    ReplicaParticipant,
    TxnRecord,
    TxnState,
)
from .replies import Ack, PrepareReply
from .store import CheckpointStore
from .telemetry import phase_log

if TYPE_CHECKING:
    from engines import Engine, StagedSet

__all__ = ["ReplicaCore"]

Fetch = Callable[[list[Any]], list[Any]]  # refs -> buckets (``actors.payload``)
FromPeer = Callable[[str, int], "tuple[list[Any], dict[str, Any]] | None"]  # (peer, version) -> export


def reason_of(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class ReplicaCore:
    def __init__(self, replica_id: str, load_engine: Callable[[], Engine], store: CheckpointStore,
                 fetch: Fetch, fp: Failpoints) -> None:
        self.replica_id = replica_id
        self._load_engine = load_engine
        self.store = store
        self._fetch = fetch
        self.node = ""  # the Ray node this replica runs on (set by the actor)
        self.fp = fp
        self.engine = load_engine()
        self.participant = ReplicaParticipant()
        self.lifecycle = ReplicaLifecycle()
        self.ctl = threading.RLock()
        self.last_refit_at: float | None = None
        self.on_version: Callable[[int], None] = lambda version: None
        self.from_peer: FromPeer = lambda peer, version: None  # a peer's ``export`` (set by the actor)
        self.caught_up = CaughtUp(self.engine.version, ENGINE_FILE)
        self.prefetch = Prefetcher(lambda ref, specs: from_wire(self._fetch([ref])[0], specs),
                                   self._prestage, lambda buffers: self.engine.release_prestaged(buffers))
        self.prefetch_wait_s = 30.0  # how long a PREPARE waits for a bucket's copy under way

    # ------------------------------------------------------------------ prefetch

    def can_prefetch(self) -> bool:
        mode, budget = self.engine.config.memory_mode, self.engine.config.memory_budget_bytes
        return self.lifecycle.state is not Lifecycle.FAILED and (
            mode is MemoryMode.SHARED or (mode is MemoryMode.SWAP and budget is None))

    def _prestage(self, tensors: dict[str, Any],
                  verify: bool) -> tuple[dict[str, tuple[Any, str | None]], bool] | None:
        """Swap mode: copies in the engine's buffers (hashed as copied when ``verify``); shared
        mode: the fetched views, hashed now when ``verify`` (nothing is copied there)."""
        copies = self.engine.prestage(tensors, checksum=verify)
        if copies is not None:
            return copies, True
        if self.engine.config.memory_mode is not MemoryMode.SHARED:
            return None
        from engines.validation import parallel_checksums  # torch: not on the coordinator's imports

        sums = parallel_checksums(tensors) if verify else {}
        return {n: (t, sums.get(n)) for n, t in tensors.items()}, False

    # ------------------------------------------------------------------ catch-up

    def sync(self, version: int, plan: CatchUpPlan | None = None) -> Ack:
        with self.ctl:
            t = time.perf_counter()
            self._sync(version, plan if plan is not None and plan.version == version else None)
            took = time.perf_counter() - t
            phase_log("replica", "sync", None, self.engine.version, took, replica=self.replica_id)
            return Ack(self.replica_id, None, self.engine.version, self.lifecycle.state.value,
                       {"sync_s": took})

    def _sync(self, version: int, plan: CatchUpPlan | None) -> None:
        if self.engine.version == version and self.lifecycle.state in (Lifecycle.SERVING,
                                                                       Lifecycle.DRAINING):
            return
        self.lifecycle.move(Lifecycle.CATCHING_UP)
        self.prefetch.forget()
        try:
            if self.engine.version != version:
                self._free(self.participant.supersede_all(f"caught up to v{version}"))
                if version < self.engine.version:
                    self.engine = self._load_engine()  # versions only grow within one engine
                    self.caught_up = CaughtUp(self.engine.version, ENGINE_FILE)
                if version != self.engine.version:
                    staged, self.caught_up = self._fetch_set(version, plan)
                    self.engine.commit(staged)
                self.on_version(self.engine.version)
        except Exception as exc:
            self.lifecycle.move(Lifecycle.FAILED, reason_of(exc))
            raise
        self.lifecycle.move(Lifecycle.SERVING)

    def _fetch_set(self, version: int, plan: CatchUpPlan | None) -> tuple[StagedSet, CaughtUp]:
        """The staged set of ``version`` from the first source that has it, checked."""
        t = time.perf_counter()
        skipped: list[str] = []
        for peer in plan.peers_for(self.replica_id, self.node) if plan else []:
            try:
                staged = self._from_peer(peer.replica, version, plan.checksums)  # type: ignore[union-attr]
            except Exception as exc:  # noqa: BLE001  (the next source is tried; the reason is kept)
                skipped.append(f"{peer.replica}: {reason_of(exc)}")
                continue
            return staged, CaughtUp(version, PEER, peer.replica, peer.node == self.node,
                                    time.perf_counter() - t, tuple(skipped))
        staged = self.engine.stage(self.store.load(version), version)
        return staged, CaughtUp(version, STORE, seconds=time.perf_counter() - t, skipped=tuple(skipped))

    def _from_peer(self, peer: str, version: int, checksums: dict[str, str]) -> StagedSet:
        exported = self.from_peer(peer, version)
        if exported is None:
            raise LookupError(f"does not hold v{version}")
        refs, specs = exported
        if set(specs) != set(checksums):  # a partial set would build on this replica's own
            odd = sorted(set(specs) ^ set(checksums))
            raise ProtocolViolation(f"its v{version} differs from the committed set in {odd[:3]}")
        # its own copy: the peer's object may go when the peer does
        return self._stage(version, refs, specs, checksums, None, {}, borrow=False)

    # ------------------------------------------------------------------ PREPARE

    def prepare(self, epoch: int, txn: str, version: int, refs: list[Any] | None,
                specs: dict[str, Any], checksums: dict[str, str], source: dict[str, Any] | None,
                base_version: int | None, verify: bool = True,
                probes: list[Any] | None = None) -> PrepareReply:
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        with self.ctl:
            known = self.participant.get(txn)
            if known is not None:
                if known.state is TxnState.PREPARED:
                    return self._vote(txn, True, "", timings, t0)
                why = f"PREPARE repeated: already {known.state.value}"
                return self._vote(txn, False, f"{why}: {known.reason}" if known.reason else why, timings, t0)
            if self.lifecycle.state is Lifecycle.FAILED:
                return self._vote(txn, False, f"replica {self.replica_id} cannot serve: "
                                  f"{self.lifecycle.error}", timings, t0)
            try:
                self.fence(epoch)
                self.participant.begin_prepare(epoch, txn, version)
            except ProtocolViolation as exc:
                return self._vote(txn, False, reason_of(exc), timings, t0)
            self._free(self.participant.drop_older_undecided(epoch, version))
        try:
            if refs is not None and base_version is not None and self.engine.version != base_version \
                    and set(specs) != set(self.engine.manifest()):
                raise ProtocolViolation(f"replica {self.replica_id} serves v{self.engine.version}; "
                                        f"this partial refit builds on v{base_version}")
            staged = self._stage(version, refs, specs, checksums, source, timings, verify)
            if probes:
                self._probe(staged, probes, timings)
        except BaseException as exc:  # every failure is a NO vote, reported back
            with self.ctl:
                self.participant.finish_prepare(txn, False, reason_of(exc))
            return self._vote(txn, False, reason_of(exc), timings, t0)
        with self.ctl:
            if not self.participant.finish_prepare(txn, True, staged=staged):
                self.engine.discard(staged)
                return self._vote(txn, False, "aborted while preparing", timings, t0)
        self.fp.hit("replica.before_vote")
        vote = self._vote(txn, True, "", timings, t0)
        self.fp.hit("replica.after_vote")
        return vote

    def _probe(self, staged: StagedSet, probes: list[Any], timings: dict[str, float]) -> None:
        """The behaviour probes on the staged set (never the live one); a failure frees the set."""
        t = time.perf_counter()
        try:
            self.engine.check_probes(staged, probes)
        except BaseException:
            self.engine.discard(staged)
            raise
        finally:
            timings["probes_s"] = time.perf_counter() - t

    def _stage(self, version: int, refs: list[Any] | None, specs: dict[str, Any],
               checksums: dict[str, str], source: dict[str, Any] | None,
               timings: dict[str, float], verify: bool = True, borrow: bool = True) -> StagedSet:
        if source and source.get("from_version") is not None:
            from_version = int(source["from_version"])
            try:
                staged = self.engine.stage_retained(from_version, version)
                timings["retained"] = 1.0
                return staged
            except NotRetainedError:
                timings["from_store"] = 1.0
                return self.engine.stage(self.store.load(from_version), version)
        assert refs is not None
        t = time.perf_counter()
        allocated = self.engine.allocated_bytes
        ahead = self.prefetch.claim(refs, self.prefetch_wait_s)
        timings["prefetched"], timings["prefetch_wait_s"] = float(len(ahead)), time.perf_counter() - t
        adopt = {n for p in ahead.values() if p.copied for n in p.tensors}
        handed = False  # the prefetched copies are the engine's once stage() has them
        try:
            wires = self._fetch([r for i, r in enumerate(refs) if i not in ahead])
            timings["fetch_s"] = time.perf_counter() - t
            tensors, packed = staged_from_wire(wires, specs)
            for p in ahead.values():
                tensors.update(p.tensors)
            t = time.perf_counter()
            # packed tensors are hashed where they lie in their bucket, the others as they are
            # copied (one pass over the bytes), prefetched ones as they were; the store's copy is
            # immutable
            if not verify:  # a peer on this node verifies the object-store copy both read
                timings["verified"] = 0.0
                handed = True
                staged = self.engine.stage(tensors, version, borrow=borrow, values_checked=True,
                                           adopt=adopt, packed=packed)
                timings["stage_s"] = time.perf_counter() - t
                timings["allocated_bytes"] = float(self.engine.allocated_bytes - allocated)
                return staged
            try:
                hashed = [(n, c) for w in wires for n, c in packed_checksums(w).items()]
                hashed += [(n, c) for p in ahead.values() for n, c in p.checksums.items()]
                verified = self._match(hashed, checksums)
                handed = True
                staged = self.engine.stage(tensors, version, borrow=borrow, values_checked=True,
                                           checksums=checksums, verified=verified, adopt=adopt,
                                           packed=packed)
            except (ChecksumMismatch, ChecksumMissing) as exc:
                raise ChecksumMismatch(exc.name, str(checksums.get(exc.name)),
                                       getattr(exc, "actual", "no checksum"),
                                       f"replica {self.replica_id}") from None
            timings["stage_s"] = time.perf_counter() - t
            timings["allocated_bytes"] = float(self.engine.allocated_bytes - allocated)
            return staged
        finally:
            if not handed:
                self.prefetch.release(ahead)

    @staticmethod
    def _match(hashed: list[tuple[str, str]], checksums: dict[str, str]) -> set[str]:
        """The names of ``hashed`` (name, checksum got), each matched to its entry."""
        verified = set()
        for name, got in hashed:
            want = checksums.get(name)
            if want is None:
                raise ChecksumMissing(name)
            if got != want:
                raise ChecksumMismatch(name, want, got)
            verified.add(name)
        return verified

    def refuse(self, txn: str, reason: str) -> PrepareReply:
        """A NO vote for a PREPARE refused before it began (nothing staged, nothing recorded)."""
        return self._vote(txn, False, reason, {}, time.perf_counter())

    def _vote(self, txn: str, yes: bool, reason: str, timings: dict[str, float], t0: float) -> PrepareReply:
        timings["prepare_s"] = time.perf_counter() - t0
        rec = self.participant.get(txn)
        phase_log("replica", "prepare", txn, rec.version if rec else None, timings["prepare_s"],
                  replica=self.replica_id, vote="YES" if yes else "NO", reason=reason,
                  **{k: round(v, 6) for k, v in timings.items() if k != "prepare_s"})
        return PrepareReply(self.replica_id, txn, yes, reason, self.engine.version, timings, self.node)

    # ------------------------------------------------------------------ decisions

    def commit(self, epoch: int, txn: str) -> Ack:
        with self.ctl:
            t = time.perf_counter()
            self.fence(epoch, keep=txn)
            rec, _ = self.participant.commit(epoch, txn)
            phase_log("replica", "commit", txn, rec.version, time.perf_counter() - t, replica=self.replica_id)
            return Ack(self.replica_id, txn, self.engine.version, rec.state.value)

    def activate(self, epoch: int, txn: str) -> Ack:
        with self.ctl:
            t = time.perf_counter()
            self.fence(epoch, keep=txn)
            self._activate_locked(epoch, txn)
            took = time.perf_counter() - t
            phase_log("replica", "activate", txn, self.engine.version, took,
                      replica=self.replica_id, swap_ns=self.engine.last_swap_ns)
            return Ack(self.replica_id, txn, self.engine.version, TxnState.ACTIVE.value,
                       {"activate_s": took, "swap_ns": float(self.engine.last_swap_ns)})

    def activate_for(self, min_version: int) -> bool:
        """DESIGN step 5: a committed-not-active version a client has already seen goes live now.
        Gives up after 0.5 s if a protocol call holds the lock (the client tries another member)."""
        if not self.ctl.acquire(timeout=0.5):
            return False
        try:
            rec = self.participant.committed_at_least(min_version)
            if rec is None:
                return self.engine.version >= min_version
            self._activate_locked(None, rec.txn)
            return True
        finally:
            self.ctl.release()

    def _activate_locked(self, epoch: int | None, txn: str) -> None:
        rec = self.participant.get(txn)
        if rec is not None and rec.state is TxnState.ACTIVE:
            return
        if rec is None or rec.state is not TxnState.COMMITTED or rec.staged is None:
            if epoch is not None:
                self.participant.check_epoch(epoch)
            raise ProtocolViolation(f"txn {txn}: ACTIVATE needs a committed staged set here "
                                    f"(state {rec.state.value if rec else 'unknown'})")
        staged = rec.take_staged()
        self.fp.hit("replica.during_activate")
        try:
            self.engine.commit(staged)
        except BaseException:
            self.engine.discard(staged)
            raise
        self.participant.activate(epoch, txn)
        self.last_refit_at = time.time()
        self.on_version(self.engine.version)

    def abort(self, epoch: int, txn: str, reason: str) -> Ack:
        with self.ctl:
            t = time.perf_counter()
            self.fence(epoch)
            rec, _ = self.participant.abort(epoch, txn, reason)
            self._free([rec])
            phase_log("replica", "abort", txn, rec.version, time.perf_counter() - t,
                      replica=self.replica_id, reason=reason)
            return Ack(self.replica_id, txn, self.engine.version, rec.state.value)

    def export(self, version: int) -> tuple[Wire, dict[str, Any]] | None:
        """The weights of ``version`` as they travel (one bucket, ``actors.payload``) and their
        specs, if this replica holds it (live or retained); None if it does not. Under the lock,
        so no commit retires the set while it is being copied out."""
        with self.ctl:
            if version not in self.engine.retained_versions():
                return None
            weights = self.engine.weights(version)
            return to_wire(weights), spec_dict(weights)

    def fence(self, epoch: int, keep: str | None = None) -> None:
        """Refuse an older epoch (StaleEpoch); free what a newer one drops."""
        with self.ctl:
            self._free(self.participant.check_epoch(epoch, keep=keep))

    def _free(self, records: list[TxnRecord]) -> None:
        for rec in records:
            staged = rec.take_staged()
            if staged is not None:
                self.engine.discard(staged)
