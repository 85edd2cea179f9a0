"""Every call from the coordinator to its replicas goes through one ``ReplicaClient``.

``ReplicaClient`` is the interface the coordinator's logic is written against (tests drive that
logic with a fake of it, without Ray); ``RayReplicaClient`` is the one implementation that makes
Ray calls. Contract of every method:

- It never raises for a replica's failure: a call without an answer comes back as ``Failed`` with
  its kind (timeout, unavailable, dead, error) and a one-line reason naming the cause (the error
  raised inside the replica, as its own type and message); results are keyed by replica.
- A call that times out is cancelled (``ray.cancel``), so work still queued on the replica's
  control threads does not pile up; work already running finishes and its answer is dropped.
- Fan-outs send to every replica at once and wait until the one deadline.
- PREPARE (of a version that travels inside the call: no object-store refs), COMMIT and ABORT go
  through the control channel (``actors.control_channel``) to each replica that opened one, with
  the same answers and failures; through Ray to the others, and to those the channel could not
  reach before sending (a replica whose connection is refused is asked through Ray to open a new
  one). Every other call goes through Ray.
- What replicas say of themselves (node, version, state: lease replies, status answers) is noted in
  ``sightings``; every catch-up carries the plan ``planner`` makes for its version and the replicas
  catching up (``actors.catch_up``), so replicas catch up from peers without reading the log.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError

from .catch_up import CatchUpPlan, Sightings
from .control_channel import ControlChannel
from .payload import is_inline, seal
from .replies import Ack, Failed, FailureKind, LeaseReply, PrepareReply, error_reason

logger = logging.getLogger("weight_refit.coordinator")

__all__ = ["RayReplicaClient", "ReplicaClient", "replica_actor_name", "coordinator_actor_name"]


def replica_actor_name(fleet: str, replica_id: str) -> str:
    return f"{fleet}.replica.{replica_id}"


def coordinator_actor_name(fleet: str) -> str:
    return f"{fleet}.coordinator"


OnReply = Callable[[str, Any], None]
Exported = tuple[list[Any], dict[str, Any]]  # ([ref], specs) of a weight set a replica put


class ReplicaClient(ABC):
    """The coordinator's view of its replicas (see the module docstring for the contract)."""

    @abstractmethod
    def attach(self, rid: str) -> bool:
        """Find the running replica ``rid``; False if there is none."""

    @abstractmethod
    def forget(self, rid: str) -> None:
        """Drop the handle of a replica that left."""

    @abstractmethod
    def handles(self, rids: list[str]) -> dict[str, Any]:
        """Actor handles of ``rids`` (for drivers' routers)."""

    @abstractmethod
    def prepare(self, rids: list[str], timeout: float, epoch: int, txn: str, version: int,
                refs: list[Any] | None, specs: dict[str, Any], checksums: dict[str, str],
                source: dict[str, Any] | None, base_version: int | None,
                on_reply: OnReply | None = None,
                verifiers: dict[str, str] | None = None,
                probes: list[Any] | None = None,
                hashed_on: str | None = None) -> dict[str, PrepareReply | Failed]: ...

    @abstractmethod
    def commit(self, rids: list[str], timeout: float, epoch: int, txn: str,
               on_reply: OnReply | None = None, *, activate: bool = True) -> dict[str, Ack | Failed]:
        """COMMIT and (``activate``) ACTIVATE in one message: each replica pins its staged set as
        committed, then makes it live; the ``Ack`` names the version it then serves."""

    @abstractmethod
    def abort(self, rids: list[str], timeout: float, epoch: int, txn: str, reason: str,
              on_reply: OnReply | None = None) -> dict[str, Ack | Failed]: ...

    @abstractmethod
    def catch_up(self, rids: list[str], version: int, timeout: float) -> dict[str, Ack | Failed]:
        """``sync_to(version)`` on every replica in parallel, waiting for restarting ones."""

    @abstractmethod
    def status(self, rids: list[str], timeout: float) -> dict[str, dict[str, Any] | Failed]: ...

    @abstractmethod
    def export(self, rid: str, version: int, timeout: float) -> Exported | None | Failed:
        """``([ref], specs)`` of the set ``version`` that ``rid`` holds; None if it holds none."""

    @abstractmethod
    def renew(self, rid: str, epoch: int, lease_s: float, generation: int,
              on_reply: Callable[[str, LeaseReply | Failed], None] | None = None,
              cohort: str = "main") -> None:
        """Send a lease renewal (naming the replica's cohort) without waiting; ``on_reply`` runs
        when the answer comes."""

    def serving_stats(self, rids: list[str], since: float,
                      timeout: float) -> dict[str, dict[str, Any] | Failed]:
        """What each replica served from wall time ``since`` on (``actors.serving_stats``)."""
        return {rid: Failed(FailureKind.ERROR, "serving_stats is not supported here") for rid in rids}

    @abstractmethod
    def prefetch(self, rids: list[str], tag: str, refs: list[Any], specs: dict[str, Any],
                 verifiers: dict[str, str] | None, hashed_on: str | None = None) -> None:
        """Announce buckets of publication ``tag`` to ``rids`` without waiting (best effort:
        ``actors.prefetch``)."""

    @abstractmethod
    def withdraw(self, rids: list[str], tag: str) -> None:
        """Tell ``rids`` to free what they prefetched for ``tag``, without waiting."""

    def infer(self, rid: str, inputs: list[Any], min_version: int, timeout: float) -> dict[str, Any] | Failed:
        """One inference on ``rid`` (a canary judge's probe)."""
        return Failed(FailureKind.ERROR, "infer is not supported here")

    @abstractmethod
    def exclude(self, rid: str, epoch: int, generation: int) -> None:
        """Tell a replica it is no longer a member (best effort: its lease bounds a lost one)."""

    @abstractmethod
    def ping(self, rid: str, timeout: float) -> bool: ...

    @abstractmethod
    def drain(self, rid: str, timeout: float) -> int | Failed: ...

    @abstractmethod
    def kill(self, rid: str) -> None: ...


