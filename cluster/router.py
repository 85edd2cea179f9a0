"""Client-side routing of inference requests over the fleet's replicas.

Contract:
- Least outstanding requests first (counted by this handle), at most ``max_queue`` outstanding
  per replica: when every healthy replica is full the call fails at once with ``Overloaded``.
- Monotonic reads (DESIGN step 5): each request carries the highest version this handle has
  seen as ``min_version``; a replica that cannot serve it answers "stale" and the request is
  retried on another member after the member list is refreshed. No handle sees versions go back.
- A replica that fails (actor died, restarting) or times out is skipped for this request and
  marked unhealthy for a while (``unhealthy_s``, doubled at each failure in a row up to
  ``unhealthy_max_s``; its first answer clears it: a replica that takes long to restart is
  not retried every few seconds at the cost of a timed-out attempt each time); the request
  goes to another member, so no request fails that a live member could serve. A timed-out
  request stays counted against its replica until the replica really finishes it (or dies):
  the replica is still busy with it.
- A request whose inference raises inside the replica (a bad input) is not retried elsewhere: the
  caller gets ``InferenceFailed`` at once, the replica's own error first, and the replica is not
  marked unhealthy.
- Canaries: while the coordinator's routing table names a canary (its version, cohort and traffic
  share), a request of a handle that has not seen the canary's version goes to the cohort with
  probability ``traffic``, else to the rest; once the handle has seen the canary's version (a
  response, or ``observe``), every request goes to the cohort: it sticks to the canary until the
  canary ends, so monotonic reads hold. A request whose group has no replica left to try goes to
  any member (one behind answers stale, as above).
- The member list and routing table are re-read every ``refresh_s`` (in the background, so no
  request waits for it) and whenever a request runs out of members to try.
- Thread-safe: one handle may serve many client threads.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from .errors import InferenceFailed, NoReplicaAvailable, Overloaded
from .remote import readable


@dataclass
class InferResponse:
    """One answer: outputs (numpy arrays), the version that produced them, the replica's id."""

    outputs: list[np.ndarray]
    version: int
    replica: str


