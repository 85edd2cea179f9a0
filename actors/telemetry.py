"""Structured phase logs and Prometheus metrics (through Ray's metrics API).

Logs: one JSON line per protocol phase per participant, with transaction id, version and timing,
on the ``weight_refit`` logger (Ray puts actor logs in the session's worker logs).

Metrics (exported by Ray's metrics agent on each node's metrics export port):
- ``weight_refit_refit_duration_seconds`` histogram, tag ``fleet``, ``outcome``.
- ``weight_refit_active_version`` gauge, tags ``fleet``, ``replica``: the version is the value,
  never a label, so the number of series stays bounded by the replica count.
- ``weight_refit_prepare_failures_total`` counter, tags ``fleet``, ``reason`` (an error class
  name: a small, closed set).
- ``weight_refit_requests_total`` counter and ``weight_refit_request_latency_seconds`` histogram,
  tags ``fleet``, ``replica``, ``cohort`` (``main``, or ``canary`` while the replica is in a
  canary's cohort; never a version).
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import re
import threading
import time
from functools import cache
from typing import Any

logger = logging.getLogger("weight_refit")

_LATENCY_BOUNDARIES = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0]
_REFIT_BOUNDARIES = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0]


def phase_log(component: str, phase: str, txn: str | None, version: int | None, seconds: float,
              **extra: Any) -> None:
    """One structured line: ``{"ts", "component", "phase", "txn", "version", "seconds", ...}``
    (built only when the ``weight_refit`` logger takes INFO records)."""
    if not logger.isEnabledFor(logging.INFO):
        return
    record = {"ts": round(time.time(), 6), "component": component, "phase": phase, "txn": txn,
              "version": version, "seconds": round(seconds, 6), **extra}
    logger.info(json.dumps(record, default=str))


@cache
def _metrics() -> dict[str, Any]:
    from ray.util import metrics

    return {
        "refit": metrics.Histogram("weight_refit_refit_duration_seconds",
                                   description="Refit wall time, BEGIN to every member active.",
                                   boundaries=_REFIT_BOUNDARIES, tag_keys=("fleet", "outcome")),
        "version": metrics.Gauge("weight_refit_active_version",
                                 description="Active weight version of each replica.",
                                 tag_keys=("fleet", "replica")),
        "prepare_failures": metrics.Counter("weight_refit_prepare_failures_total",
                                            description="NO votes and prepare timeouts, by reason.",
                                            tag_keys=("fleet", "reason")),
        "requests": metrics.Counter("weight_refit_requests_total",
                                    description="Inference requests served.",
                                    tag_keys=("fleet", "replica", "cohort")),
        "latency": metrics.Histogram("weight_refit_request_latency_seconds",
                                     description="Inference latency inside the replica.",
                                     boundaries=_LATENCY_BOUNDARIES, tag_keys=("fleet", "replica", "cohort")),
    }


def _safe(fn: Any) -> None:
    """Run a metrics update on the metrics thread: recording a metric with Ray costs a fraction
    of a millisecond, which neither a request nor a refit should wait for."""
    with contextlib.suppress(queue.Full):  # the thread cannot keep up: drop it, never block
        _updates().put_nowait(fn)


@cache
def _updates() -> queue.Queue[Any]:
    q: queue.Queue[Any] = queue.Queue(maxsize=10_000)

    def run() -> None:
        while True:
            fn = q.get()
            try:
                fn()
            except Exception:  # noqa: BLE001  (metrics must never break serving or refits)
                logger.debug("metrics update failed", exc_info=True)

    threading.Thread(target=run, name="metrics", daemon=True).start()
    return q


def observe_refit(fleet: str, outcome: str, seconds: float) -> None:
    _safe(lambda: _metrics()["refit"].observe(seconds, tags={"fleet": fleet, "outcome": outcome}))


def set_version(fleet: str, replica: str, version: int) -> None:
    _safe(lambda: _metrics()["version"].set(version, tags={"fleet": fleet, "replica": replica}))


def count_prepare_failure(fleet: str, reason: str) -> None:
    _safe(lambda: _metrics()["prepare_failures"].inc(tags={"fleet": fleet, "reason": reason}))


def observe_request(fleet: str, replica: str, cohort: str, seconds: float) -> None:
    def update() -> None:
        m = _metrics()
        tags = {"fleet": fleet, "replica": replica, "cohort": cohort}
        m["requests"].inc(tags=tags)
        m["latency"].observe(seconds, tags=tags)

    _safe(update)


def reason_class(reason: str) -> str:
    """The error class of a NO vote's reason (``"ChecksumMismatch: ..."`` -> ``ChecksumMismatch``)."""
    head = reason.split(":", 1)[0].strip()
    inner = re.fullmatch(r"\w+\((\w+)\)", head)  # RayTaskError(FailpointError) -> FailpointError
    if inner:
        head = inner.group(1)
    return head if head.isidentifier() else "other"
