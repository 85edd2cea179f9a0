"""Fleet configuration: pydantic models loaded from and saved to YAML.

Every model forbids unknown keys, and every bad value fails with a message naming its field, so a
typo in a YAML file is an error rather than a silently ignored setting.

Relative paths (``engine``, ``state_dir``) are resolved against the *current working directory* of
the process that validates the config (not against the YAML file's directory), and ``~`` is
expanded. After validation both are absolute path strings, so the config can be handed to actors
whose working directory differs from the driver's. For ``ray job submit --working-dir .`` the job's
working directory is the uploaded directory, so repo-relative paths keep working there.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from actors.failpoints import check_action
from actors.object_state import is_url
from actors.settings import Timeouts as TimeoutConfig
from actors.store import validate_label

__all__ = [
    "ConfigError",
    "FleetConfig",
    "PlacementConfig",
    "RoutingConfig",
    "TimeoutConfig",
    "NAME_PATTERN",
]

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_NAME_RE = re.compile(NAME_PATTERN)

# ray_init keys that the fleet config owns itself (``address``, ``namespace``) or that would
# conflict with the fleet's own choices.
_RESERVED_RAY_INIT_KEYS = frozenset({"address", "namespace"})


class ConfigError(ValueError):
    """A fleet config file could not be read or is invalid.

    Raised by :meth:`FleetConfig.from_yaml`; the message names the file and, for invalid values,
    every offending field (it embeds pydantic's error list). Direct construction
    (``FleetConfig(**fields)``) raises :class:`pydantic.ValidationError` instead; both are
    ``ValueError`` subclasses.
    """


def describe_validation_error(exc: ValidationError) -> str:
    """Every error as ``field.path: message`` on one line ("replicass: unknown field")."""
    parts = []
    for e in exc.errors():
        where = ".".join(str(x) for x in e.get("loc", ())) or "(config)"
        msg = "unknown field" if e.get("type") == "extra_forbidden" else e.get("msg", "invalid")
        msg = msg.removeprefix("Value error, ")
        got = e.get("input")
        shown = "" if e.get("type") == "extra_forbidden" or isinstance(got, dict) else f" (got {got!r})"
        parts.append(f"{where}: {msg}{shown}")
    return "; ".join(parts)


def _abs_path(value: str) -> str:
    """Expand ``~`` and make ``value`` absolute against the current working directory."""
    return os.path.abspath(os.path.expanduser(value))


class PlacementConfig(BaseModel):
    """Where replicas run and what each one reserves.

    Contract:
      - ``cards_per_node``: accelerator cards on each node; ``None`` means discover them (Ray's GPU
        resource for cuda, ``/dev/cambricon_dev*`` or the node's ``MLU`` resource for mlu). When the
        fleet starts its own single-node Ray (``FleetConfig.address`` is ``None``) it is also the
        number of cards that Ray is told about.
      - ``gpu_fraction`` in (0, 1]: the share of one card each replica reserves; below 1 several
        replicas share a card (``floor(1 / gpu_fraction)`` per card).
      - ``cpus_per_replica`` >= 0: Ray's *logical* CPU reservation per replica. Keep it tiny (the
        default 0.01): a whole CPU per replica would leave replicas pending forever on a small Ray.
      - ``strategy``: ``SPREAD`` spreads replicas over nodes, ``PACK`` fills nodes first.
      - ``mlu_resource``: the custom Ray resource name that counts MLU cards on a node when the
        installed Ray has no MLU accelerator manager.
    """

    model_config = ConfigDict(extra="forbid")

    cards_per_node: int | None = Field(strict=True, default=None, ge=1)
    gpu_fraction: float = Field(default=1.0, gt=0.0, le=1.0)
    cpus_per_replica: float = Field(default=0.01, ge=0.0)
    strategy: Literal["SPREAD", "PACK"] = "SPREAD"
    mlu_resource: str = Field(default="MLU", min_length=1, pattern=r"^[A-Za-z_][A-Za-z0-9_.-]*$")

    def replicas_per_card(self) -> int:
        """How many replicas fit on one card at ``gpu_fraction`` (1 when not shared)."""
        return max(1, math.floor(1.0 / self.gpu_fraction + 1e-9))


class RoutingConfig(BaseModel):
    """How client handles route inference requests.

    ``policy``: only ``least_outstanding`` (fewest requests in flight) for now;
    ``max_queue_per_replica`` >= 1: requests in flight per replica before the handle answers
    "overloaded"; ``retries_on_stale`` >= 0: how many other members a "stale" answer is retried on;
    ``refresh_s`` > 0: how often a handle re-reads the member list and the routing table (a
    canary's split, members taken out) in the background.
    """

    model_config = ConfigDict(extra="forbid")

    policy: Literal["least_outstanding"] = "least_outstanding"
    max_queue_per_replica: int = Field(strict=True, default=64, ge=1)
    retries_on_stale: int = Field(strict=True, default=3, ge=0)
    refresh_s: float = Field(default=2.0, gt=0, le=3600,
                             description="seconds between a handle's background re-reads of the members and "
                                         "the routing table")


class BatchingConfig(BaseModel):
    """Replicas join concurrent requests into one run of the engine along its dynamic batch dim 0
    (``actors.batcher``): a batch runs when it holds ``max_batch_size`` samples or ``max_wait_ms``
    after its first request arrived."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(strict=True, ge=1, description="samples per run of the engine, at most")
    max_wait_ms: float = Field(default=5.0, ge=0.0, allow_inf_nan=False,
                               description="how long a batch's first request waits for others")


class FleetConfig(BaseModel):
    """One fleet: its name, engine, replicas, placement, state directory, timeouts and policies.

    Contract:
      - Unknown keys are rejected and every bad value fails naming its field (pydantic
        ``ValidationError``; :meth:`from_yaml` wraps it in :class:`ConfigError` naming the file).
      - ``name`` matches ``NAME_PATTERN`` without ``..`` (``actors.store.validate_label``, the one
        rule every command uses): it names the coordinator actor, the
        placement group and the default state directory.
      - ``engine`` and ``state_dir`` are absolute path strings after validation (``~`` expanded,
        relative paths resolved against the current working directory), except a ``state_dir``
        that is an object-storage URL (``scheme://``), kept as given without a trailing slash.
        ``state_dir`` defaults to ``~/.weight-refit/<name>``. Neither has to exist yet.
      - ``max_exclude < replicas``; ``ray_init`` may not carry ``address`` or ``namespace`` (use the
        fields of the same name).
      - Impossible placements that the config alone proves are rejected: a single-node fleet
        (``address`` is ``None``) on ``cuda``/``mlu`` with ``cards_per_node`` given must fit
        ``replicas <= cards_per_node * floor(1 / gpu_fraction)``. Multi-node capacity is checked at
        launch against the live cluster (``cluster.placement.check_capacity``).
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        description="fleet label: names the coordinator actor, placement groups and default state dir")
    namespace: str = Field(default="weight-refit", min_length=1,
                           description="Ray namespace of the detached actors (Fleet.connect looks here)")
    address: str | None = Field(default=None,
        description="Ray address; null: RAY_ADDRESS if set, else a local Ray")
    engine: str = Field(min_length=1, description="engine file every replica loads (built with enable_refit)")
    replicas: int = Field(strict=True, default=2, ge=1, description="number of serving replicas")
    device: Literal["cpu", "cuda", "mlu"] = Field(default="cpu", description="card kind each replica pins")
    placement: PlacementConfig = Field(default_factory=PlacementConfig)
    state_dir: str = Field(min_length=1,
        description="durable log + checkpoint store: a local path (a shared filesystem on multi-node) "
                    "or an object-storage URL (s3://bucket/prefix, gs://, file://); "
                    "default ~/.weight-refit/<name>")
    state_options: dict[str, Any] = Field(default_factory=dict,
        description="fsspec storage options for a URL state_dir (s3: key, secret, "
                    "client_kwargs.endpoint_url); credentials may come from the environment instead")
    timeouts: TimeoutConfig = Field(default_factory=TimeoutConfig)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    commit_policy: Literal["strict", "exclude"] = Field(
        default="strict",
        description="strict: any NO aborts; exclude: take up to max_exclude NO voters out of the fleet "
                    "and commit among the rest ('evict' is read as 'exclude')")
    max_exclude: int = Field(strict=True, default=0, ge=0,
                             validation_alias=AliasChoices("max_exclude", "max_evict"),
                             description="members the exclude policy may take out (< replicas; "
                                         "'max_evict' is read as this)")
    memory_mode: Literal["swap", "copy", "shared"] = Field(
        default="swap",
        description="swap: stage beside the live set; copy: stage in host memory, copy at commit; "
                    "shared (device cpu): serve straight from the object store's read-only copy, "
                    "one copy per node for all its replicas")
    keep_previous: bool = Field(default=True,
        description="keep the previous set on the card for instant rollback")
    host_to_device: Literal["pinned", "pageable"] = Field(
        default="pinned",
        description="cuda: a stage copies each large tensor from the object store to the card in "
                    "chunks through two pinned buffers per replica (pinned), or hands the pageable "
                    "copy to the card as it is (pageable); no effect on cpu and mlu")
    prefill_buffers: bool = Field(default=True,
        description="swap mode: allocate and touch the spare staging buffers at launch (the steady "
                    "state's footprint), so the first refits do not stage into fresh memory")
    torch_threads: int = Field(strict=True, default=1, ge=1, description="intra-op threads per replica")
    memory_budget_bytes: int | None = Field(
        default=None, ge=1, strict=True,
        description="extra bytes a replica may hold for staging; null: no limit")
    failpoints: dict[str, str] = Field(default_factory=dict,
        description="fault injection (tests): name -> action")
    ray_init: dict[str, Any] = Field(default_factory=dict,
        description="extra ray.init kwargs for a Ray the fleet starts (weight-refit launch: "
                    "as ray start --head flags)")
    coordinator_resources: dict[str, float] = Field(default_factory=dict,
        description="custom Ray resources the coordinator needs: it runs only on nodes that have them "
                    "(e.g. {coordinator: 1} on a node group you choose); empty: Ray places it, "
                    "preferring the head node")
    coordinator_env: dict[str, str] = Field(default_factory=dict,
        description="extra environment variables of the coordinator's process (fault tests: Ray's "
                    "RAY_testing_rpc_failure there loses the coordinator's calls to replicas)")
    durability: Literal["replicated", "disk"] = Field(
        default="replicated",
        description="replicated: COMMIT once every member holds the verified set, the checkpoint follows "
                    "(logged PERSISTED); disk: COMMIT waits for the fsync'd checkpoint")
    control_channel: bool = Field(default=True,
        description="send PREPARE (of a version of at most 64 KiB), COMMIT and ABORT over one TCP "
                    "connection per replica, authenticated with a key the coordinator makes, instead of "
                    "Ray calls (which cost more per round); false: Ray calls only")
    history_window: int = Field(strict=True, default=1000, ge=10,
        description="transactions the log and the coordinator keep (older ones go to txn.archive.jsonl; "
                    "their idempotency keys are forgotten); bounds restart and refit costs")
    persist_fsync: bool = Field(default=True,
        description="fsync checkpoint files (the log's decision records are fsync'd regardless)")
    retain_versions: int = Field(strict=True, default=3, ge=2,
                                 description="committed versions kept in the store")
    probes: str | None = Field(
        default=None, description="a safetensors file of behaviour probes (engines.save_probes) run on "
                                  "every refit's staged set before the vote; null: none")
    batching: BatchingConfig | None = Field(
        default=None, description="join concurrent requests along the engine's dynamic batch dim; null: off")
    bucket_bytes: int = Field(strict=True, default=64 << 20, ge=1 << 20,
        description="a refit is put into the object store in buckets of at most this many bytes (a "
                    "larger tensor is a bucket of its own), checksummed one bucket ahead of the put")
    prefetch: bool = Field(
        default=False, description="announce each bucket to the replicas as soon as it is put: they copy "
                                   "and hash it while the next is put, ahead of the PREPARE (swap mode "
                                   "without a memory budget copies ahead, shared mode hashes ahead); off "
                                   "by default: slower where the host's cores are few (docs/benchmarks.md)")
    engine_device: str | None = Field(
        default=None, pattern=r"^(cpu|cuda(:\d+)?|mlu(:\d+)?)$",
        description="override the engine's device in replicas (simulated cards in tests)")

    @model_validator(mode="before")
    @classmethod
    def _default_state_dir(cls, data: Any) -> Any:
        """Fill ``state_dir`` with ``~/.weight-refit/<name>`` when it is missing or null."""
        if isinstance(data, dict) and data.get("state_dir") is None:
            name = data.get("name")
            # An invalid or missing name reports itself; the placeholder only keeps `state_dir`
            # from adding a second, misleading error.
            label = name if isinstance(name, str) and _NAME_RE.fullmatch(name) and ".." not in name \
                else "invalid-name"
            data = {**data, "state_dir": os.path.join("~", ".weight-refit", label)}
        return data

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        return validate_label(value, what="fleet name")

    @field_validator("commit_policy", mode="before")
    @classmethod
    def _legacy_policy(cls, value: Any) -> Any:
        return "exclude" if value == "evict" else value

    @field_validator("address")
    @classmethod
    def _check_address(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("address must be a Ray address (e.g. 'auto', 'ray://host:10001') or null")
        return value

    @field_validator("engine", "state_dir")
    @classmethod
    def _resolve_path(cls, value: str) -> str:
        if "\x00" in value:
            raise ValueError("path contains a NUL character")
        if is_url(value):
            return value.rstrip("/")
        return _abs_path(value)

    @field_validator("failpoints")
    @classmethod
    def _check_failpoints(cls, value: dict[str, str]) -> dict[str, str]:
        for key, action in value.items():
            if not key:
                raise ValueError("failpoint names must be non-empty")
            if not action:
                raise ValueError(f"failpoint {key!r} has an empty action")
            check_action(key, action)
        return value

    @field_validator("ray_init")
    @classmethod
    def _check_ray_init(cls, value: dict[str, Any]) -> dict[str, Any]:
        reserved = sorted(_RESERVED_RAY_INIT_KEYS & value.keys())
        if reserved:
            raise ValueError(
                f"ray_init may not set {', '.join(reserved)}: use the fleet config's own "
                f"{' / '.join(reserved)} field"
            )
        return value

    @model_validator(mode="after")
    def _check_consistency(self) -> FleetConfig:
        if self.state_options and not is_url(self.state_dir):
            raise ValueError(f"state_options apply to an object-storage state_dir (s3://, gs://, file://); "
                             f"state_dir {self.state_dir!r} is a local path")
        if self.max_exclude >= self.replicas:
            raise ValueError(
                f"max_exclude ({self.max_exclude}) must be less than replicas ({self.replicas}): "
                "a commit needs at least one surviving member"
            )
        engine_device = self.engine_device or self.device
        if self.memory_mode == "shared" and not engine_device.startswith("cpu"):
            raise ValueError(
                f"memory_mode 'shared' serves from the object store's host copy: it needs device "
                f"'cpu', got {engine_device!r}; use 'swap' or 'copy' on {self.device} cards")
        cards = self.placement.cards_per_node
        if self.device != "cpu" and cards is not None and self.address is None:
            per_card = self.placement.replicas_per_card()
            capacity = cards * per_card
            if self.replicas > capacity:
                shared = (
                    ""
                    if per_card == 1
                    else f" at {per_card} replicas per card (gpu_fraction {self.placement.gpu_fraction})"
                )
                raise ValueError(
                    f"impossible placement: replicas={self.replicas} but placement.cards_per_node="
                    f"{cards} {self.device} card(s) on this single node hold at most {capacity} "
                    f"replica(s){shared}; lower replicas, set placement.gpu_fraction < 1 to share "
                    "cards, or set address to a multi-node Ray cluster"
                )
        return self

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> FleetConfig:
        """Load and validate a fleet config from a YAML file.

        Relative ``engine``/``state_dir`` values are resolved against the current working
        directory. Raises :class:`ConfigError` (naming the file, and every bad field) when the file
        is missing, is not YAML, is not a mapping, or fails validation.
        """
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{p}: cannot read fleet config: {exc}") from exc
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(
                f"{p}: a fleet config must be a YAML mapping of fields, got {type(data).__name__}"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"{p}: invalid fleet config: {describe_validation_error(exc)}") from exc

    def to_yaml(self, path: str | os.PathLike[str]) -> None:
        """Write this config as YAML (all fields, absolute paths); ``from_yaml`` reads it back equal.

        The parent directory is created if needed; the file is replaced atomically.
        """
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, default_flow_style=False)
        tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, p)
