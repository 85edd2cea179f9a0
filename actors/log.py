"""The coordinator's durable transaction log: an append-only JSON-lines file ``<state_dir>/txn.log``.

One record per line, each written with a single ``write()`` on an ``O_APPEND`` descriptor while
holding an exclusive ``flock`` on the file. Only newline-terminated lines count: an unterminated last
line is a torn write from a crash and is ignored (and cut off by the next writer that takes the lock);
any other unparseable line is corruption (``LogCorrupted``, naming the line).

Epoch fencing: every coordinator incarnation calls ``bump_epoch()`` before it sends anything; an
append whose record carries an epoch lower than the highest EPOCH in the file raises ``StaleEpoch``.
The check reads the file's new tail under the same lock as the write, so two incarnations appending
to one file are fenced exactly (on a filesystem where ``flock`` works across the writers).

``replay(records)`` is a pure function from records to ``LogState`` (presumed abort, idempotency
keys, committed-but-not-activated transactions to finish).
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from actors.durable import fsync_dir
from engines.checksum import set_digest

__all__ = [
    "AbortRecord",
    "ActivatedRecord",
    "BeginRecord",
    "CommitRecord",
    "EpochRecord",
    "HistoryEntry",
    "LOG_NAME",
    "LogCorrupted",
    "LogRecord",
    "LogState",
    "MemberRecord",
    "Outcome",
    "StaleEpoch",
    "TxnLog",
    "VersionInfo",
    "replay",
]

LOG_NAME = "txn.log"


# --------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    epoch: int = Field(ge=0)
    ts: float = Field(default_factory=time.time)


class EpochRecord(_Record):
    """A coordinator incarnation starts: every later record from a lower epoch is fenced out."""

    kind: Literal["EPOCH"] = "EPOCH"


class BeginRecord(_Record):
    """A transaction starts with its version number (assigned now, kept even if it aborts).

    ``checksums`` should describe the full (materialised) weight set of the version, so ``digest``
    compares with other versions; ``digest`` is computed from ``checksums`` when left empty.
    ``origin_version`` is set for a rollback: the version whose weights it re-installs.
    """

    kind: Literal["BEGIN"] = "BEGIN"
    txn: str
    version: int = Field(ge=1)
    key: str | None = None
    digest: str = ""
    checksums: dict[str, str] = Field(default_factory=dict)
    origin_version: int | None = None

    @model_validator(mode="before")
    @classmethod
    def _fill_digest(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("digest") and isinstance(data.get("checksums"), dict):
            data = {**data, "digest": set_digest(data["checksums"])}
        return data


class CommitRecord(_Record):
    """The commit point of a transaction (must be appended with fsync)."""

    kind: Literal["COMMIT"] = "COMMIT"
    txn: str
    version: int = Field(ge=1)


class AbortRecord(_Record):
    """A transaction aborted; ``votes`` maps replica id -> its vote or failure reason."""

    kind: Literal["ABORT"] = "ABORT"
    txn: str
    reason: str
    votes: dict[str, str] = Field(default_factory=dict)


class ActivatedRecord(_Record):
    """Every member activated a committed version: it is now the fleet's active version."""

    kind: Literal["ACTIVATED"] = "ACTIVATED"
    txn: str
    version: int = Field(ge=1)
    duration_s: float


class MemberRecord(_Record):
    """A membership change."""

    kind: Literal["MEMBER"] = "MEMBER"
    replica_id: str
    event: Literal["join", "leave", "evict"]


LogRecord = Annotated[
    EpochRecord | BeginRecord | CommitRecord | AbortRecord | ActivatedRecord | MemberRecord,
    Field(discriminator="kind"),
]
_RECORD_ADAPTER: TypeAdapter[LogRecord] = TypeAdapter(LogRecord)

_MUST_FSYNC = ("EPOCH", "COMMIT")


def parse_record(line: str | bytes) -> LogRecord:
    """Parse one JSON line into its record type (raises pydantic ValidationError)."""
    return _RECORD_ADAPTER.validate_json(line)


def dump_record(record: LogRecord) -> bytes:
    """Serialise a record as one JSON line, newline included."""
    return record.model_dump_json().encode() + b"\n"


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


class LogCorrupted(Exception):
    """A log line (other than a torn last line) cannot be parsed or makes no sense on replay.

    Attributes: ``path`` (None when replaying in memory), ``line`` (1-based), ``detail``.
    """

    def __init__(self, path: str | None, line: int, detail: str) -> None:
        super().__init__(path, line, detail)
        self.path = path
        self.line = line
        self.detail = detail

    def __str__(self) -> str:
        where = f"{self.path}:" if self.path else "record "
        return f"transaction log corrupted at {where}{self.line}: {self.detail}"


