"""A replica's permission to serve fleet traffic (plain Python; the actor supplies ``confirm``).

Contract:
- The coordinator's renewals grant a lease of ``lease_s``; an exclusion revokes it at once. Both
  carry ``(epoch, generation)``: one older than the newest seen is ignored, so a renewal sent
  before an exclusion cannot undo it, whatever order they land in.
- While the lease runs, ``check`` answers from memory. Once it lapsed, exactly one caller
  reconfirms with the coordinator (``confirm``, bounded by ``confirm_s``); concurrent callers wait
  for that answer instead of asking again (no confirm storm).
- Answers: a member serves (``BEHIND`` with the active version when the coordinator's active
  version is newer than ours: the caller must not serve until it caught up, and must not load
  weights on the serving path); a non-member is ``EXCLUDED`` and asks again after a second; an
  unreachable or recovering coordinator lets the replica serve on for half a lease (an outage
  stops refits, not serving) unless it was excluded.
- All lease fields are read and written under one lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from enum import Enum
from typing import Any

logger = logging.getLogger("weight_refit.replica")

__all__ = ["LeaseVerdict", "ServingLease"]

EXCLUDED_RECHECK_S = 1.0


class LeaseVerdict(str, Enum):
    SERVE = "serve"
    EXCLUDED = "excluded"
    BEHIND = "behind"


class ServingLease:
    def __init__(self, lease_s: float, confirm: Callable[[], dict[str, Any]]) -> None:
        self._lock = threading.Lock()
        self._confirm = confirm
        self.lease_s = lease_s
        self._expires = 0.0  # monotonic; 0: never granted: reconfirm before serving
        self._excluded = False
        self._stamp = (0, 0)  # (epoch, generation) of the newest renewal or exclusion seen
        self._asking: Future[tuple[LeaseVerdict, int]] | None = None

    @property
    def confirm_s(self) -> float:
        return max(1.0, self.lease_s / 2)

    def renew(self, epoch: int, lease_s: float, generation: int) -> bool:
        """A renewal; False (ignored) if older than an exclusion or renewal already seen."""
        with self._lock:
            if (epoch, generation) < self._stamp:
                return False
            self._stamp = (epoch, generation)
            self.lease_s = lease_s
            self._excluded = False
            self._expires = time.monotonic() + lease_s
            return True

    def exclude(self, epoch: int, generation: int) -> bool:
        """Stop serving now; False (ignored) if older than a renewal already seen."""
        with self._lock:
            if (epoch, generation) < self._stamp:
                return False
            self._stamp = (epoch, generation)
            self._excluded = True
            self._expires = 0.0
            return True

    def revoke(self) -> None:
        """Stop serving now (the replica itself decided: draining, failed)."""
        with self._lock:
            self._excluded = True
            self._expires = 0.0

    def left_s(self) -> float:
        with self._lock:
            return max(0.0, self._expires - time.monotonic())

    @property
    def excluded(self) -> bool:
        return self._excluded

    def check(self, version: int) -> tuple[LeaseVerdict, int]:
        """Whether this replica, serving ``version``, may serve now; ``(BEHIND, v)`` names the
        version to catch up to."""
        with self._lock:
            if time.monotonic() < self._expires:
                return (LeaseVerdict.EXCLUDED if self._excluded else LeaseVerdict.SERVE), version
            asking = self._asking
            leader = asking is None
            if leader:
                asking = self._asking = Future()
        assert asking is not None
        if not leader:
            try:
                return asking.result(timeout=self.confirm_s + 1.0)
            except Exception:  # noqa: BLE001  (the leader is stuck: do not serve on a guess)
                return LeaseVerdict.EXCLUDED, version
        try:
            verdict = self._reconfirm(version)
        except BaseException:
            verdict = (LeaseVerdict.EXCLUDED, version)
            raise
        finally:
            with self._lock:
                self._asking = None
            asking.set_result(verdict)
        return verdict

    def _reconfirm(self, version: int) -> tuple[LeaseVerdict, int]:
        try:
            answer = self._confirm()
        except Exception as exc:  # noqa: BLE001  (coordinator down or restarting)
            logger.debug("lease reconfirmation failed: %s", exc)
            answer = {"member": None}
        now = time.monotonic()
        with self._lock:
            member = answer.get("member")
            if member is None:
                self._expires = now + self.lease_s / 2
                return (LeaseVerdict.EXCLUDED if self._excluded else LeaseVerdict.SERVE), version
            stamp = (int(answer["epoch"]), int(answer["generation"]))
            if stamp < self._stamp:  # an answer overtaken by a newer renewal or exclusion
                return (LeaseVerdict.EXCLUDED if self._excluded else LeaseVerdict.SERVE), version
            self._stamp = stamp
            if not member:
                self._excluded = True
                self._expires = now + EXCLUDED_RECHECK_S
                return LeaseVerdict.EXCLUDED, version
            self._excluded = False
            self._expires = now + self.lease_s
            active = int(answer["active_version"])
        if active > version:
            return LeaseVerdict.BEHIND, active
        return LeaseVerdict.SERVE, version
