"""Where a replica catches up from: its live peers first, then the checkpoint store.

Contract:
- Replicas never read the coordinator's log. The coordinator (the log's one writer and reader)
  names the version a replica must serve, that version's full-set checksums, and the members it
  last saw serving that version, then those it last saw on a newer one (which may still hold it
  as their previous set), in a ``CatchUpPlan``. It sends one with every catch-up
  (``sync_to``) and answers one to a replica that starts (``Coordinator.catch_up_plan``).
- A replica tries the peers on its own node first, then those on other nodes, each group in the
  plan's order, then the checkpoint store. A peer's set comes through the object store (the
  peer's ``export``) and is staged only if it is the whole set and every tensor matches the plan's
  checksums. A peer that does not hold the version, does not answer or sends other bytes is
  skipped and named in ``CaughtUp.skipped``; the next source is tried.
- The store's copy is verified against its own manifest (``actors.store``).
- ``CaughtUp`` records which source gave a replica the version it serves; its ``status`` shows it.
- ``Sightings`` is the coordinator's memory of what each replica last said (node, version,
  lifecycle state), fed by lease replies and status answers; it is what a plan's peers come from.
  A coordinator that has just started remembers nothing yet: before it sends or answers a plan
  that names no peer but the replicas catching up, it asks the other members what they serve
  (``plan_with_peers``), so that a replica lost together with the coordinator still catches up
  from a live peer rather than the store.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CatchUpPlan", "CaughtUp", "Peer", "Sightings", "ENGINE_FILE", "PEER", "STORE", "plan_with_peers"]

PEER = "peer"
STORE = "store"
ENGINE_FILE = "engine file"


@dataclass(frozen=True)
class Peer:
    replica: str
    node: str


@dataclass(frozen=True)
class CatchUpPlan:
    """What a replica needs to catch up to ``version`` without reading the log."""

    version: int
    checksums: dict[str, str] = field(default_factory=dict)  # the full set's; {}: peers cannot be checked
    peers: tuple[Peer, ...] = ()

    def peers_for(self, replica: str, node: str) -> list[Peer]:
        """The peers to try, in order: on ``node`` first, then elsewhere; never ``replica`` itself.
        None without checksums: a peer's bytes could not be verified."""
        if not self.checksums:
            return []
        others = [p for p in self.peers if p.replica != replica]
        return [p for p in others if p.node == node] + [p for p in others if p.node != node]


@dataclass(frozen=True)
class CaughtUp:
    """How a replica got the version it serves."""

    version: int
    source: str  # PEER, STORE or ENGINE_FILE
    peer: str = ""
    same_node: bool | None = None
    seconds: float = 0.0
    skipped: tuple[str, ...] = ()  # "<peer>: why" for each peer tried before the source

    def describe(self) -> str:
        if self.source == PEER:
            return f"peer {self.peer} ({'same node' if self.same_node else 'other node'})"
        return "checkpoint store" if self.source == STORE else self.source

    def as_dict(self) -> dict[str, Any]:
        return {"version": self.version, "source": self.source, "peer": self.peer or None,
                "same_node": self.same_node, "seconds": round(self.seconds, 4),
                "skipped": list(self.skipped), "text": self.describe()}


class Sightings:
    """What the coordinator last heard from each replica (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[str, tuple[str, int, str]] = {}

    def saw(self, replica: str, node: str, version: int, state: str) -> None:
        if not node:
            return
        with self._lock:
            self._seen[replica] = (node, version, state)

    def saw_acks(self, acks: dict[str, Any]) -> None:
        """Answers without a node (``Ack``s of COMMIT+ACTIVATE and catch-ups): the version the
        replica now serves; the node stays the one last seen. An ``Ack`` names a transaction's
        state (``active`` once it serves it) or, for a catch-up, the replica's (``serving``)."""
        for replica, ack in acks.items():
            state = getattr(ack, "state", None)
            if state is None:
                continue
            with self._lock:
                if replica in self._seen:
                    node, _, was = self._seen[replica]
                    now = "serving" if state in ("active", "serving") else was
                    self._seen[replica] = (node, ack.version, now)

    def saw_status(self, replica: str, status: dict[str, Any]) -> None:
        self.saw(replica, str(status.get("node") or ""), int(status.get("version", -1)),
                 str(status.get("state", "")))

    def forget(self, replica: str) -> None:
        with self._lock:
            self._seen.pop(replica, None)

    def holders(self, version: int, members: list[str]) -> tuple[Peer, ...]:
        """The members that may hold ``version``: those last seen serving it, then those last seen
        on a newer version (a replica keeps the set it served before), each in the order of
        ``members``."""
        with self._lock:
            seen = {rid: self._seen[rid] for rid in members if rid in self._seen}
        serving = [rid for rid, (_, v, state) in seen.items() if v == version and state == "serving"]
        newer = [rid for rid, (_, v, _) in seen.items() if v > version]
        return tuple(Peer(rid, seen[rid][0]) for rid in serving + newer)


def plan_with_peers(plan: Callable[[], CatchUpPlan | None], catching_up: Collection[str],
                    members: list[str], ask: Callable[[list[str]], Any]) -> CatchUpPlan | None:
    """``plan()`` for the replicas ``catching_up``; where it names no peer but them, first ``ask``
    the other members what they serve (which feeds ``Sightings``) and plan again. A plan without
    checksums (no peer could be checked against it), or with peers already, is returned as it is."""
    first = plan()
    if first is None or not first.checksums or any(p.replica not in catching_up for p in first.peers):
        return first
    others = [m for m in members if m not in catching_up]
    if not others:
        return first
    ask(others)
    return plan()
