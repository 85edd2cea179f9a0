"""The coordinator's durable transaction log: an append-only JSON-lines file ``<state_dir>/txn.log``.

Format. One record per line. Only newline-terminated lines count: an unterminated last line is a
torn write from a crash and is ignored; any other unparseable line is corruption (``LogCorrupted``,
naming the line).

Writers (``TxnLog.open(state_dir)``) append under an exclusive ``flock`` on an ``O_APPEND``
descriptor, first cutting off a torn tail left by a crashed writer. Every cut is recorded in
``TxnLog.cut_tails`` and logged as a warning on the ``weight_refit.log`` logger (path, line, bytes).

Fsync policy (the log's own, not the caller's): EPOCH, COMMIT, ABORT, CANARY and MEMBER ``exclude``
records are always ``fdatasync``'d before ``append`` returns; other kinds only when asked (``fsync=True``).
Asking ``fsync=False`` for an always-synced kind raises ValueError.

Failed writes leave nothing behind: a short write is retried for the rest of the line; if a write or
the sync raises, the file is truncated back to where the record began (under the exclusive lock)
and the original ``OSError`` is re-raised with its errno, its ``filename`` set to the log's path.
The log stays usable: the next append (once space is freed) goes where the failed one would have.
(Should the truncate itself fail, that is logged as an error and the next writer parses whatever
the file then holds.) ``records()`` reads under a shared ``flock``, so no reader sees a record that
a failing writer is removing.

Readers (``TxnLog.open(state_dir, readonly=True)``) open the file ``O_RDONLY``: they never create
the directory or the file (FileNotFoundError when missing), never cut a torn tail (they ignore it),
and refuse ``append``/``bump_epoch``.

Epoch fencing: every coordinator incarnation calls ``bump_epoch()`` before it sends anything; an
append whose record carries an epoch lower than the highest EPOCH in the file raises ``StaleEpoch``.
The check reads the file's new tail under the same lock as the write, so two incarnations appending
to one file are fenced exactly (on a filesystem where ``flock`` works across the writers).

State. ``LogState.apply(record)`` folds one record into the state in time independent of the
history's length (the coordinator applies each record it appends); ``replay(records)`` folds a whole
log into a fresh ``LogState`` (presumed abort, idempotency keys, committed-but-not-activated
transactions to finish).

Records: EPOCH, BEGIN, COMMIT, ABORT, ACTIVATED, MEMBER, under ``durability: replicated``
PERSISTED (a committed version's checkpoint is durable) and LOST (no holder was left to write it),
and CANARY (a canary's decision: promote or abort; always fsync'd: a promote is its commit point).

Canaries. A BEGIN with ``canary`` (the cohort and its traffic share) commits its version on the
cohort only: from its COMMIT, ``LogState.canary`` describes it and ``version_for(rid)`` is that
version for the cohort's members and the active version for the others. Its transaction is not
"committed but not activated" (recovery must not finish it fleet-wide) until a CANARY promote,
after which its ACTIVATED makes it the active version. After a CANARY abort, the activation of
the newer version that re-installs the pre-canary weights ends the canary.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from actors.durable import fsync_dir
from actors.errors import StaleEpoch
from actors.failpoints import Failpoints
from engines.checksum import set_digest

__all__ = [
    "AbortRecord",
    "ActivatedRecord",
    "BeginRecord",
    "CanaryRecord",
    "CanarySpec",
    "CanaryState",
    "CommitRecord",
    "CutTail",
    "EpochRecord",
    "HistoryEntry",
    "LOG_NAME",
    "LogCorrupted",
    "LogRecord",
    "LogState",
    "LostRecord",
    "MemberRecord",
    "PersistedRecord",
    "Outcome",
    "StaleEpoch",
    "TxnLog",
    "VersionInfo",
    "must_fsync",
    "replay",
]

LOG_NAME = "txn.log"

logger = logging.getLogger("weight_refit.log")


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


class CanarySpec(BaseModel):
    """A canary's cohort (replica ids), the share of new requests routed to it, and its judge's
    settings (``actors.canary.CanaryJudge`` as a dict; None: decided by hand)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cohort: list[str] = Field(min_length=1)
    traffic: float = Field(ge=0.0, le=1.0)
    judge: dict[str, Any] | None = None