class StaleEpoch(Exception):
    """An append from an older coordinator incarnation: the log has moved to a higher epoch."""

    def __init__(self, record_epoch: int, log_epoch: int) -> None:
        super().__init__(record_epoch, log_epoch)
        self.record_epoch = record_epoch
        self.log_epoch = log_epoch

    def __str__(self) -> str:
        return (
            f"stale epoch {self.record_epoch}: the transaction log is at epoch {self.log_epoch} "
            "(a newer coordinator took over)"
        )


# --------------------------------------------------------------------------------------------------
# The log file
# --------------------------------------------------------------------------------------------------


def _parse_lines(data: bytes, path: str | None, first_line: int) -> tuple[list[LogRecord], int]:
    """Parse the newline-terminated lines of ``data``. Returns (records, bytes consumed).

    An unterminated tail is not consumed (it is a torn or in-flight write).
    """
    records: list[LogRecord] = []
    end = data.rfind(b"\n") + 1
    if end == 0:
        return records, 0
    for i, raw in enumerate(data[:end].split(b"\n")[:-1]):
        try:
            records.append(parse_record(raw))
        except ValueError as e:  # pydantic's ValidationError included
            raise LogCorrupted(path, first_line + i, f"{_describe(e)}: {raw[:120]!r}") from None
    return records, end


def _describe(e: ValueError) -> str:
    if isinstance(e, ValidationError):
        errs = e.errors()
        if errs:
            loc = ".".join(str(x) for x in errs[0].get("loc", ()))
            return f"{errs[0].get('msg', 'invalid record')}" + (f" at {loc}" if loc else "")
    return str(e) or type(e).__name__



_fdatasync = getattr(os, "fdatasync", os.fsync)


