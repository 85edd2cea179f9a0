"""Seeing committed versions' checkpoints through under ``durability: replicated`` (plain Python:
Ray only behind the persister and the ``export`` callable it is given).

Under ``replicated``, COMMIT is logged once every member holds the verified staged set; the
checkpoint write follows in the background, started once the members serve the version (or
at once when some must catch up from the store: they wait for it).
``PersistTracker`` (contract):
- ``start(txn, version, job)`` hands it a committed version's write to start (on its own thread,
  so the refit does not wait for the worker) and see through; ``track(txn, version, pending)`` a
  write already in flight. Writes are seen through in commit order, and each one that lands is
  logged as PERSISTED.
- A write that fails (a full disk, a lost worker, a driver whose published object is gone) is
  redone from a live holder: ``export(version)`` asks the members for the set they hold and
  returns ``(job, nobody_holds)``: a job that writes it (verified against the version's
  checksums), or None; ``nobody_holds`` is True only when every member answered and none holds
  it. It is retried every ``retry_s``. Writes are tracked once the members serve the version.
  When nobody holds a version any more (twice in a row, ``retry_s`` apart) it is given up: an
  older one is superseded by a newer one; the newest committed one is reported to ``on_lost``
  (the coordinator then moves the fleet to a new version re-installing the newest persisted
  weights).
- ``wait(version, timeout)`` returns once the version is persisted (True) or at the timeout.
- ``on_persisted()`` runs after each PERSISTED record (the coordinator compacts a log that could
  not drop versions while they were unpersisted).
- ``discard(version, pending)``: an aborted transaction's write; its files are dropped once the
  write ended, so that a late write cannot leave a version behind.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from .ledger import Ledger
from .log import PersistedRecord
from .membership import Membership
from .persist import PersistJob
from .replica_client import ReplicaClient
from .settings import CoordinatorSettings, Timeouts
from .store import CheckpointStore

logger = logging.getLogger("weight_refit.coordinator")

__all__ = ["PersistTracker", "export_job", "newest_stored"]


def export_job(version: int, *, ledger: Ledger, client: ReplicaClient, membership: Membership,
               settings: CoordinatorSettings, timeouts: Timeouts) -> tuple[PersistJob | None, bool]:
    """A job writing ``version`` from a replica that holds it; ``(None, nobody_holds)`` when none
    could give it (``nobody_holds``: every replica answered and none holds it)."""
    info = ledger.state.versions.get(version)
    if info is None:
        return None, False
    statuses = client.status(membership.members() + membership.excluded(), timeouts.request_s)
    holders = [rid for rid, st in statuses.items()
               if isinstance(st, dict) and version in (st.get("retained") or [])]
    for rid in holders:
        got = client.export(rid, version, timeouts.prepare_s)
        if isinstance(got, tuple):
            refs, specs = got
            return PersistJob(state_dir=settings.state_dir, version=version, refs=refs, specs=specs,
                              checksums=dict(info.checksums), base_version=None, from_version=None,
                              fsync=settings.persist_fsync, state_options=settings.state_options), False
    answered = all(isinstance(st, dict) for st in statuses.values())
    return None, answered and not holders


def newest_stored(ledger: Ledger, store: CheckpointStore, below: int) -> tuple[int, dict[str, str]]:
    """The newest persisted version below ``below`` that the store holds, and its checksums."""
    for v in sorted({0, *ledger.state.versions}, reverse=True):
        if v < below and ledger.state.is_persisted(v) and store.has(v):
            return v, store.manifest(v).checksums
    raise RuntimeError(f"no persisted version below v{below} is in the checkpoint store")


class PersisterLike(Protocol):
    def ensure(self) -> None: ...
    def start(self, job: PersistJob) -> Any: ...
    def wait(self, pending: Any, deadline: float) -> tuple[dict[str, float], str]: ...


@dataclass
class _Write:
    txn: str
    version: int
    pending: Any  # None: ``job`` is still to be started
    discard: bool = False
    job: PersistJob | None = None


class PersistTracker:
    """See the module docstring."""

    def __init__(self, persister: PersisterLike, ledger: Ledger, *, persist_s: float, retry_s: float,
                 export: Callable[[int], tuple[PersistJob | None, bool]], drop: Callable[[int], None],
                 on_lost: Callable[[str, int, str], None], stop: threading.Event,
                 on_persisted: Callable[[], None] = lambda: None) -> None:
        self._persister = persister
        self._on_persisted = on_persisted
        self._ledger = ledger
        self._persist_s = persist_s
        self._retry_s = retry_s
        self.export = export
        self._drop = drop
        self._on_lost = on_lost
        self._stop = stop
        self._queue: queue.Queue[_Write] = queue.Queue()
        self._cond = threading.Condition()
        self.failing: dict[int, str] = {}  # version -> why its checkpoint is not written yet
        self.given_up: dict[int, str] = {}
        self._busy = 0
        threading.Thread(target=self._run, name="persist-tracker", daemon=True).start()

    def track(self, txn: str, version: int, pending: Any) -> None:
        with self._cond:
            self._busy += 1
        self._queue.put(_Write(txn, version, pending))

    def start(self, txn: str, version: int, job: PersistJob) -> None:
        with self._cond:
            self._busy += 1
        self._queue.put(_Write(txn, version, None, job=job))

    def discard(self, version: int, pending: Any) -> None:
        with self._cond:
            self._busy += 1
        self._queue.put(_Write("", version, pending, discard=True))

    def persisted(self, version: int) -> bool:
        return self._ledger.state.is_persisted(version)

    def wait(self, version: int, timeout: float, *, unless_failing: bool = False) -> bool:
        """True once ``version`` is persisted; False at the timeout, when it was given up, or (with
        ``unless_failing``) as soon as some write is failing (a full disk: no use waiting)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self.persisted(version) and version not in self.given_up:
                if unless_failing and self.failing:
                    return False
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 1.0))
        return self.persisted(version)

    def idle(self) -> bool:
        with self._cond:
            return self._busy == 0

    def summary(self) -> dict[str, Any]:
        return {"unpersisted": [v for _, v in self._ledger.state.unpersisted],
                "failing": dict(self.failing), "given_up": dict(self.given_up)}

    # -- the thread

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                if item.discard:
                    self._persister.wait(item.pending, time.monotonic() + self._persist_s)
                    self._drop(item.version)
                else:
                    self._see_through(item)
            except Exception:  # noqa: BLE001  (one bad write must not stop the others)
                logger.exception("persisting v%s failed unexpectedly", item.version)
            finally:
                with self._cond:
                    self._busy -= 1
                    self._cond.notify_all()

    def _see_through(self, item: _Write) -> None:
        error = ""
        if item.pending is None and item.job is not None:
            try:  # a worker that died meanwhile is replaced by ``wait`` (and the write retried)
                item.pending = self._persister.start(item.job)
            except Exception as exc:  # noqa: BLE001  (redone from a replica below)
                error = f"the checkpoint write could not start: {type(exc).__name__}: {exc}"
            item.job = None  # the refs: the worker's now, or released
        if item.pending is not None:
            _, error = self._persister.wait(item.pending, time.monotonic() + self._persist_s)
        misses = 0  # answers, in a row, that nobody holds the version
        while error and not self._stop.is_set():
            self.failing[item.version] = error
            logger.warning("checkpoint of v%s not written (%s): writing it from a replica",
                           item.version, error)
            job, nobody_holds = self.export(item.version)
            if job is not None:
                _, error = self._persister.wait(self._persister.start(job),
                                                time.monotonic() + self._persist_s)
                if not error:
                    break
                self.failing[item.version] = error
            elif nobody_holds and (misses := misses + 1) >= 2:
                self.given_up[item.version] = f"{error}; no replica holds it any more"
                self.failing.pop(item.version, None)
                logger.error("checkpoint of v%s given up: %s", item.version, self.given_up[item.version])
                if item.version == max(self._ledger.state.versions, default=0):
                    self._on_lost(item.txn, item.version, self.given_up[item.version])
                return
            self._stop.wait(self._retry_s)
        if error or self._stop.is_set():  # stopping: the coordinator closes its log
            return
        self.failing.pop(item.version, None)
        self._ledger.append(PersistedRecord(epoch=self._ledger.epoch, txn=item.txn, version=item.version),
                            deferrable=True)
        self._on_persisted()