class BeginRecord(_Record):
    """A transaction starts with its version number (assigned now, kept even if it aborts).

    ``checksums`` should describe the full (materialised) weight set of the version, so ``digest``
    compares with other versions; ``digest`` is computed from ``checksums`` when left empty.
    ``origin_version`` is set for a rollback: the version whose weights it re-installs.
    ``durability``: ``disk`` (COMMIT waits for the checkpoint: a committed version is persisted) or
    ``replicated`` (COMMIT once every member holds the set; PERSISTED follows). Records written
    before the field existed read as ``disk``, which is what they were.
    """

    kind: Literal["BEGIN"] = "BEGIN"
    txn: str
    version: int = Field(ge=1)
    key: str | None = None
    digest: str = ""
    checksums: dict[str, str] = Field(default_factory=dict)
    origin_version: int | None = None
    durability: Literal["disk", "replicated"] = "disk"
    canary: CanarySpec | None = None

    @model_validator(mode="before")
    @classmethod
    def _fill_digest(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("digest") and isinstance(data.get("checksums"), dict):
            data = {**data, "digest": set_digest(data["checksums"])}
        return data


class CommitRecord(_Record):
    """The commit point of a transaction (always fsync'd)."""

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


class PersistedRecord(_Record):
    """A committed version's checkpoint is durable (under ``durability: replicated``)."""

    kind: Literal["PERSISTED"] = "PERSISTED"
    txn: str
    version: int = Field(ge=1)


class LostRecord(_Record):
    """A committed version that no holder was left to persist: every replica holding it and the
    coordinator were lost first. ``replaced_by`` is the new version that re-installs the newest
    persisted weights."""

    kind: Literal["LOST"] = "LOST"
    txn: str
    version: int = Field(ge=1)
    reason: str
    replaced_by: int | None = None


class CanaryRecord(_Record):
    """A canary is decided: ``promote`` (the commit point of activating its version on the rest of
    the fleet) or ``abort`` (a newer version carrying the pre-canary weights follows). Always
    fsync'd."""

    kind: Literal["CANARY"] = "CANARY"
    txn: str
    version: int = Field(ge=1)
    decision: Literal["promote", "abort"]
    reason: str = ""


class MemberRecord(_Record):
    """A membership change (an ``exclude`` is always fsync'd). Logs written before the word was
    settled say ``evict``; it is read as ``exclude``."""

    kind: Literal["MEMBER"] = "MEMBER"
    replica_id: str
    event: Literal["join", "leave", "exclude"]

    @model_validator(mode="before")
    @classmethod
    def _legacy_event(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("event") == "evict":
            data = {**data, "event": "exclude"}
        return data


LogRecord = Annotated[
    EpochRecord | BeginRecord | CommitRecord | AbortRecord | ActivatedRecord | PersistedRecord | LostRecord
    | MemberRecord | CanaryRecord,
    Field(discriminator="kind"),
]
_RECORD_ADAPTER: TypeAdapter[LogRecord] = TypeAdapter(LogRecord)


def parse_record(line: str | bytes) -> LogRecord:
    """Parse one JSON line into its record type (raises pydantic ValidationError)."""
    return _RECORD_ADAPTER.validate_json(line)


def dump_record(record: LogRecord) -> bytes:
    """Serialise a record as one JSON line, newline included."""
    return record.model_dump_json().encode() + b"\n"


def must_fsync(record: LogRecord) -> bool:
    """The fsync policy: EPOCH, COMMIT, ABORT, CANARY and MEMBER ``exclude`` records are always synced."""
    if isinstance(record, MemberRecord):
        return record.event == "exclude"
    return isinstance(record, EpochRecord | CommitRecord | AbortRecord | CanaryRecord)


def _sync_wanted(record: LogRecord, fsync: bool | None) -> bool:
    if fsync is None:
        return must_fsync(record)
    if not fsync and must_fsync(record):
        kind = "MEMBER exclude" if isinstance(record, MemberRecord) else record.kind
        raise ValueError(f"{kind} records are always fsync'd: append(fsync=False) is not allowed")
    return fsync


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


class LogCorrupted(Exception):
    """A log line (other than a torn last line) cannot be parsed or makes no sense on replay.

    Attributes: ``path`` (None when replaying in memory), ``line`` (1-based; None when a record was
    applied without one), ``detail``.
    """

    def __init__(self, path: str | None, line: int | None, detail: str) -> None:
        super().__init__(path, line, detail)
        self.path = path
        self.line = line
        self.detail = detail

    def __str__(self) -> str:
        if self.line is None:
            where = f" in {self.path}" if self.path else ""
            return f"transaction log corrupted{where}: {self.detail}"
        where = f"{self.path}:" if self.path else "record "
        return f"transaction log corrupted at {where}{self.line}: {self.detail}"


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


@dataclass(frozen=True)
class CutTail:
    """A torn (unterminated) last line a writer cut off: the 1-based line number it would have had,
    the byte offset where it began and its length in bytes."""

    line: int
    offset: int
    nbytes: int


class TxnLog:
    """Append-only, epoch-fenced JSON-lines transaction log at ``<state_dir>/txn.log``.

    Contract (see also the module docstring):
    - ``open(state_dir)`` opens for writing, creating the directory and the file if needed, and cuts
      a torn tail; ``open(state_dir, readonly=True)`` opens ``O_RDONLY``, creates nothing
      (FileNotFoundError when missing), cuts nothing, and refuses ``append``/``bump_epoch``
      (ValueError). ``fp`` arms the ``log.write``/``log.fsync`` failpoints.
    - ``records()`` re-reads the whole file under a shared lock; an unterminated last line is
      ignored, any other bad line raises ``LogCorrupted`` naming its 1-based line number.
    - ``append(record, fsync=None)`` writes one line under an exclusive ``flock``; ``fsync=None``
      follows ``must_fsync(record)``, True forces a sync, False for a must-sync kind is a ValueError.
      It raises ``StaleEpoch`` if the record's epoch is lower than the highest EPOCH in the file
      (read from disk under the lock), ValueError if it is higher (an epoch that was never bumped),
      and on a failed write or sync the ``OSError``, with the file as it was before the call.
    - ``bump_epoch()`` durably appends EPOCH(highest in file + 1) and adopts it as ``epoch``.
    - ``cut_tails``: the torn tails this object cut, oldest first.
    - Thread-safe; several processes may hold the same file open.
    """

    def __init__(self, path: Path, fd: int, *, readonly: bool = False, fp: Failpoints | None = None) -> None:
        self._path = path
        self._fd = fd
        self._readonly = readonly
        self._fp = fp
        self._lock = threading.Lock()
        self._offset = 0  # bytes of the file parsed so far (always at a line boundary)
        self._lines = 0  # complete lines parsed so far
        self._file_epoch = 0  # highest EPOCH seen in the file
        self._epoch = 0  # this incarnation's epoch (after bump_epoch); file's highest at open
        self.cut_tails: list[CutTail] = []
        self.mirror: Any = None  # a ``LogMirror`` (state on a URL): sync'd writes are shipped to it

    @classmethod
    def open(cls, state_dir: Path | str, *, readonly: bool = False, fp: Failpoints | None = None) -> TxnLog:
        """Open the log in ``state_dir``: for writing (creating what is missing) or ``readonly``."""
        state_dir = Path(state_dir)
        path = state_dir / LOG_NAME
        if readonly:
            fd = os.open(path, os.O_RDONLY)
        else:
            state_dir.mkdir(parents=True, exist_ok=True)
            created = not path.exists()
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            if created:
                os.fsync(fd)
                fsync_dir(state_dir)
        log = cls(path, fd, readonly=readonly, fp=fp)
        try:
            with log._locked(exclusive=not readonly):
                log._refresh()
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
    def readonly(self) -> bool:
        return self._readonly

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
        with self._locked(exclusive=False):
            data = self._read(0)
        records, _ = _parse_lines(data, str(self._path), 1)
        return records

    def state(self) -> LogState:
        """``replay(self.records())``."""
        return replay(self.records())

    # -- writing ---------------------------------------------------------------------------------

    def append(self, record: LogRecord, *, fsync: bool | None = None) -> None:
        """Append one record (see the class contract for fencing, fsync policy and failures)."""
        self._check_writable()
        sync = _sync_wanted(record, fsync)
        line = dump_record(record)
        with self._locked(exclusive=True):
            self._refresh()
            if record.epoch < self._file_epoch:
                raise StaleEpoch(record.epoch, self._file_epoch, "the transaction log")
            if isinstance(record, EpochRecord):
                if record.epoch <= self._file_epoch:
                    raise StaleEpoch(record.epoch, self._file_epoch, "the transaction log")
            elif record.epoch > self._file_epoch:
                raise ValueError(
                    f"record epoch {record.epoch} is above the log's epoch {self._file_epoch}: "
                    "call bump_epoch() first"
                )
            self._write(line, sync)
            if isinstance(record, EpochRecord):
                self._file_epoch = self._epoch = record.epoch

    def rewrite(self, records: list[LogRecord]) -> None:
        """Replace the log with ``records`` (compaction): written to a temp file, fsync'd, renamed
        over the log, the directory fsync'd; this object appends to the new file from then on. A
        crash leaves either the old log or the new one. Readers that opened the path before keep
        reading the old file; later ones read the new."""
        self._check_writable()
        data = b"".join(dump_record(r) for r in records)
        with self._locked(exclusive=True):
            self._refresh()
            if self.mirror is not None:
                self.mirror.replace(data)
            tmp = self._path.with_name(f".{self._path.name}.compact.{os.getpid()}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self._path)
            fsync_dir(self._path.parent)
            new = os.open(self._path, os.O_RDWR | os.O_APPEND)
            fcntl.flock(new, fcntl.LOCK_EX)
            old, self._fd = self._fd, new
            os.close(old)
            self._offset, self._lines = len(data), len(records)
            epochs = [r.epoch for r in records if isinstance(r, EpochRecord)]
            self._file_epoch = max([self._file_epoch, *epochs])

    def bump_epoch(self) -> int:
        """Durably start a new epoch (highest in the file + 1), adopt it and return it."""
        self._check_writable()
        with self._locked(exclusive=True):
            self._refresh()
            epoch = self._file_epoch + 1
            self._write(dump_record(EpochRecord(epoch=epoch)), True)
            self._file_epoch = self._epoch = epoch
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

    def _check_writable(self) -> None:
        self._check_open()
        if self._readonly:
            raise ValueError(f"transaction log {self._path} is open read-only: it cannot be written")

    @contextmanager
    def _locked(self, *, exclusive: bool) -> Iterator[None]:
        with self._lock:
            fcntl.flock(self._fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
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

    def _refresh(self) -> None:
        """Parse lines appended since our last read (by anyone); a writer cuts a torn tail.
        Caller holds the lock (exclusive, for a writer)."""
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
        if not self._readonly and consumed < len(data):
            # We hold the exclusive lock, so no writer is mid-line: the tail is a torn write.
            tail = CutTail(line=self._lines + 1, offset=self._offset, nbytes=len(data) - consumed)
            os.ftruncate(self._fd, self._offset)
            _fdatasync(self._fd)
            self.cut_tails.append(tail)
            logger.warning(
                "cut a torn tail off %s: line %d, %d bytes (an unterminated write, from a crash)",
                self._path, tail.line, tail.nbytes,
            )

    def _write(self, line: bytes, fsync: bool) -> None:
        """Write ``line`` at the end of the file (where ``_refresh`` left ``_offset``); on any
        failure cut the file back to that offset and re-raise. Caller holds the exclusive lock."""
        start, path = self._offset, str(self._path)
        written = 0
        try:
            while written < len(line):
                if self._fp is not None:
                    self._fp.hit("log.write", path)
                n = os.write(self._fd, memoryview(line)[written:])
                if n == 0:
                    raise OSError(errno.EIO, "write() wrote nothing", path)
                written += n
            if fsync:
                if self._fp is not None:
                    self._fp.hit("log.fsync", path)
                _fdatasync(self._fd)
                if self.mirror is not None:  # durable only once in object storage too
                    self.mirror.ship(self._read, start + len(line))
        except BaseException as e:
            if isinstance(e, OSError) and e.filename is None:
                e.filename = path
            self._cut_back(start, wrote=written > 0)
            raise
        self._offset += len(line)
        self._lines += 1

    def _cut_back(self, offset: int, *, wrote: bool) -> None:
        try:
            os.ftruncate(self._fd, offset)
            if wrote:
                _fdatasync(self._fd)
        except OSError as e:
            # The next _refresh parses whatever is left, so the offsets stay consistent either way.
            logger.error("could not cut the failed record off %s at byte %d: %s", self._path, offset, e)


# --------------------------------------------------------------------------------------------------
# State
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
    persisted: bool = True
    lost: str | None = None


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
    persisted: bool = True
    lost: str | None = None
    canary: str | None = None  # a canary's cohort and what became of it


@dataclass
class CanaryState:
    """The canary running (or decided, its decision not carried out yet): ``version`` on ``cohort``,
    the rest of the fleet on ``base_version``."""

    txn: str
    version: int
    base_version: int
    cohort: list[str]
    traffic: float
    judge: dict[str, Any] | None
    started_at: float  # wall time of its COMMIT
    decision: str | None = None  # promote | abort, once logged
    reason: str = ""

    def describe(self) -> dict[str, Any]:
        return {"txn": self.txn, "version": self.version, "base_version": self.base_version,
                "cohort": list(self.cohort), "traffic": self.traffic, "judge": self.judge,
                "started_at": self.started_at, "decision": self.decision, "reason": self.reason}


@dataclass(slots=True)
class _Txn:
    begin: BeginRecord
    seq: int  # position in BEGIN order
    status: OutcomeStatus = "in_doubt"  # as logged; presumed abort is derived (LogState._status)
    reason: str | None = None
    votes: dict[str, str] = field(default_factory=dict)
    duration_s: float | None = None
    activated: bool = False
    persisted: bool = False
    lost: str | None = None
    canary: CanaryRecord | None = None  # the decision of a canary transaction
    canary_base: int = 0  # the version the rest of the fleet served during the canary
    canary_replaced_by: int | None = None  # an aborted canary: the version that ended it
    outcome: Outcome | None = None  # cache, valid for outcome_epoch; reset on every change
    outcome_epoch: int = -1


class LogState:
    """The coordinator's state as the log says it is, folded one record at a time by ``apply``.

    - ``epoch``: the highest EPOCH. A non-EPOCH record whose epoch is below the highest EPOCH
      applied before it is fenced out and ignored.
    - ``versions``: committed versions. ``active_version``/``active_txn``: the last ACTIVATED one.
    - ``committed_not_activated``: committed transactions newer than the active version, without
      ACTIVATED, in BEGIN order (recovery must finish them, in order).
    - ``undecided``: BEGIN without COMMIT or ABORT, in BEGIN order. Presumed abort: their outcome is
      "aborted" from the EPOCH that raises the epoch above their BEGIN's, "in_doubt" while their own
      epoch is the current one. They stay undecided until an ABORT (recovery appends one for each)
      or a COMMIT is applied.
    - ``outcomes``: a read-only mapping by transaction id and by idempotency key (a key maps to its
      first transaction; a transaction id wins over an equal key).
    - ``history``: every transaction, in BEGIN order.
    - ``last_version``: the highest version number ever assigned (aborted ones included).
    - ``members``: replica id -> its last membership event.
    - ``canary``: the canary running or decided but not ended (``CanaryState``), else None;
      ``version_for(rid)``: the version replica ``rid`` should serve (the canary's for its cohort).
    - ``apply`` raises ``LogCorrupted(None, line, ...)`` for COMMIT/ACTIVATED of an unknown
      transaction or with a version other than its BEGIN's, COMMIT of an aborted or ACTIVATED of an
      uncommitted transaction, ABORT of a committed one, or a duplicate BEGIN; the state is then
      unchanged. An ABORT of an unknown transaction (it aborted before its BEGIN was logged) is a
      no-op.
    - Cost: ``apply`` and ``outcomes[...]`` take constant time, whatever the history's length;
      ``history``, ``undecided`` and ``committed_not_activated`` are built when read.
    """

    def __init__(self) -> None:
        self.epoch = 0
        self.active_version = 0
        self.active_txn: str | None = None
        self.versions: dict[int, VersionInfo] = {}
        self.last_version = 0
        self.members: dict[str, str] = {}
        self.canary: CanaryState | None = None
        self._txns: dict[str, _Txn] = {}  # BEGIN order
        self._first_by_key: dict[str, str] = {}
        self._undecided: dict[str, None] = {}  # BEGIN order
        self._unactivated: dict[str, _Txn] = {}  # committed, no ACTIVATED yet
        self._unpersisted: dict[str, _Txn] = {}  # committed under replicated durability, no PERSISTED
        self._outcomes = _Outcomes(self)

    # -- views -----------------------------------------------------------------------------------

    @property
    def active(self) -> VersionInfo | None:
        """The active version's info (None before the first activation)."""
        return self.versions.get(self.active_version)

    def version_for(self, rid: str) -> int:
        """The version replica ``rid`` should serve: the canary's for its cohort, else the active one."""
        c = self.canary
        return c.version if c is not None and rid in c.cohort else self.active_version

    @property
    def undecided(self) -> list[str]:
        return list(self._undecided)

    @property
    def committed_not_activated(self) -> list[str]:
        newer = [t for t in self._unactivated.values() if t.begin.version > self.active_version]
        return [t.begin.txn for t in sorted(newer, key=lambda t: t.seq)]

    @property
    def outcomes(self) -> Mapping[str, Outcome]:
        return self._outcomes

    @property
    def unpersisted(self) -> list[tuple[str, int]]:
        """``(txn, version)`` of committed versions whose checkpoint is not durable yet, oldest
        first (a restarted coordinator re-persists them from a live holder)."""
        return sorted(((t.begin.txn, t.begin.version) for t in self._unpersisted.values()),
                      key=lambda tv: tv[1])

    def is_persisted(self, version: int) -> bool:
        """True for v0 and every committed version whose checkpoint is durable."""
        if version == 0:
            return True
        info = self.versions.get(version)
        t = self._txns.get(info.txn) if info is not None else None
        return t is not None and t.persisted

    @property
    def history(self) -> list[HistoryEntry]:
        entries = []
        for t in self._txns.values():
            b = t.begin
            status, reason = self._status(t)
            entries.append(HistoryEntry(
                txn=b.txn, key=b.key, version=b.version, status=status, reason=reason,
                duration_s=t.duration_s, ts=b.ts, activated=t.activated, origin_version=b.origin_version,
                persisted=t.persisted or status != "committed", lost=t.lost, canary=self._canary_text(t),
            ))
        return entries

    def _canary_text(self, t: _Txn) -> str | None:
        spec = t.begin.canary
        if spec is None:
            return None
        where = (f"canary on {', '.join(spec.cohort)} ({spec.traffic:.0%} of new requests) "
                 f"over v{t.canary_base}")
        if t.canary is None:
            return f"{where}: running" if t.status == "committed" else where
        what = "promoted" if t.canary.decision == "promote" else "aborted"
        why = f" ({t.canary.reason})" if t.canary.reason else ""
        after = f"; ended by v{t.canary_replaced_by}" if t.canary_replaced_by is not None else ""
        return f"{where}: {what}{why}{after}"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LogState):
            return NotImplemented
        return self._fields() == other._fields()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"LogState(epoch={self.epoch}, active_version={self.active_version}, "
            f"last_version={self.last_version}, transactions={len(self._txns)}, "
            f"undecided={self.undecided}, committed_not_activated={self.committed_not_activated})"
        )

    @property
    def transactions(self) -> int:
        return len(self._txns)

    def compacted(self, keep_recent: int, keep_versions: set[int]) -> tuple[list[LogRecord], list[LogRecord]]:
        """The records of a log that replays to this state without its older transactions:
        ``(kept, dropped)``. Kept: the newest ``keep_recent`` transactions, the active one, every
        one of ``keep_versions``, every undecided, unactivated or unpersisted one, the current
        members and the epoch. Each transaction's records carry its BEGIN's epoch, in BEGIN order."""
        order = list(self._txns.values())
        recent = {t.begin.txn for t in order[-keep_recent:]} if keep_recent > 0 else set()
        pinned = set(self._undecided) | set(self._unactivated) | set(self._unpersisted)
        pinned |= {i.txn for v, i in self.versions.items() if v in keep_versions}
        if self.active_txn is not None:
            pinned.add(self.active_txn)
        if self.canary is not None:
            pinned.add(self.canary.txn)
        kept: list[LogRecord] = []
        dropped: list[LogRecord] = []
        seen_epoch = 0
        for t in order:
            records = self._records_of(t)
            if t.begin.txn in recent or t.begin.txn in pinned:
                if t.begin.epoch > seen_epoch:
                    kept.append(EpochRecord(epoch=t.begin.epoch, ts=t.begin.ts))
                    seen_epoch = t.begin.epoch
                kept += records
            else:
                dropped += records
        if self.epoch > seen_epoch:
            kept.append(EpochRecord(epoch=self.epoch))
        kept += [MemberRecord(epoch=self.epoch, replica_id=rid, event=event)  # type: ignore[arg-type]
                 for rid, event in self.members.items() if event != "leave"]
        return kept, dropped

    def _records_of(self, t: _Txn) -> list[LogRecord]:
        b = t.begin
        out: list[LogRecord] = [b]
        e, txn, v = b.epoch, b.txn, b.version
        if t.status == "committed":
            info = self.versions.get(v)
            out.append(CommitRecord(epoch=e, txn=txn, version=v, ts=info.ts if info else b.ts))
            if t.canary is not None:
                out.append(t.canary)
            if t.activated:
                out.append(ActivatedRecord(epoch=e, txn=txn, version=v, duration_s=t.duration_s or 0.0,
                                           ts=b.ts))
            if t.persisted and b.durability == "replicated":
                out.append(PersistedRecord(epoch=e, txn=txn, version=v, ts=b.ts))
            if t.lost is not None:
                out.append(LostRecord(epoch=e, txn=txn, version=v, reason=t.lost, ts=b.ts))
        elif t.status == "aborted":
            out.append(AbortRecord(epoch=e, txn=txn, reason=t.reason or "aborted", votes=t.votes, ts=b.ts))
        return out

    def begin_of(self, key_or_txn: str) -> BeginRecord | None:
        """The BEGIN record of a transaction, by id or idempotency key (its first transaction)."""
        t = self._txns.get(key_or_txn) or self._txns.get(self._first_by_key.get(key_or_txn, ""))
        return t.begin if t is not None else None

    # -- folding ---------------------------------------------------------------------------------

    def apply(self, record: LogRecord, line: int | None = None) -> None:
        """Fold one record into the state; ``line`` (1-based) is what ``LogCorrupted`` names."""
        match record:
            case EpochRecord():
                self._on_epoch(record)
            case _ if record.epoch < self.epoch:
                pass  # fenced: written by an older incarnation after a newer one took over
            case BeginRecord():
                self._on_begin(record, line)
            case CommitRecord():
                self._on_commit(record, line)
            case AbortRecord():
                self._on_abort(record, line)
            case ActivatedRecord():
                self._on_activated(record, line)
            case PersistedRecord():
                self._on_persisted(record, line)
            case LostRecord():
                self._on_lost(record, line)
            case MemberRecord():
                self._on_member(record)
            case CanaryRecord():
                self._on_canary(record, line)

    def _on_epoch(self, r: EpochRecord) -> None:
        # Raising the epoch is what presumes older undecided transactions aborted (see _status).
        self.epoch = max(self.epoch, r.epoch)

    def _on_begin(self, r: BeginRecord, line: int | None) -> None:
        if r.txn in self._txns:
            raise LogCorrupted(None, line, f"duplicate BEGIN for transaction {r.txn}")
        self._txns[r.txn] = _Txn(begin=r, seq=len(self._txns))
        self._undecided[r.txn] = None
        if r.key is not None:
            self._first_by_key.setdefault(r.key, r.txn)
        self.last_version = max(self.last_version, r.version)

    def _on_commit(self, r: CommitRecord, line: int | None) -> None:
        t = self._txns.get(r.txn)
        if t is None:
            raise LogCorrupted(None, line, f"COMMIT for unknown transaction {r.txn}")
        b = t.begin
        if r.version != b.version:
            raise LogCorrupted(
                None, line, f"COMMIT of {r.txn} names v{r.version}, BEGIN assigned v{b.version}"
            )
        if t.status == "aborted":
            raise LogCorrupted(None, line, f"COMMIT of aborted transaction {r.txn}")
        t.status, t.outcome = "committed", None
        self._undecided.pop(r.txn, None)
        if b.canary is not None and not t.activated:  # live on its cohort only, until promoted
            t.canary_base = self.active_version
            if t.canary is None or t.canary.decision == "promote":
                self.canary = CanaryState(txn=b.txn, version=b.version, base_version=self.active_version,
                                          cohort=list(b.canary.cohort), traffic=b.canary.traffic,
                                          judge=b.canary.judge, started_at=r.ts)
        if not t.activated and b.canary is None:
            self._unactivated[r.txn] = t
        if b.durability == "disk":
            t.persisted = True
        elif not t.persisted and t.lost is None:
            self._unpersisted[r.txn] = t
        self.versions[b.version] = VersionInfo(
            version=b.version, txn=b.txn, checksums=dict(b.checksums), digest=b.digest,
            origin_version=b.origin_version, key=b.key, ts=r.ts,
        )

    def _on_abort(self, r: AbortRecord, line: int | None) -> None:
        t = self._txns.get(r.txn)
        if t is None:
            return
        if t.status == "committed":
            raise LogCorrupted(None, line, f"ABORT of committed transaction {r.txn}")
        t.status, t.reason, t.votes, t.outcome = "aborted", r.reason, dict(r.votes), None
        self._undecided.pop(r.txn, None)

    def _on_activated(self, r: ActivatedRecord, line: int | None) -> None:
        t = self._txns.get(r.txn)
        if t is None or t.status != "committed":
            raise LogCorrupted(None, line, f"ACTIVATED for transaction {r.txn} that is not committed")
        if r.version != t.begin.version:
            raise LogCorrupted(
                None, line, f"ACTIVATED of {r.txn} names v{r.version}, BEGIN assigned v{t.begin.version}"
            )
        t.activated, t.duration_s, t.outcome = True, r.duration_s, None
        self._unactivated.pop(r.txn, None)
        self.active_version, self.active_txn = r.version, r.txn
        c = self.canary
        if c is not None and (r.txn == c.txn or r.version > c.version):
            if r.txn != c.txn:
                self._txns[c.txn].canary_replaced_by = r.version
            self.canary = None

    def _committed_txn(self, kind: str, txn: str, version: int, line: int | None) -> _Txn:
        t = self._txns.get(txn)
        if t is None or t.status != "committed":
            raise LogCorrupted(None, line, f"{kind} for transaction {txn} that is not committed")
        if version != t.begin.version:
            raise LogCorrupted(None, line, f"{kind} of {txn} names v{version}, BEGIN assigned "
                                           f"v{t.begin.version}")
        return t

    def _on_persisted(self, r: PersistedRecord, line: int | None) -> None:
        t = self._committed_txn("PERSISTED", r.txn, r.version, line)
        t.persisted, t.outcome = True, None
        self._unpersisted.pop(r.txn, None)

    def _on_lost(self, r: LostRecord, line: int | None) -> None:
        t = self._committed_txn("LOST", r.txn, r.version, line)
        replaced = f"; replaced by v{r.replaced_by}" if r.replaced_by is not None else ""
        t.lost, t.outcome = f"{r.reason}{replaced}", None
        self._unpersisted.pop(r.txn, None)

    def _on_canary(self, r: CanaryRecord, line: int | None) -> None:
        t = self._committed_txn("CANARY", r.txn, r.version, line)
        if t.begin.canary is None:
            raise LogCorrupted(None, line, f"CANARY for transaction {r.txn} that is not a canary")
        t.canary, t.outcome = r, None
        c = self.canary
        if c is not None and c.txn == r.txn:
            c.decision, c.reason = r.decision, r.reason
        if r.decision == "promote" and not t.activated:
            self._unactivated[r.txn] = t

    def _on_member(self, r: MemberRecord) -> None:
        self.members[r.replica_id] = r.event

    # -- internals -------------------------------------------------------------------------------

    def _status(self, t: _Txn) -> tuple[OutcomeStatus, str | None]:
        if t.status == "in_doubt" and t.begin.epoch < self.epoch:
            return "aborted", f"presumed abort: not committed before coordinator epoch {self.epoch}"
        return t.status, t.reason

    def _outcome(self, t: _Txn) -> Outcome:
        if t.outcome is None or t.outcome_epoch != self.epoch:
            status, reason = self._status(t)
            b = t.begin
            t.outcome = Outcome(
                txn=b.txn, status=status, version=b.version, key=b.key, reason=reason, votes=t.votes,
                activated=t.activated, persisted=t.persisted or status != "committed", lost=t.lost,
            )
            t.outcome_epoch = self.epoch
        return t.outcome

    def _fields(self) -> tuple[object, ...]:
        return (
            self.epoch, self.active_version, self.active_txn, self.versions, self.committed_not_activated,
            self.undecided, dict(self.outcomes), self.last_version, self.history, self.members,
            self.unpersisted, self.canary,
        )


class _Outcomes(Mapping[str, Outcome]):
    """``LogState.outcomes``: a live view, by transaction id first, then by idempotency key."""

    def __init__(self, state: LogState) -> None:
        self._state = state

    def __getitem__(self, name: str) -> Outcome:
        s = self._state
        t = s._txns.get(name)
        if t is None:
            txn = s._first_by_key.get(name)
            if txn is None:
                raise KeyError(name)
            t = s._txns[txn]
        return s._outcome(t)

    def __iter__(self) -> Iterator[str]:
        s = self._state
        yield from s._txns
        yield from (k for k in s._first_by_key if k not in s._txns)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return f"outcomes({dict(self)!r})"


def replay(records: Iterable[LogRecord]) -> LogState:
    """Fold log records into a fresh ``LogState`` (``LogCorrupted.line``: the 1-based record index)."""
    state = LogState()
    for i, record in enumerate(records, start=1):
        state.apply(record, i)
    return state
