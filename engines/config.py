"""Build-time configuration of a refittable engine."""

from __future__ import annotations

import re
from enum import Enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_DEVICE_RE = re.compile(r"^(cpu|cuda(:\d+)?|mlu(:\d+)?)$")


class MemoryMode(str, Enum):
    """Where a staged weight set lives until commit.

    ``swap``: beside the live set on the device; commit is a reference swap and inference never
    waits. ``copy``: in (pinned) host memory; commit copies into the live buffers under a short
    exclusive section, for models that do not fit on the device twice. ``shared`` (CPU, torch
    backend): as ``swap``, but a set staged with ``borrow=True`` serves from the caller's tensors
    without copying them; the fleet passes the object store's read-only copy, so the replicas of
    one node serve one copy of each version.
    """

    SWAP = "swap"
    COPY = "copy"
    SHARED = "shared"


class NonFinitePolicy(str, Enum):
    """What staging does with NaN/Inf in floating-point weights: refuse them, or let them through."""

    REJECT = "reject"
    ALLOW = "allow"


class BuilderConfig(BaseModel):
    """How an engine is built and run. Unknown keys are rejected.

    ``enable_refit`` defaults to False as in MagicMind: an engine built without it refuses every
    refit. ``keep_previous`` keeps the set a commit replaced (swap and shared modes), for instant rollback.
    ``memory_budget_bytes`` bounds the extra memory staging may take (None: unbounded).
    """

    model_config = ConfigDict(extra="forbid", use_enum_values=False)

    enable_refit: bool = False
    device: str = "cpu"
    backend: str = "torch"
    memory_mode: MemoryMode = MemoryMode.SWAP
    keep_previous: bool = True
    non_finite: NonFinitePolicy = NonFinitePolicy.REJECT
    memory_budget_bytes: int | None = Field(default=None, ge=0)
    copy_bucket_bytes: int = Field(default=64 << 20, gt=0)
    host_to_device: Literal["pinned", "pageable"] = Field(
        default="pinned", description="cuda: a stage copies large tensors from pageable host memory "
                                      "through two pinned buffers (pinned) or hands them to the card as "
                                      "they are (pageable)")
    dynamic_batch: tuple[int, int] | None = Field(
        default=None, description="(min, max) of a dynamic batch dim 0 shared by every input (build_engine)")

    @field_validator("dynamic_batch")
    @classmethod
    def _check_dynamic_batch(cls, value: tuple[int, int] | None) -> tuple[int, int] | None:
        if value is not None and not 1 <= value[0] <= value[1]:
            raise ValueError(f"dynamic_batch must be (min, max) with 1 <= min <= max, got {value}")
        return value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if not _DEVICE_RE.match(value):
            raise ValueError(f"device must be 'cpu', 'cuda[:N]' or 'mlu[:N]', got {value!r}")
        return value

    @field_validator("backend")
    @classmethod
    def _check_backend(cls, value: str) -> str:
        if value not in ("torch", "magicmind"):
            raise ValueError(f"backend must be 'torch' or 'magicmind', got {value!r}")
        return value

    @model_validator(mode="after")
    def _check_shared_mode(self) -> BuilderConfig:
        if self.memory_mode is MemoryMode.SHARED and (self.device != "cpu" or self.backend != "torch"):
            raise ValueError(f"memory_mode 'shared' serves from host memory: it needs device 'cpu' and "
                             f"backend 'torch', got device {self.device!r}, backend {self.backend!r}")
        return self
