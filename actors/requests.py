"""Turning a ``refit``/``rollback`` call into the request the two-phase commit runs (or into the
answer it gets without one): plain Python over the ledger and the checkpoint store.

- A key seen before returns its first outcome (``duplicate``); the same key for other weights is
  refused with ``KeyReused`` and nothing is done.
- A refit whose full set equals the active one, or a rollback to the active version, is a no-op.
- A rollback's default target walks back through origins; a target the store does not hold is
  refused, naming what it holds.
- ``retained`` is the set of versions the store keeps (``retained_versions``, plus the newest
  persisted one: the weights a lost version would be replaced with).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from engines.checksum import set_digest

from .coordinator_protocol import default_rollback_target, retained_versions
from .errors import KeyReused
from .ledger import Ledger
from .store import CheckpointStore
from .two_phase import RefitRequest, TxnResult

__all__ = ["Requests"]


class Requests:
    def __init__(self, ledger: Ledger, store: CheckpointStore, retain: int) -> None:
        self._ledger = ledger
        self._store = store
        self._retain = retain

    def _committed(self) -> list[int]:
        return sorted(set(self._ledger.state.versions) | ({0} if self._store.has(0) else set()))

    def origins(self) -> dict[int, int]:
        return {v: (i.origin_version if i.origin_version is not None else v)
                for v, i in self._ledger.state.versions.items()}

    def _origin(self, version: int) -> int:
        info = self._ledger.state.versions.get(version)
        return info.origin_version if info is not None and info.origin_version is not None else version

    def retained(self, in_flight: int | None) -> set[int]:
        s = self._ledger.state
        committed = self._committed()
        newest_persisted = next((v for v in reversed(committed) if s.is_persisted(v)), 0)
        keep = retained_versions(active=s.active_version, committed=committed,
                                 origins={s.active_version: self._origin(s.active_version)},
                                 retain=self._retain, in_flight=in_flight, last_assigned=s.last_version)
        return keep | {newest_persisted}

    def duplicate(self, prior: TxnResult | None, key: str | None,
                  checksums: dict[str, str] | None) -> TxnResult | None:
        """``prior`` (the first outcome of ``key``) marked a duplicate; ``KeyReused`` if that
        transaction carried other weights than ``checksums`` (None: not comparable)."""
        if key is None or prior is None:
            return None
        begin = self._ledger.state.begin_of(key)
        if checksums is not None and begin is not None:
            differ = sorted(n for n, c in checksums.items() if begin.checksums.get(n) != c)
            if differ:
                raise KeyReused(f"idempotency key {key!r} was used for transaction {begin.txn} "
                                f"(version {begin.version}, {prior.status}) with other weights "
                                f"({len(differ)} differ, e.g. {differ[0]!r}); use a new key")
        return dataclasses.replace(prior, duplicate=True)

    def target_checksums(self, to: int | None) -> dict[str, str] | None:
        return self._store.manifest(to).checksums if to is not None and self._store.has(to) else None

    def refit(self, refs: list[Any], specs: dict[str, Any], checksums: dict[str, str],
              key: str | None, probes: list[Any] | None = None,
              hashed_on: str | None = None) -> RefitRequest | TxnResult:
        state = self._ledger.state
        active = dict(state.active.checksums) if state.active is not None \
            else self._store.manifest(state.active_version).checksums
        full = {**active, **checksums}
        if set_digest(full) == set_digest(active):
            return TxnResult(status="noop", txn=None, version=state.active_version, key=key,
                             reason="identical to the active version")
        return RefitRequest(refs, specs, checksums, full, key, base_version=state.active_version,
                            probes=probes or None, hashed_on=hashed_on)

    def rollback_target(self, to: int | None) -> int | None:
        """``to``, or the default target (walking back through origins); None if there is none."""
        if to is not None:
            return to
        return default_rollback_target(self._ledger.state.active_version, self.origins(), self._committed())

    def rollback(self, to: int | None, key: str | None) -> RefitRequest | TxnResult:
        state = self._ledger.state
        committed = self._committed()
        if to is None:
            to = self.rollback_target(None)
            if to is None:
                return TxnResult(status="aborted", txn=None, version=None, key=key,
                                 reason="no earlier version to roll back to")
        if to == state.active_version:
            return TxnResult(status="noop", txn=None, version=state.active_version, key=key,
                             reason=f"version {to} is the active version")
        if to not in committed or not self._store.has(to):
            return TxnResult(status="aborted", txn=None, version=None, key=key,
                             reason=f"version {to} is not a committed version held in the "
                                    f"checkpoint store (held: {self._store.versions()})")
        sums = self._store.manifest(to).checksums
        info = state.versions.get(to)
        origin = info.origin_version if info is not None and info.origin_version is not None else to
        return RefitRequest(None, {}, sums, sums, key, origin=origin, from_version=to)