def _no_answer(method: str, timeout: float) -> Failed:
    return Failed(FailureKind.TIMEOUT, f"no answer to {method} within {timeout:g}s")


def _failure(method: str, exc: BaseException, timeout: float) -> Failed:
    """The reason names the cause; callers name the replica."""
    if isinstance(exc, GetTimeoutError):
        return _no_answer(method, timeout)
    if isinstance(exc, ActorUnavailableError):
        return Failed(FailureKind.UNAVAILABLE, f"{method} not delivered: the message was lost or the "
                                               "replica is restarting")
    if isinstance(exc, RayActorError):
        return Failed(FailureKind.DEAD, f"the replica died ({method})")
    cause = exc.cause if isinstance(exc, RayTaskError) and exc.cause is not None else exc
    return Failed(FailureKind.ERROR, error_reason(cause))


class RayReplicaClient(ReplicaClient):
    """``ReplicaClient`` over Ray actor handles of one fleet's named, detached replicas."""

    def __init__(self, fleet: str, namespace: str,
                 planner: Callable[[int, list[str]], CatchUpPlan | None] | None = None, *,
                 control_channel: bool = True) -> None:
        self._fleet = fleet
        self._namespace = namespace
        self.sightings = Sightings()
        self.planner = planner or (lambda version, rids: None)
        self._handles: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="replica-client")
        self.channel = ControlChannel(secrets.token_bytes(32)) if control_channel else None
        self._opening: dict[str, Any] = {}  # rid -> ref of its open_control call

    # -- handles

    def attach(self, rid: str) -> bool:
        try:
            handle = ray.get_actor(replica_actor_name(self._fleet, rid), self._namespace)
        except ValueError:
            return False
        with self._lock:
            self._handles[rid] = handle
        self._open_channel(rid)
        return True

    def forget(self, rid: str) -> None:
        with self._lock:
            self._handles.pop(rid, None)
            self._opening.pop(rid, None)
        if self.channel is not None:
            self.channel.forget(rid)
        self.sightings.forget(rid)

    def running(self) -> dict[str, Any]:
        """Handles of every replica actor of the fleet that Ray knows by name, member or not."""
        prefix = replica_actor_name(self._fleet, "")
        return {e["name"][len(prefix):]: ray.get_actor(e["name"], e["namespace"])
                for e in ray.util.list_named_actors(all_namespaces=True)
                if e["namespace"] == self._namespace and e["name"].startswith(prefix)}

    def handles(self, rids: list[str]) -> dict[str, Any]:
        with self._lock:
            return {rid: self._handles[rid] for rid in rids if rid in self._handles}

    def _handle(self, rid: str) -> Any:
        with self._lock:
            return self._handles.get(rid)

    # -- the control channel

    def _open_channel(self, rid: str) -> None:
        """Ask ``rid`` (through Ray, without waiting) to open its end of the control channel."""
        handle = self._handle(rid)
        if self.channel is None or handle is None:
            return
        try:
            ref = handle.open_control.remote(self.channel.key)
        except Exception:  # noqa: BLE001  (a dead handle can refuse the submission)
            logger.debug("open_control not sent to %s", rid, exc_info=True)
            return
        with self._lock:
            self._opening[rid] = ref

    def _on_channel(self, rids: list[str]) -> list[str]:
        """Those of ``rids`` whose end of the control channel is open (an answered open_control)."""
        assert self.channel is not None
        out = []
        for rid in rids:
            if not self.channel.usable(rid):
                continue
            if not self.channel.knows(rid):
                with self._lock:
                    ref = self._opening.get(rid)
                if ref is None:
                    self._open_channel(rid)
                    continue
                if not ray.wait([ref], timeout=0)[0]:
                    continue
                with self._lock:
                    self._opening.pop(rid, None)
                try:
                    self.channel.set_address(rid, tuple(ray.get(ref)))
                except Exception:  # noqa: BLE001  (it died or restarted: asked again next time)
                    logger.debug("open_control failed on %s", rid, exc_info=True)
                    continue
            out.append(rid)
        return out

    # -- calls

    def _fan_out(self, method: str, rids: list[str], timeout: float, *args: Any,
                 on_reply: OnReply | None = None, says: str | None = None,
                 channel: str | None = None) -> dict[str, Any]:
        """``method(*args)`` on every replica of ``rids`` at once; each answer, or the ``Failed``
        that names what went wrong (as ``says``, the message's name, when it is not ``method``).
        ``channel`` names the replicas' method to call over the control channel, where it is open."""
        what = says or method
        out: dict[str, Any] = {}
        pending: dict[Any, str] = {}
        fast = self._on_channel(rids) if channel is not None and self.channel is not None else []
        deadline = time.monotonic() + timeout
        self._submit(method, [r for r in rids if r not in fast], args, timeout, what, out, pending)
        if fast:
            assert self.channel is not None and channel is not None
            sent = self.channel.send(channel, fast, args, timeout, what)
            for rid in sent.unsent:
                self._open_channel(rid)  # it may have restarted on a new port
            self._submit(method, sent.unsent, args, timeout, what, out, pending)
            out.update(sent.wait(on_reply))
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1,
                                timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            rid = pending.pop(ready[0])
            try:
                out[rid] = ray.get(ready[0])
            except Exception as exc:  # noqa: BLE001  (every failure becomes a Failed)
                out[rid] = _failure(what, exc, timeout)
            if on_reply is not None:
                on_reply(rid, out[rid])
        for ref, rid in pending.items():
            self._cancel(ref)
            out[rid] = _no_answer(what, timeout)
            if on_reply is not None:
                on_reply(rid, out[rid])
        return out

    def _submit(self, method: str, rids: list[str], args: tuple[Any, ...], timeout: float, what: str,
                out: dict[str, Any], pending: dict[Any, str]) -> None:
        """Send ``method(*args)`` through Ray to ``rids``: refs into ``pending``, refusals into ``out``."""
        for rid in rids:
            handle = self._handle(rid)
            if handle is None:
                out[rid] = Failed(FailureKind.UNKNOWN, "no such replica running")
                continue
            try:
                pending[getattr(handle, method).remote(*args)] = rid
            except Exception as exc:  # noqa: BLE001  (a dead handle can refuse the submission)
                out[rid] = _failure(what, exc, timeout)

    @staticmethod
    def _cancel(ref: Any) -> None:
        try:
            ray.cancel(ref)
        except Exception:  # noqa: BLE001  (already finished or gone)
            logger.debug("cancel failed", exc_info=True)

    def _call(self, rid: str, method: str, timeout: float, *args: Any) -> Any:
        return self._fan_out(method, [rid], timeout, *args)[rid]

    def _call_until(self, rid: str, method: str, timeout: float, *args: Any) -> Any:
        """``_call`` that waits for a restarting actor (Ray refuses calls while it restarts)."""
        deadline = time.monotonic() + timeout
        while True:
            out = self._call(rid, method, max(0.1, deadline - time.monotonic()), *args)
            if not (isinstance(out, Failed) and out.kind is FailureKind.UNAVAILABLE) \
                    or time.monotonic() >= deadline:
                return out
            time.sleep(0.2)

    def prepare(self, rids: list[str], timeout: float, epoch: int, txn: str, version: int,
                refs: list[Any] | None, specs: dict[str, Any], checksums: dict[str, str],
                source: dict[str, Any] | None, base_version: int | None,
                on_reply: OnReply | None = None,
                verifiers: dict[str, str] | None = None,
                probes: list[Any] | None = None,
                hashed_on: str | None = None) -> dict[str, PrepareReply | Failed]:
        # every argument but the refs sealed once for every member: one for Ray to serialise, not
        # ten (see actors.payload); refs stay out, as Ray counts the references it carries
        sealed = seal((epoch, txn, version, specs, checksums, source, base_version, verifiers, probes,
                       hashed_on))
        # a version in the object store goes through Ray, which counts the references its calls carry
        inline = refs is None or all(is_inline(b) for b in refs)
        return self._fan_out("prepare_sealed", rids, timeout, sealed, refs, on_reply=on_reply,
                             says="prepare", channel="prepare" if inline else None)

    def commit(self, rids: list[str], timeout: float, epoch: int, txn: str,
               on_reply: OnReply | None = None, *, activate: bool = True) -> dict[str, Ack | Failed]:
        acks = self._fan_out("commit", rids, timeout, epoch, txn, activate, on_reply=on_reply,
                             channel="commit")
        self.sightings.saw_acks(acks)
        return acks

    def abort(self, rids: list[str], timeout: float, epoch: int, txn: str, reason: str,
              on_reply: OnReply | None = None) -> dict[str, Ack | Failed]:
        return self._fan_out("abort", rids, timeout, epoch, txn, reason, on_reply=on_reply,
                             channel="abort")

    def catch_up(self, rids: list[str], version: int, timeout: float) -> dict[str, Ack | Failed]:
        plan = self.planner(version, rids)
        futures = {rid: self._pool.submit(self._call_until, rid, "sync_to", timeout, version, plan)
                   for rid in rids}
        acks = {rid: f.result() for rid, f in futures.items()}
        self.sightings.saw_acks(acks)
        return acks

    def status(self, rids: list[str], timeout: float) -> dict[str, dict[str, Any] | Failed]:
        out = self._fan_out("status", rids, timeout)
        for rid, st in out.items():
            if isinstance(st, dict):
                self.sightings.saw_status(rid, st)
        return out

    def export(self, rid: str, version: int, timeout: float) -> Exported | None | Failed:
        return self._call(rid, "export", timeout, version)

    def prefetch(self, rids: list[str], tag: str, refs: list[Any], specs: dict[str, Any],
                 verifiers: dict[str, str] | None, hashed_on: str | None = None) -> None:
        self._send(rids, "prefetch", tag, refs, specs, verifiers, hashed_on)

    def withdraw(self, rids: list[str], tag: str) -> None:
        self._send(rids, "withdraw", tag)

    def _send(self, rids: list[str], method: str, *args: Any) -> None:
        """Call ``method`` on ``rids`` and wait for nothing (a lost call changes nothing)."""
        for handle in self.handles(rids).values():
            try:
                getattr(handle, method).remote(*args)
            except Exception:  # noqa: BLE001  (a dead handle can refuse the submission)
                logger.debug("%s not sent", method, exc_info=True)

    def renew(self, rid: str, epoch: int, lease_s: float, generation: int,
              on_reply: Callable[[str, LeaseReply | Failed], None] | None = None,
              cohort: str = "main") -> None:
        handle = self._handle(rid)
        if handle is None:
            return
        ref = handle.renew_lease.remote(epoch, lease_s, generation, cohort)
        if on_reply is None:
            return

        def done(future: Any) -> None:
            try:
                reply = future.result()
            except Exception as exc:  # noqa: BLE001
                reply = _failure("renew_lease", exc, lease_s)
            if isinstance(reply, LeaseReply):
                self.sightings.saw(rid, reply.node, reply.version, reply.state)
            on_reply(rid, reply)

        ref.future().add_done_callback(done)

    def serving_stats(self, rids: list[str], since: float,
                      timeout: float) -> dict[str, dict[str, Any] | Failed]:
        return self._fan_out("serving_stats", rids, timeout, since)

    def infer(self, rid: str, inputs: list[Any], min_version: int, timeout: float) -> dict[str, Any] | Failed:
        return self._call(rid, "infer", timeout, inputs, min_version)

    def exclude(self, rid: str, epoch: int, generation: int) -> None:
        handle = self._handle(rid)
        if handle is not None:
            handle.exclude.remote(epoch, generation)

    def ping(self, rid: str, timeout: float) -> bool:
        return self._call(rid, "ping", timeout) == rid

    def drain(self, rid: str, timeout: float) -> int | Failed:
        return self._call(rid, "drain", timeout + 5.0, timeout)

    def kill(self, rid: str) -> None:
        handle = self._handle(rid)
        if handle is not None:
            try:
                ray.kill(handle, no_restart=True)
            except Exception:  # noqa: BLE001  (already dead)
                logger.debug("kill of %s failed", rid, exc_info=True)
