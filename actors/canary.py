"""Canaries, as plain Python: what the caller asks for (``Canary``, ``CanaryJudge``), which members
form the cohort, and the judge's verdict from the cohorts' serving statistics.

Contract:
- ``Canary(replicas=k)`` or ``Canary(fraction=f)`` (exactly one), ``traffic`` in (0, 1]: the share
  of new requests that handles not yet on the canary send to it. Bad values raise ``ValueError``
  naming the field, before anything is published.
- ``cohort`` picks the canary's members: the first ``k`` members by replica number (``fraction``:
  ``ceil(f * members)``), at least one, and never every member (a canary needs a rest of the fleet
  to compare with and to fall back on).
- ``CanaryJudge(window_s, max_error_rate, max_p99_ratio, probes, min_requests)`` decides after
  ``window_s``: abort when the canary cohort's error rate exceeds ``max_error_rate``, when its p99
  latency exceeds ``max_p99_ratio`` times the rest's, when it served fewer than ``min_requests``, or
  when a probe fails on a canary replica; else promote. ``verdict`` says why, either way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Canary", "CanaryJudge", "CohortStats", "Verdict", "cohort", "verdict"]


def _share(name: str, value: float, *, zero_ok: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"canary {name} must be a number in {'[0' if zero_ok else '(0'}, 1], got {value!r}")
    if not (0.0 <= value <= 1.0) or (value == 0.0 and not zero_ok):
        raise ValueError(f"canary {name} must be in {'[0' if zero_ok else '(0'}, 1], got {value!r}")
    return float(value)


@dataclass(frozen=True)
class CanaryJudge:
    """Decide a canary by itself after ``window_s`` seconds (see the module docstring)."""

    window_s: float
    max_error_rate: float = 0.0
    max_p99_ratio: float | None = None
    probes: Sequence[Any] = ()  # engines.Probe, run on each canary replica's live set
    min_requests: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.window_s, bool) or not isinstance(self.window_s, (int, float)) \
                or not (0 < self.window_s < float("inf")):
            raise ValueError(f"CanaryJudge window_s must be a positive number of seconds, "
                             f"got {self.window_s!r}")
        _share("judge max_error_rate", self.max_error_rate, zero_ok=True)
        if self.max_p99_ratio is not None and (isinstance(self.max_p99_ratio, bool)
                                               or not isinstance(self.max_p99_ratio, (int, float))
                                               or not self.max_p99_ratio > 0):
            raise ValueError(f"CanaryJudge max_p99_ratio must be a positive number or None, "
                             f"got {self.max_p99_ratio!r}")
        n = self.min_requests
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"CanaryJudge min_requests must be an int >= 0, got {self.min_requests!r}")
        from engines.probes import Probe

        for p in self.probes:
            if not isinstance(p, Probe):
                raise ValueError(f"CanaryJudge probes must be cluster.Probe objects, got {type(p).__name__}")
        object.__setattr__(self, "probes", tuple(self.probes))

    def settings(self) -> dict[str, Any]:
        """What the log records (the probes travel with the call, not in the log)."""
        return {"window_s": float(self.window_s), "max_error_rate": float(self.max_error_rate),
                "max_p99_ratio": self.max_p99_ratio, "min_requests": self.min_requests,
                "probes": [p.name for p in self.probes]}


@dataclass(frozen=True)
class Canary:
    """Commit a refit on a cohort only and route ``traffic`` of new requests to it."""

    replicas: int | None = None
    fraction: float | None = None
    traffic: float = 0.1
    judge: CanaryJudge | None = None

    def __post_init__(self) -> None:
        if (self.replicas is None) == (self.fraction is None):
            raise ValueError("Canary needs exactly one of replicas= (a count) or fraction= (a share of "
                             f"the members), got replicas={self.replicas!r}, fraction={self.fraction!r}")
        k = self.replicas
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"canary replicas must be an int >= 1, got {self.replicas!r}")
        if self.fraction is not None:
            _share("fraction", self.fraction)
        _share("traffic", self.traffic)
        if self.judge is not None and not isinstance(self.judge, CanaryJudge):
            raise ValueError(f"canary judge must be a CanaryJudge, got {type(self.judge).__name__}")


def _number(rid: str) -> tuple[int, str]:
    digits = rid.lstrip("r")
    return (int(digits), rid) if digits.isdigit() else (1 << 30, rid)


def cohort(canary: Canary, members: Sequence[str]) -> list[str]:
    """The canary's members (see the module docstring); ValueError when the fleet is too small."""
    ordered = sorted(members, key=_number)
    if len(ordered) < 2:
        raise ValueError(f"a canary needs at least 2 members (one canary, one to compare with), "
                         f"the fleet has {len(ordered)}")
    k = canary.replicas if canary.replicas is not None else math.ceil((canary.fraction or 0) * len(ordered))
    k = max(1, k)
    if k >= len(ordered):
        raise ValueError(f"canary of {k} replica(s) would take every one of the {len(ordered)} members; "
                         "a canary must leave the rest of the fleet on the current version")
    return ordered[:k]


@dataclass
class CohortStats:
    """What one cohort served during the window: requests, errors and latencies (seconds)."""

    served: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)

    def add(self, stats: dict[str, Any]) -> None:
        self.served += int(stats.get("served", 0))
        self.errors += int(stats.get("errors", 0))
        self.latencies.extend(float(x) for x in stats.get("latencies", []))

    @property
    def error_rate(self) -> float:
        return self.errors / self.served if self.served else 0.0

    @property
    def p99(self) -> float | None:
        return float(np.percentile(self.latencies, 99)) if self.latencies else None


@dataclass(frozen=True)
class Verdict:
    promote: bool
    reason: str


def verdict(settings: dict[str, Any], canary: CohortStats, main: CohortStats,
            probe_failures: Sequence[str] = ()) -> Verdict:
    """The judge's decision from the window's statistics (``settings``: ``CanaryJudge.settings()``)."""
    problems: list[str] = []
    checks: list[str] = []
    if canary.served < settings.get("min_requests", 0):
        problems.append(f"the canary served {canary.served} request(s), fewer than min_requests="
                        f"{settings['min_requests']}")
    rate, limit = canary.error_rate, settings.get("max_error_rate", 0.0)
    over = rate > limit
    (problems if over else checks).append(
        f"error rate {rate:.2%} ({canary.errors}/{canary.served}) {'>' if over else '<='} {limit:.2%}")
    ratio_limit = settings.get("max_p99_ratio")
    if ratio_limit is not None:
        if canary.p99 is None or main.p99 is None or main.p99 <= 0:
            checks.append("p99 ratio not judged (no requests in "
                          f"{'the canary' if canary.p99 is None else 'the rest of the fleet'})")
        else:
            ratio = canary.p99 / main.p99
            (problems if ratio > ratio_limit else checks).append(
                f"p99 {canary.p99 * 1e3:.1f} ms / {main.p99 * 1e3:.1f} ms = {ratio:.2f} "
                f"{'>' if ratio > ratio_limit else '<='} {ratio_limit:g}")
    problems.extend(probe_failures)
    if settings.get("probes") and not probe_failures:
        checks.append(f"{len(settings['probes'])} probe(s) passed")
    if problems:
        return Verdict(False, "judge: " + "; ".join(problems))
    return Verdict(True, "judge: " + "; ".join(checks))