class Router:
    """Routes requests over the members returned by ``refresh()``; see the module docstring."""

    def __init__(self, refresh: Callable[[], dict[str, Any]], *, max_queue: int, request_timeout_s: float,
                 retries_on_stale: int, unhealthy_s: float = 2.0,
                 unhealthy_max_s: float = 16.0, refresh_s: float = 2.0) -> None:
        self._refresh_fn = refresh
        self._lock = threading.Lock()
        self._members: dict[str, Any] = {}
        self.canary: dict[str, Any] | None = None  # version, cohort, traffic of the running canary
        self.refresh_s = refresh_s
        self._refreshed_at = 0.0
        self._refreshing = False
        self._outstanding: dict[str, int] = {}
        self._unhealthy_until: dict[str, float] = {}
        self._failures_in_a_row: dict[str, int] = {}
        self.max_queue = max_queue
        self.request_timeout_s = request_timeout_s
        self.retries_on_stale = retries_on_stale
        self.unhealthy_s = unhealthy_s
        self.unhealthy_max_s = unhealthy_max_s
        self.seen_version = 0
        self.refresh()

    def refresh(self) -> None:
        """Re-read the member list; keep the old one while the coordinator cannot answer."""
        try:
            table = self._refresh_fn()
        except Exception:  # noqa: BLE001  (coordinator restarting: route over what we know)
            if self._members:
                return
            raise
        canary = None
        if isinstance(table, dict) and set(table) == {"handles", "canary"}:  # Coordinator.routing
            table, canary = table["handles"], table["canary"]
        with self._lock:
            self._members = dict(table)
            self.canary = canary
            self._refreshed_at = time.monotonic()
            for rid in table:
                self._outstanding.setdefault(rid, 0)

    def _refresh_if_old(self) -> None:
        if time.monotonic() - self._refreshed_at < self.refresh_s or self._refreshing:
            return
        self._refreshing = True

        def run() -> None:
            try:
                self.refresh()
            except Exception:  # noqa: BLE001  (the next request tries again)
                pass
            finally:
                self._refreshed_at = time.monotonic()
                self._refreshing = False

        threading.Thread(target=run, name="router-refresh", daemon=True).start()

    def _group(self) -> frozenset[str] | None:
        """The replicas this request should go to (a canary's cohort or the rest), None: any."""
        with self._lock:
            canary = self.canary
            if canary is None:
                return None
            cohort = frozenset(canary["cohort"])
            if self.seen_version >= canary["version"] or random.random() < canary["traffic"]:
                return cohort
            return frozenset(self._members) - cohort

    def observe(self, version: int) -> None:
        """Raise this handle's floor (e.g. after ``refit`` returned version ``version``)."""
        with self._lock:
            self.seen_version = max(self.seen_version, version)

    def outstanding(self) -> dict[str, int]:
        """Replica id -> requests this handle counts against it now (a snapshot)."""
        with self._lock:
            return dict(self._outstanding)

    def _pick(self, skip: set[str], group: frozenset[str] | None = None) -> tuple[str, Any, int]:
        now = time.monotonic()
        with self._lock:
            members = [r for r in self._members if group is None or r in group]
            if not any(r not in skip for r in members):
                members = list(self._members)
            candidates = [r for r in members
                          if r not in skip and self._unhealthy_until.get(r, 0) <= now]
            if not candidates:
                candidates = [r for r in members if r not in skip]
            if not candidates:
                raise NoReplicaAvailable(
                    f"no replica could serve the request (tried {sorted(skip) or 'none'}; "
                    f"members {sorted(self._members)})")
            free = [r for r in candidates if self._outstanding.get(r, 0) < self.max_queue]
            if not free:
                raise Overloaded(f"all {len(candidates)} replica(s) have {self.max_queue} outstanding "
                                 f"requests (routing.max_queue_per_replica={self.max_queue})")
            least = min(self._outstanding.get(r, 0) for r in free)
            rid = random.choice([r for r in free if self._outstanding.get(r, 0) == least])
            self._outstanding[rid] = self._outstanding.get(rid, 0) + 1
            return rid, self._members[rid], self.seen_version

    def _mark_unhealthy(self, rid: str) -> None:
        with self._lock:
            n = self._failures_in_a_row[rid] = self._failures_in_a_row.get(rid, 0) + 1
            backoff = min(self.unhealthy_max_s, self.unhealthy_s * 2 ** (n - 1))
            self._unhealthy_until[rid] = time.monotonic() + backoff

    def _mark_answering(self, rid: str) -> None:
        if rid in self._failures_in_a_row:  # read without the lock: the common case costs nothing
            with self._lock:
                self._failures_in_a_row.pop(rid, None)
                self._unhealthy_until.pop(rid, None)

    def _done(self, rid: str) -> None:
        with self._lock:
            self._outstanding[rid] = max(0, self._outstanding.get(rid, 0) - 1)

    def _done_when_finished(self, rid: str, ref: ray.ObjectRef) -> None:
        """Uncount a timed-out request once its remote call really ends, without waiting for it.

        The ref completes however the call ends: a result, the method's error, or the actor's
        death (RayActorError), so the callback runs exactly once and the count cannot stick.
        The callback holds ``ref`` so that the pending result is not released before it fires.
        """
        def finished(_: Any, ref: ray.ObjectRef = ref) -> None:
            self._done(rid)

        ref.future().add_done_callback(finished)

    def call(self, inputs: list[Any], timeout_s: float | None = None) -> InferResponse:
        timeout = self.request_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout
        skip: set[str] = set()
        stale = 0
        last_error = ""
        self._refresh_if_old()
        group = self._group()
        while True:
            if time.monotonic() > deadline:
                raise NoReplicaAvailable(f"request timed out after {timeout:g}s ({last_error})")
            try:
                rid, handle, floor = self._pick(skip, group)
            except NoReplicaAvailable as exc:
                if stale >= self.retries_on_stale or not skip:
                    raise NoReplicaAvailable(f"{exc}; last: {last_error or 'none'}") from None
                self.refresh()
                skip.clear()
                group = self._group()
                stale += 1
                continue
            # one attempt may not take the whole deadline: leave time to try the other members
            with self._lock:
                untried = max(1, len([r for r in self._members if r not in skip]))
            attempt = max(0.5, (deadline - time.monotonic()) / untried)
            still_running = False
            try:
                ref = handle.infer.remote(inputs, floor)
                resp = ray.get(ref, timeout=min(attempt, max(0.001, deadline - time.monotonic())))
            except (RayActorError, GetTimeoutError) as exc:
                if isinstance(exc, GetTimeoutError):
                    # the replica is still working on it: it stays counted until the call ends
                    self._done_when_finished(rid, ref)
                    still_running = True
                last_error = f"replica {rid}: {type(exc).__name__}"
                self._mark_unhealthy(rid)
                skip.add(rid)
                continue
            except RayTaskError as exc:  # the request itself failed there: not retried elsewhere
                raise readable(exc, InferenceFailed, f"inference failed on replica {rid}") from None
            finally:
                if not still_running:
                    self._done(rid)
            self._mark_answering(rid)
            if resp["stale"]:
                why = f" ({resp['reason']})" if resp.get("reason") else ""
                last_error = f"replica {rid} stale at version {resp['version']} < {floor}{why}"
                skip.add(rid)
                continue
            self.observe(resp["version"])
            return InferResponse(resp["outputs"], resp["version"], resp["replica"])