class TxnLog:
    """Append-only, epoch-fenced JSON-lines transaction log at ``<state_dir>/txn.log``.

    Contract:
    - ``records()`` re-reads the whole file; an unterminated last line is ignored, any other bad
      line raises ``LogCorrupted`` naming its 1-based line number.
    - ``append(record, fsync=...)`` writes one line with one ``write()`` under an exclusive
      ``flock``; EPOCH and COMMIT records must be appended with ``fsync=True`` (ValueError
      otherwise), and return only once durable. It raises ``StaleEpoch`` if the record's epoch is
      lower than the highest EPOCH in the file (read from disk under the lock), ValueError if it is
      higher (an epoch that was never bumped).
    - ``bump_epoch()`` durably appends EPOCH(highest in file + 1) and adopts it as ``epoch``.
    - Thread-safe; several processes may hold the same file open.
    """

    def __init__(self, path: Path, fd: int) -> None:
        self._path = path
        self._fd = fd
        self._lock = threading.Lock()
        self._offset = 0  # bytes of the file parsed so far (always at a line boundary)
        self._lines = 0  # complete lines parsed so far
        self._file_epoch = 0  # highest EPOCH seen in the file
        self._epoch = 0  # this incarnation's epoch (after bump_epoch); file's highest at open

    @classmethod
    def open(cls, state_dir: Path | str) -> TxnLog:
        """Open (creating the directory and the file if needed) the log in ``state_dir``."""
        state_dir = Path(state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        path = state_dir / LOG_NAME
        created = not path.exists()
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        if created:
            os.fsync(fd)
            fsync_dir(state_dir)
        log = cls(path, fd)
        try:
            with log._locked():
                log._refresh(cut_torn_tail=True)
        except BaseException:
            log._fd = -1
            os.close(fd)
            raise
        log._epoch = log._file_epoch
        return log

    # -- properties ------------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self._path

    @property
    def epoch(self) -> int:
        """This incarnation's epoch: set by ``bump_epoch``; the file's highest epoch at open."""
        return self._epoch

    @property
    def file_epoch(self) -> int:
        """The highest EPOCH this object has seen in the file (refreshed on every append)."""
        return self._file_epoch

    # -- reading ---------------------------------------------------------------------------------

    def records(self) -> list[LogRecord]:
        """All complete records in the file, in order (a torn last line is ignored)."""
        self._check_open()
        data = self._read(0)
        records, _ = _parse_lines(data, str(self._path), 1)
        return records

    def state(self) -> LogState:
        """``replay(self.records())``."""
        return replay(self.records())

    # -- writing ---------------------------------------------------------------------------------

    def append(self, record: LogRecord, *, fsync: bool) -> None:
        """Append one record (see the class contract for fencing and fsync rules)."""
        self._check_open()
        if record.kind in _MUST_FSYNC and not fsync:
            raise ValueError(f"{record.kind} records must be appended with fsync=True")
        line = dump_record(record)
        with self._locked():
            self._refresh(cut_torn_tail=True)
            if record.epoch < self._file_epoch:
                raise StaleEpoch(record.epoch, self._file_epoch)
            if isinstance(record, EpochRecord):
                if record.epoch <= self._file_epoch:
                    raise StaleEpoch(record.epoch, self._file_epoch)
            elif record.epoch > self._file_epoch:
                raise ValueError(
                    f"record epoch {record.epoch} is above the log's epoch {self._file_epoch}: "
                    "call bump_epoch() first"
                )
            self._write(line, fsync)
            if isinstance(record, EpochRecord):
                self._file_epoch = self._epoch = record.epoch

    def bump_epoch(self) -> int:
        """Durably start a new epoch (highest in the file + 1), adopt it and return it."""
        self._check_open()
        with self._locked():
            self._refresh(cut_torn_tail=True)
            epoch = self._file_epoch + 1
            self._write(dump_record(EpochRecord(epoch=epoch)), True)
            self._file_epoch = epoch
            self._epoch = epoch
        return epoch

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> TxnLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        fd = getattr(self, "_fd", -1)
        if fd >= 0:
            os.close(fd)

    # -- internals -------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._fd < 0:
            raise ValueError(f"transaction log {self._path} is closed")

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._lock:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _read(self, offset: int) -> bytes:
        size = os.fstat(self._fd).st_size
        chunks: list[bytes] = []
        while offset < size:
            chunk = os.pread(self._fd, min(size - offset, 1 << 24), offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
        return b"".join(chunks)

    def _refresh(self, *, cut_torn_tail: bool) -> None:
        """Parse lines appended since our last read (by anyone). Caller holds the lock."""
        size = os.fstat(self._fd).st_size
        if size < self._offset:  # shrank under us: start over
            self._offset = self._lines = self._file_epoch = 0
        if size == self._offset:
            return
        data = self._read(self._offset)
        records, consumed = _parse_lines(data, str(self._path), self._lines + 1)
        for r in records:
            if isinstance(r, EpochRecord):
                self._file_epoch = max(self._file_epoch, r.epoch)
        self._offset += consumed
        self._lines += len(records)
        if cut_torn_tail and consumed < len(data):
            # We hold the exclusive lock, so no writer is mid-line: the tail is a torn write.
            os.ftruncate(self._fd, self._offset)
            _fdatasync(self._fd)

    def _write(self, line: bytes, fsync: bool) -> None:
        n = os.write(self._fd, line)
        if n != len(line):  # a short write (disk full): leaves a torn tail, cut by the next writer
            raise OSError(f"short write to {self._path}: {n} of {len(line)} bytes")
        if fsync:
            _fdatasync(self._fd)
        self._offset += n
        self._lines += 1


# --------------------------------------------------------------------------------------------------
# Replay
# --------------------------------------------------------------------------------------------------

OutcomeStatus = Literal["committed", "aborted", "in_doubt"]


@dataclass(frozen=True)
class Outcome:
    """What became of a transaction: committed (durably), aborted, or in doubt (undecided in the
    current epoch: its coordinator may still decide it)."""

    txn: str
    status: OutcomeStatus
    version: int | None
    key: str | None = None
    reason: str | None = None
    votes: dict[str, str] = field(default_factory=dict)
    activated: bool = False


@dataclass(frozen=True)
class VersionInfo:
    """A committed version: its transaction, full-set checksums and digest, rollback origin."""

    version: int
    txn: str
    checksums: dict[str, str]
    digest: str
    origin_version: int | None
    key: str | None
    ts: float


@dataclass(frozen=True)
class HistoryEntry:
    """One transaction, as listed by ``fleet history`` (``ts``: when it began)."""

    txn: str
    key: str | None
    version: int | None
    status: OutcomeStatus
    reason: str | None
    duration_s: float | None
    ts: float
    activated: bool
    origin_version: int | None


@dataclass
class LogState:
    """The coordinator's state as the log says it is (see ``replay``)."""

    epoch: int = 0
    active_version: int = 0
    active_txn: str | None = None
    versions: dict[int, VersionInfo] = field(default_factory=dict)
    committed_not_activated: list[str] = field(default_factory=list)
    undecided: list[str] = field(default_factory=list)
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    last_version: int = 0
    history: list[HistoryEntry] = field(default_factory=list)
    members: dict[str, str] = field(default_factory=dict)

    @property
    def active(self) -> VersionInfo | None:
        """The active version's info (None before the first activation)."""
        return self.versions.get(self.active_version)

    def rollback_target(self) -> int | None:
        """Default rollback target: the newest committed version older than the active version's
        origin (its own number unless it is itself a rollback), so repeated rollbacks walk back."""
        active = self.active
        if active is None:
            return None
        origin = active.origin_version if active.origin_version is not None else active.version
        older = [v for v in self.versions if v < origin]
        return max(older) if older else None


@dataclass
class _Txn:
    begin: BeginRecord
    status: OutcomeStatus = "in_doubt"
    reason: str | None = None
    votes: dict[str, str] = field(default_factory=dict)
    duration_s: float | None = None
    activated: bool = False


def replay(records: Iterable[LogRecord]) -> LogState:
    """Fold log records into a ``LogState``. Pure.

    - ``epoch``: the highest EPOCH. A non-EPOCH record whose epoch is below the highest EPOCH seen
      before it is fenced out and ignored.
    - ``versions``: committed versions. ``active_version``/``active_txn``: the last ACTIVATED one.
    - ``committed_not_activated``: committed transactions newer than the active version, without
      ACTIVATED (recovery must finish them, in order).
    - ``undecided``: BEGIN without COMMIT or ABORT. Presumed abort: their outcome is "aborted" when a
      later epoch exists, "in_doubt" while their own epoch is the current one.
    - ``outcomes``: by transaction id and by idempotency key (a key maps to its first transaction).
    - ``last_version``: the highest version number ever assigned (aborted ones included).
    - Raises ``LogCorrupted`` (``line`` = 1-based record index) for COMMIT/ACTIVATED of an unknown
      transaction or with a version other than its BEGIN's, or a duplicate BEGIN.
    """
    state = LogState()
    txns: dict[str, _Txn] = {}
    order: list[str] = []
    epoch = 0
    members: dict[str, str] = {}

    def bad(i: int, detail: str) -> LogCorrupted:
        return LogCorrupted(None, i, detail)

    for i, r in enumerate(records, start=1):
        if isinstance(r, EpochRecord):
            epoch = max(epoch, r.epoch)
            continue
        if r.epoch < epoch:
            continue  # fenced: written by an older incarnation after a newer one took over
        if isinstance(r, BeginRecord):
            if r.txn in txns:
                raise bad(i, f"duplicate BEGIN for transaction {r.txn}")
            txns[r.txn] = _Txn(begin=r)
            order.append(r.txn)
            state.last_version = max(state.last_version, r.version)
        elif isinstance(r, CommitRecord):
            t = txns.get(r.txn)
            if t is None:
                raise bad(i, f"COMMIT for unknown transaction {r.txn}")
            if r.version != t.begin.version:
                raise bad(i, f"COMMIT of {r.txn} names v{r.version}, BEGIN assigned v{t.begin.version}")
            if t.status == "aborted":
                raise bad(i, f"COMMIT of aborted transaction {r.txn}")
            t.status = "committed"
            b = t.begin
            state.versions[b.version] = VersionInfo(
                version=b.version,
                txn=b.txn,
                checksums=dict(b.checksums),
                digest=b.digest,
                origin_version=b.origin_version,
                key=b.key,
                ts=r.ts,
            )
        elif isinstance(r, AbortRecord):
            t = txns.get(r.txn)
            if t is None:  # aborted before its BEGIN reached the log: nothing to undo
                continue
            if t.status == "committed":
                raise bad(i, f"ABORT of committed transaction {r.txn}")
            t.status = "aborted"
            t.reason = r.reason
            t.votes = dict(r.votes)
        elif isinstance(r, ActivatedRecord):
            t = txns.get(r.txn)
            if t is None or t.status != "committed":
                raise bad(i, f"ACTIVATED for transaction {r.txn} that is not committed")
            if r.version != t.begin.version:
                raise bad(i, f"ACTIVATED of {r.txn} names v{r.version}, BEGIN assigned v{t.begin.version}")
            t.activated = True
            t.duration_s = r.duration_s
            state.active_version = r.version
            state.active_txn = r.txn
        elif isinstance(r, MemberRecord):
            members[r.replica_id] = r.event

    state.epoch = epoch
    state.members = members
    for txn in order:
        t = txns[txn]
        b = t.begin
        if t.status == "in_doubt":
            state.undecided.append(txn)
            if b.epoch < epoch:
                t.status = "aborted"
                t.reason = f"presumed abort: not committed before coordinator epoch {epoch}"
        elif t.status == "committed" and not t.activated and b.version > state.active_version:
            state.committed_not_activated.append(txn)
        outcome = Outcome(
            txn=txn,
            status=t.status,
            version=b.version,
            key=b.key,
            reason=t.reason,
            votes=t.votes,
            activated=t.activated,
        )
        state.outcomes[txn] = outcome
        if b.key is not None and b.key not in state.outcomes:
            state.outcomes[b.key] = outcome
        state.history.append(
            HistoryEntry(
                txn=txn,
                key=b.key,
                version=b.version,
                status=t.status,
                reason=t.reason,
                duration_s=t.duration_s,
                ts=b.ts,
                activated=t.activated,
                origin_version=b.origin_version,
            )
        )
    return state
