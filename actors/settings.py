"""What the coordinator and each replica are started with: typed settings that cross the actor
boundary as pydantic models (validated once, by the driver; no defaults restated by the actors).

``Timeouts`` is also the fleet config's ``timeouts`` section (``cluster.config.TimeoutConfig``).
``Timeouts.refit_call_s`` is the longest a legal refit can take; drivers wait that long for the
coordinator's answer, so a slow but legal phase is never cut off by the driver first.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["CoordinatorSettings", "ReplicaSettings", "Timeouts"]


class Timeouts(BaseModel):
    """Timeouts in seconds, all strictly positive and finite.

    ``prepare_s``: one PREPARE (fetch, verify, stage) per replica; ``commit_s``: one COMMIT ack;
    ``activate_s``: one ACTIVATE; ``request_s``: one inference request; ``lease_s``: a member's
    serving lease; ``launch_s``: starting the fleet (placement, actors, engine loads), and how long
    a refit waits for a restarting member to catch up; ``persist_s``: writing a version to the
    checkpoint store (``disk``: overlaps PREPARE and COMMIT waits for it; ``replicated``: after the
    refit, in the background).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    prepare_s: float = Field(default=60.0, gt=0.0)
    commit_s: float = Field(default=10.0, gt=0.0)
    activate_s: float = Field(default=10.0, gt=0.0)
    request_s: float = Field(default=30.0, gt=0.0)
    lease_s: float = Field(default=10.0, gt=0.0)
    launch_s: float = Field(default=120.0, gt=0.0)
    persist_s: float = Field(default=300.0, gt=0.0)

    @field_validator("*", mode="before")
    @classmethod
    def _seconds_not_bools(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("must be a number of seconds, not true/false")
        return value

    def refit_call_s(self) -> float:
        """The longest one refit may legally take inside the coordinator: a replaced persistence
        worker's start, PREPARE overlapped with the checkpoint write, COMMIT and ACTIVATE (each
        with one retry), the parallel catch-up of members lost meanwhile, and the wait-out of
        excluded members' leases; plus a margin for the calls themselves."""
        return (self.launch_s + max(self.prepare_s, self.persist_s) + 2 * self.commit_s
                + 2 * self.activate_s + self.launch_s + self.lease_s + 30.0)


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    fleet: str = Field(min_length=1)
    namespace: str = Field(min_length=1)
    state_dir: str = Field(min_length=1)
    state_options: dict[str, Any] = Field(default_factory=dict)  # fsspec's, for a URL state_dir
    failpoints: dict[str, str] = Field(default_factory=dict)


class CoordinatorSettings(_Settings):
    """The coordinator's settings. ``driver_config`` is the fleet config as the launching driver
    gave it: handed back to drivers that connect, never read by the coordinator."""

    timeouts: Timeouts = Field(default_factory=Timeouts)
    commit_policy: Literal["strict", "exclude"] = "strict"
    max_exclude: int = Field(default=0, ge=0)
    retain_versions: int = Field(default=3, ge=2)
    persist_fsync: bool = True
    durability: Literal["replicated", "disk"] = "replicated"
    history_window: int = Field(default=1000, ge=10)
    driver_config: dict[str, Any] = Field(default_factory=dict)
    tied: list[list[str]] = Field(default_factory=list)  # weights the engine ties (one tensor)
    control_channel: bool = True  # PREPARE/COMMIT/ABORT over actors.control_channel where it is open


class ReplicaSettings(_Settings):
    """One replica's settings: its engine, device and card, and how it serves."""

    engine: str = Field(min_length=1)
    device: str = Field(min_length=1)
    card: int | None = None
    memory_mode: Literal["swap", "copy", "shared"] = "swap"
    host_to_device: Literal["pinned", "pageable"] = "pinned"
    keep_previous: bool = True
    memory_budget_bytes: int | None = Field(default=None, ge=1)
    torch_threads: int = Field(default=1, ge=1)
    prefill_sets: int = Field(default=0, ge=0)
    fetch_timeout_s: float = Field(default=60.0, gt=0.0)
    lease_s: float = Field(default=10.0, gt=0.0)
    batch_size: int | None = Field(default=None, ge=1)  # None: no batching
    batch_wait_s: float = Field(default=0.005, ge=0.0)
