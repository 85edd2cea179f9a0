"""The coordinator's log and the state it replays to, kept in step: a record is appended, then
folded into the in-memory ``LogState`` (the file is read once, at open).

Contract of ``append(record, deferrable=...)``:
- A record that decides something (EPOCH, BEGIN, COMMIT) either is in the log when ``append``
  returns or raises, and the state does not change.
- A *deferrable* record (ABORT, ACTIVATED, MEMBER) whose write fails (disk full, I/O error) is
  folded into the state anyway, kept in memory and written before the next record; ``append``
  then returns the error's description instead of raising. Losing one of them to a crash is
  already safe by the protocol (presumed abort; recovery re-finishes an un-ACTIVATED commit).
- Transactions aborted before their BEGIN reached the log are kept in memory (``refused``), so
  ``outcome`` and ``history`` still name them and their cause in this incarnation.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .durable import describe_os_error
from .failpoints import Failpoints
from .log import (
    AbortRecord,
    EpochRecord,
    HistoryEntry,
    LogRecord,
    LogState,
    Outcome,
    TxnLog,
    dump_record,
    replay,
)

logger = logging.getLogger("weight_refit.coordinator")

__all__ = ["Ledger"]


def describe_log_error(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return describe_os_error(exc, "writing the transaction log")
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


class Ledger:
    """See the module docstring."""

    def __init__(self, log: TxnLog) -> None:
        self._log = log
        self.state: LogState = log.state()
        self._deferred: list[LogRecord] = []
        self._refused: dict[str, HistoryEntry] = {}  # txn and key -> a refit refused before BEGIN
        self._lock = threading.RLock()

    @classmethod
    def open(cls, state_dir: str | Path, fp: Failpoints | None = None) -> Ledger:
        return cls(TxnLog.open(state_dir, fp=fp))

    def mirror_to(self, mirror: Any, data: bytes) -> None:
        """Copy the log to object storage from now on (``actors.log_mirror``): a new generation
        holding ``data`` (the log as opened), then every sync'd record before it counts."""
        mirror.start(data)
        self._log.mirror = mirror

    @property
    def epoch(self) -> int:
        return self._log.epoch

    @property
    def path(self) -> Path:
        return self._log.path

    @property
    def deferred(self) -> int:
        """Records folded into the state but not yet written (their write failed)."""
        return len(self._deferred)

    def cut_tails(self) -> list[Any]:
        return list(getattr(self._log, "cut_tails", []))

    def bump_epoch(self) -> int:
        with self._lock:
            epoch = self._log.bump_epoch()
            self.state.apply(EpochRecord(epoch=epoch))
            return epoch

    def append(self, record: LogRecord, *, deferrable: bool = False) -> str:
        """Append and fold ``record``; "" on success. See the module docstring."""
        with self._lock:
            try:
                self._flush_deferred()
                self._log.append(record)
            except Exception as exc:
                if not deferrable:
                    raise
                self._deferred.append(record)
                self.state.apply(record)
                why = describe_log_error(exc)
                logger.warning("could not log %s yet (%s): kept in memory, written with the next "
                               "record", record.kind, why)
                return why
            self.state.apply(record)
            return ""

    def _flush_deferred(self) -> None:
        while self._deferred:
            self._log.append(self._deferred[0])
            self._deferred.pop(0)

    ARCHIVE = "txn.archive.jsonl"

    def compact(self, keep_recent: int, keep_versions: set[int]) -> int:
        """Rewrite the log without transactions older than the newest ``keep_recent`` (those still
        needed stay: see ``LogState.compacted``); their records are appended to
        ``txn.archive.jsonl`` first. Returns how many records went to the archive (0: nothing to
        do, or records are waiting to be written)."""
        with self._lock:
            if self._deferred:
                return 0
            kept, dropped = self.state.compacted(keep_recent, keep_versions)
            if not dropped:
                return 0
            with open(self._log.path.with_name(self.ARCHIVE), "ab") as archive:
                archive.write(b"".join(dump_record(r) for r in dropped))
                archive.flush()
                os.fsync(archive.fileno())
            state = replay(kept)
            self._log.rewrite(kept)
            self.state = state
            return len(dropped)

    def refuse(self, txn: str, version: int, key: str | None, reason: str,
               origin_version: int | None = None) -> None:
        """Remember a transaction refused before its BEGIN could be logged."""
        entry = HistoryEntry(txn=txn, key=key, version=version, status="aborted",
                             reason=f"{reason} (not in the log)", duration_s=None, ts=time.time(),
                             activated=False, origin_version=origin_version)
        with self._lock:
            self._refused[txn] = entry
            if key is not None:
                self._refused.setdefault(key, entry)

    def abort_record(self, txn: str, reason: str, votes: dict[str, str]) -> AbortRecord:
        return AbortRecord(epoch=self.epoch, txn=txn, reason=reason, votes=votes)

    # -- queries

    def outcome(self, key_or_txn: str) -> Outcome | None:
        o = self.state.outcomes.get(key_or_txn)
        if o is not None:
            return o
        refused = self._refused.get(key_or_txn)
        if refused is None:
            return None
        return Outcome(txn=refused.txn, status="aborted", version=refused.version, key=refused.key,
                       reason=refused.reason)

    def history(self) -> list[dict[str, Any]]:
        rows = [asdict(h) for h in self.state.history]
        seen = set()
        for entry in self._refused.values():
            if entry.txn not in seen:
                seen.add(entry.txn)
                rows.append(asdict(entry))
        return sorted(rows, key=lambda r: r["ts"])

    def close(self) -> None:
        self._log.close()
