"""Card discovery and per-replica Ray actor options. No actor is created here.

Three placements (DESIGN.md, "Placement"):

- ``cpu``: each replica reserves ``cpus_per_replica`` logical CPUs (tiny by default).
- ``cuda``: each replica reserves ``gpu_fraction`` of Ray's ``GPU`` resource; Ray sets
  ``CUDA_VISIBLE_DEVICES`` inside the actor.
- ``mlu``: where the installed Ray has an MLU accelerator manager (Cambricon ships a patched Ray),
  each replica reserves that manager's resource and Ray sets the visible-devices variable. Otherwise
  cards are a custom per-node resource (``placement.mlu_resource``, default ``MLU``): one placement
  group holds one bundle per replica, each replica gets a card index unique on its node
  (:func:`assign_card_indexes`) and runs with ``MLU_VISIBLE_DEVICES`` set to it.

Typical use on the driver::

    plan = plan_placement(cfg)
    ray.init(**local_ray_init_kwargs(cfg))          # only when starting a local Ray
    pg = create_placement_group(plan, cfg.timeouts.launch_s, name=f"{cfg.name}-replicas")
    cards = resolve_card_indexes(plan, pg, previous)  # {} unless the plan sets MLU_VISIBLE_DEVICES
    for rp in plan.replicas:
        Replica.options(**actor_options(rp, placement_group=pg, card_index=cards.get(rp.replica_id)),
                        name=..., namespace=..., lifetime="detached").remote(...)
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cluster.config import FleetConfig

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ray.util.placement_group import PlacementGroup

__all__ = [
    "MLU_VISIBLE_DEVICES",
    "PlacementError",
    "PlacementPlan",
    "ReplicaPlacement",
    "CONNECT_RETRY",
    "SPILL_THRESHOLD",
    "actor_options",
    "assign_card_indexes",
    "bundle_nodes",
    "cards_by_node",
    "check_capacity",
    "create_placement_group",
    "discover_mlu_cards",
    "local_ray_init_kwargs",
    "local_ray_system_config",
    "mlu_accelerator_manager",
    "mlu_env",
    "plan_placement",
    "ray_has_mlu_manager",
    "replica_ids",
    "resolve_card_indexes",
]

MLU_VISIBLE_DEVICES = "MLU_VISIBLE_DEVICES"
_CAMBRICON_DEV_RE = re.compile(r"^cambricon_dev\d+$")
_EPS = 1e-9


class PlacementError(ValueError):
    """The requested replicas cannot be placed on the cluster (message starts "impossible placement")."""


@dataclass(frozen=True)
class ReplicaPlacement:
    """Where one replica goes.

    Contract:
      - ``replica_id``: ``r0``, ``r1``, ... in replica order.
      - ``actor_options``: keyword arguments for ``ActorClass.options`` *before* placement-group
        resolution: ``num_cpus``, and ``num_gpus`` or ``resources``; ``scheduling_strategy`` is a
        string (``"SPREAD"``/``"DEFAULT"``) or ``None`` when the replica goes into bundle
        ``bundle_index`` of the plan's placement group (filled in by :func:`actor_options`).
      - ``env``: environment variables known at plan time (none today: a replica sets its own
        thread count, since any ``runtime_env`` keeps Ray from giving a replica one of the worker
        processes it started ahead); the card variable (``MLU_VISIBLE_DEVICES``) is added by
        :func:`actor_options` once the card index is known.
      - ``bundle_index``: the replica's bundle in the placement group, or ``None`` without one.
    """

    replica_id: str
    actor_options: dict[str, Any]
    env: dict[str, str] = field(default_factory=dict)
    bundle_index: int | None = None


@dataclass(frozen=True)
class PlacementPlan:
    """The placement of a whole fleet, computed from its config alone (no Ray calls).

    Contract:
      - ``resource_name`` is the resource that counts cards (``CPU`` for cpu, ``GPU`` for cuda,
        the MLU manager's or the custom MLU resource for mlu) and ``per_replica`` how much of it
        each replica reserves; ``cpus_per_replica`` is reserved besides (for cpu the two coincide).
      - ``bundles`` is non-empty exactly when a placement group is needed (mlu without a manager),
        one bundle per replica in replica order, created with ``strategy``.
      - ``card_env_var`` is the variable this code must set per replica (``MLU_VISIBLE_DEVICES``),
        or ``None`` when Ray sets the visible devices itself.
      - ``replicas_per_card`` is how many replicas share one card (``floor(1/gpu_fraction)``).
    """

    device: str
    replicas: tuple[ReplicaPlacement, ...]
    resource_name: str
    per_replica: float
    cpus_per_replica: float
    strategy: str
    bundles: tuple[dict[str, float], ...] = ()
    card_env_var: str | None = None
    replicas_per_card: int = 1

    @property
    def uses_placement_group(self) -> bool:
        """True when the replicas go into a placement group (one bundle each)."""
        return bool(self.bundles)

    def demand(self) -> dict[str, float]:
        """Total resources the fleet's replicas reserve, by Ray resource name."""
        total: dict[str, float] = {}
        n = len(self.replicas)
        if self.cpus_per_replica > 0:
            total["CPU"] = n * self.cpus_per_replica
        if self.resource_name != "CPU" and self.per_replica > 0:
            total[self.resource_name] = total.get(self.resource_name, 0.0) + n * self.per_replica
        return total


def replica_ids(n: int) -> list[str]:
    """The ids of an ``n``-replica fleet: ``["r0", "r1", ...]``."""
    return [f"r{i}" for i in range(n)]


def _natural_key(text: str) -> tuple[Any, ...]:
    """Sort key ordering ``r2`` before ``r10``."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text))


# --------------------------------------------------------------------------------------------------
# Discovery


def discover_mlu_cards(dev_dir: str | os.PathLike[str] = "/dev") -> int:
    """Count Cambricon MLU cards on this node: the ``cambricon_dev<N>`` entries in ``dev_dir``.

    Returns 0 when the directory does not exist or holds none (control devices such as
    ``cambricon_ctl`` are not cards).
    """
    try:
        names = os.listdir(dev_dir)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return 0
    return sum(1 for name in names if _CAMBRICON_DEV_RE.match(name))


def mlu_accelerator_manager() -> type | None:
    """The installed Ray's accelerator manager for Cambricon MLUs, or ``None``.

    Ray registers accelerator managers in ``ray._private.accelerators.get_all_accelerator_managers()``;
    upstream Ray 2.60 has none for MLU. A manager counts as MLU when its resource name is ``MLU``
    (any case, or starts with it) or its visible-devices variable is ``MLU_VISIBLE_DEVICES``.
    """
    try:
        from ray._private.accelerators import get_all_accelerator_managers
    except Exception:  # a Ray without the registry has no MLU manager
        return None
    try:
        managers = list(get_all_accelerator_managers())
    except Exception:
        return None
    for manager in sorted(managers, key=lambda m: getattr(m, "__name__", "")):
        try:
            resource = str(manager.get_resource_name() or "")
            env_var = manager.get_visible_accelerator_ids_env_var()
        except Exception:  # a broken third-party manager is not ours
            continue
        if resource.upper().startswith("MLU") or env_var == MLU_VISIBLE_DEVICES:
            return manager
    return None


def ray_has_mlu_manager() -> bool:
    """True where the installed Ray has an accelerator manager for MLU (a Cambricon-patched Ray)."""
    return mlu_accelerator_manager() is not None


# --------------------------------------------------------------------------------------------------
# Planning (pure)


def plan_placement(cfg: FleetConfig, *, mlu_manager: bool | None = None) -> PlacementPlan:
    """Compute every replica's actor options from ``cfg`` without touching Ray.

    ``mlu_manager`` overrides :func:`ray_has_mlu_manager` (tests plan both MLU paths). With a
    manager, the manager's resource name is used (``cfg.placement.mlu_resource`` if the override is
    given without a real manager installed).
    """
    pc = cfg.placement
    cpus = float(pc.cpus_per_replica)
    frac = float(pc.gpu_fraction)
    ids = replica_ids(cfg.replicas)
    env: dict[str, str] = {}  # torch_threads is the replica's own (actors.replica): no runtime_env on cpu
    spread = "SPREAD" if pc.strategy == "SPREAD" else "DEFAULT"

    if cfg.device == "cpu":
        replicas = tuple(
            ReplicaPlacement(rid, {"num_cpus": cpus, "scheduling_strategy": spread}, dict(env)) for rid in ids
        )
        return PlacementPlan("cpu", replicas, "CPU", cpus, cpus, pc.strategy)

    if cfg.device == "cuda":
        replicas = tuple(
            ReplicaPlacement(
                rid, {"num_gpus": frac, "num_cpus": cpus, "scheduling_strategy": spread}, dict(env)
            )
            for rid in ids
        )
        return PlacementPlan(
            "cuda", replicas, "GPU", frac, cpus, pc.strategy, replicas_per_card=pc.replicas_per_card()
        )

    # mlu
    has_manager = ray_has_mlu_manager() if mlu_manager is None else mlu_manager
    if has_manager:
        manager = mlu_accelerator_manager()
        resource = str(manager.get_resource_name()) if manager is not None else pc.mlu_resource
        replicas = tuple(
            ReplicaPlacement(
                rid,
                {"resources": {resource: frac}, "num_cpus": cpus, "scheduling_strategy": spread},
                dict(env),
            )
            for rid in ids
        )
        return PlacementPlan(
            "mlu", replicas, resource, frac, cpus, pc.strategy, replicas_per_card=pc.replicas_per_card()
        )

    resource = pc.mlu_resource
    bundle: dict[str, float] = {resource: frac}
    if cpus > 0:
        bundle["CPU"] = cpus
    replicas = tuple(
        ReplicaPlacement(
            rid,
            {"resources": {resource: frac}, "num_cpus": cpus, "scheduling_strategy": None},
            dict(env),
            bundle_index=i,
        )
        for i, rid in enumerate(ids)
    )
    return PlacementPlan(
        "mlu",
        replicas,
        resource,
        frac,
        cpus,
        pc.strategy,
        bundles=tuple(dict(bundle) for _ in ids),
        card_env_var=MLU_VISIBLE_DEVICES,
        replicas_per_card=pc.replicas_per_card(),
    )


def mlu_env(card_index: int) -> dict[str, str]:
    """The environment that pins a process to MLU card ``card_index`` of its node."""
    if card_index < 0:
        raise ValueError(f"card_index must be >= 0, got {card_index}")
    return {MLU_VISIBLE_DEVICES: str(card_index)}


def assign_card_indexes(
    node_of_replica: Mapping[str, str],
    cards_on_node: Mapping[str, int],
    previous: Mapping[str, int] | None = None,
    *,
    replicas_per_card: int = 1,
) -> dict[str, int]:
    """Give each replica a card index on its node; pure and deterministic.

    Contract:
      - every replica in ``node_of_replica`` gets an index in ``range(cards_on_node[node])``;
      - on one node each index is used by at most ``replicas_per_card`` replicas (1: unique);
      - stable: a replica in ``previous`` keeps its index while that index is in range and not
        already taken on its node by another replica keeping its own (ties go in natural replica
        order: ``r2`` before ``r10``); the others take the lowest free indexes in replica order;
      - raises :class:`PlacementError` naming the node when it holds more replicas than
        ``cards * replicas_per_card`` (a node missing from ``cards_on_node`` has 0 cards).
    """
    if replicas_per_card < 1:
        raise ValueError(f"replicas_per_card must be >= 1, got {replicas_per_card}")
    previous = previous or {}
    by_node: dict[str, list[str]] = {}
    for rid in sorted(node_of_replica, key=_natural_key):
        by_node.setdefault(node_of_replica[rid], []).append(rid)

    result: dict[str, int] = {}
    for node in sorted(by_node):
        rids = by_node[node]
        cards = int(cards_on_node.get(node, 0))
        slots = cards * replicas_per_card
        if len(rids) > slots:
            raise PlacementError(
                f"impossible placement: node {node} has {len(rids)} replicas "
                f"({', '.join(rids)}) but {cards} card(s)"
                + (f" x {replicas_per_card} replicas per card" if replicas_per_card > 1 else "")
            )
        used = [0] * cards
        pending: list[str] = []
        for rid in rids:
            idx = previous.get(rid)
            if idx is not None and 0 <= idx < cards and used[idx] < replicas_per_card:
                used[idx] += 1
                result[rid] = idx
            else:
                pending.append(rid)
        for rid in pending:
            idx = next(i for i in range(cards) if used[i] < replicas_per_card)
            used[idx] += 1
            result[rid] = idx
    return result


# Ray starts spilling objects to disk once its object store is 80% full. A refit puts one version
# while the previous one may still be held by its background checkpoint write (durability
# replicated): a store sized for two versions then spilled one of them to disk on most refits
# (docs/benchmarks.md). A store that is really full still spills.
SPILL_THRESHOLD = 0.95

# The raylet's connection to the object store it has just started retries once a second, ten
# times, by default: a start that loses that race waited a whole second, which made Ray's start
# bimodal here (docs/benchmarks.md, "Ray's start"). Ten times as often, within the same 10 s.
CONNECT_RETRY = {"raylet_client_connect_timeout_milliseconds": 100, "raylet_client_num_connect_attempts": 100}


def local_ray_system_config(given: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Ray's system settings for a Ray the fleet starts: ``given`` wins for every key it sets;
    ``object_spilling_threshold`` (``SPILL_THRESHOLD``) and ``CONNECT_RETRY`` where absent."""
    return {"object_spilling_threshold": SPILL_THRESHOLD, **CONNECT_RETRY, **dict(given or {})}


def local_ray_init_kwargs(
    cfg: FleetConfig,
    *,
    mlu_manager: bool | None = None,
    dev_dir: str | os.PathLike[str] = "/dev",
) -> dict[str, Any]:
    """Keyword arguments for ``ray.init`` when the fleet starts its own single-node Ray.

    ``cfg.ray_init`` wins for every key it sets, and in ``_system_config`` for every key it sets
    there. Added where absent: ``local_ray_system_config``'s settings in ``_system_config``;
    ``num_gpus`` from
    ``cards_per_node`` on cuda; on mlu, the card resource (``{mlu_resource: cards}``, with cards
    from ``cards_per_node`` or :func:`discover_mlu_cards`) in ``resources`` when Ray has no MLU
    manager (a manager discovers cards itself; ``cards_per_node`` then overrides it). Never
    contains ``address`` or ``namespace``.
    """
    kwargs: dict[str, Any] = dict(cfg.ray_init)
    kwargs["_system_config"] = local_ray_system_config(kwargs.get("_system_config"))
    pc = cfg.placement
    if cfg.device == "cuda" and pc.cards_per_node is not None:
        kwargs.setdefault("num_gpus", pc.cards_per_node)
    elif cfg.device == "mlu":
        has_manager = ray_has_mlu_manager() if mlu_manager is None else mlu_manager
        resources = dict(kwargs.get("resources") or {})
        if has_manager:
            manager = mlu_accelerator_manager()
            name = str(manager.get_resource_name()) if manager is not None else pc.mlu_resource
            if pc.cards_per_node is not None:
                resources.setdefault(name, pc.cards_per_node)
        else:
            cards = pc.cards_per_node if pc.cards_per_node is not None else discover_mlu_cards(dev_dir)
            if cards > 0:
                resources.setdefault(pc.mlu_resource, cards)
        if resources:
            kwargs["resources"] = resources
    return kwargs


def _node_capacity(plan: PlacementPlan, resources: Mapping[str, float]) -> int:
    """How many of ``plan``'s replicas fit on a node with ``resources`` (totals)."""
    fits = math.inf
    demand: dict[str, float] = {}
    if plan.cpus_per_replica > 0:
        demand["CPU"] = plan.cpus_per_replica
    if plan.resource_name != "CPU" and plan.per_replica > 0:
        demand[plan.resource_name] = demand.get(plan.resource_name, 0.0) + plan.per_replica
    for name, amount in demand.items():
        fits = min(fits, math.floor(float(resources.get(name, 0.0)) / amount + _EPS))
    return len(plan.replicas) if fits == math.inf else int(fits)


def check_capacity(plan: PlacementPlan, node_resources: Iterable[Mapping[str, float]] | None = None) -> None:
    """Raise :class:`PlacementError` unless the cluster can hold every replica of ``plan``.

    ``node_resources`` is one total-resources mapping per alive node; ``None`` reads it from the
    connected Ray (``ray.nodes()``, with ``ray.cluster_resources()`` as a fallback). The check is
    on totals (what the cluster has), not on what is free right now. The message names the
    number of replicas asked for and the cards available across nodes, e.g. "impossible
    placement: 8 replicas asked for, 4 MLU cards available across nodes".
    """
    if node_resources is None:
        node_resources = _live_node_resources()
    nodes = [dict(r) for r in node_resources]
    n = len(plan.replicas)
    capacity = sum(_node_capacity(plan, r) for r in nodes)
    if capacity >= n:
        return
    if plan.resource_name == "CPU":
        have = sum(float(r.get("CPU", 0.0)) for r in nodes)
        raise PlacementError(
            f"impossible placement: {n} replicas asked for at {plan.cpus_per_replica:g} CPU each, "
            f"{have:g} CPUs available across nodes"
        )
    cards = sum(float(r.get(plan.resource_name, 0.0)) for r in nodes)
    kind = {"cuda": "GPU"}.get(plan.device, plan.resource_name)
    share = f" (each takes {plan.per_replica:g} of a card)" if plan.per_replica < 1 - _EPS else ""
    cpu_note = ""
    if plan.cpus_per_replica > 0:
        cpu_fit = sum(math.floor(float(r.get("CPU", 0.0)) / plan.cpus_per_replica + _EPS) for r in nodes)
        if cpu_fit < n:
            have_cpu = sum(float(r.get("CPU", 0.0)) for r in nodes)
            cpu_note = f"; and {have_cpu:g} CPUs for {plan.cpus_per_replica:g} each"
    raise PlacementError(
        f"impossible placement: {n} replicas asked for{share}, {cards:g} {kind} cards available "
        f"across nodes{cpu_note}"
    )


def _live_node_resources() -> list[dict[str, float]]:
    import ray

    try:
        nodes = [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]
    except Exception:  # fall back to cluster totals as one pseudo-node
        nodes = []
    if not nodes:
        nodes = [dict(ray.cluster_resources())]
    return nodes


# --------------------------------------------------------------------------------------------------
# Ray-facing helpers (need a connected Ray)


def create_placement_group(
    plan: PlacementPlan,
    timeout_s: float,
    *,
    name: str = "",
    lifetime: str | None = "detached",
) -> PlacementGroup | None:
    """Create the plan's placement group and wait until it is ready; ``None`` when none is needed.

    Checks :func:`check_capacity` first, so an infeasible fleet fails at once. When the group is
    not ready within ``timeout_s`` it is removed and :class:`PlacementError` ("impossible
    placement: N replicas asked for, M MLU cards available across nodes ...") is raised.
    ``lifetime="detached"`` (default) lets the group outlive the driver, as the detached replica
    actors in it must; remove it with ``ray.util.remove_placement_group`` at fleet shutdown.
    """
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    check_capacity(plan)
    if not plan.uses_placement_group:
        return None
    pg = placement_group(
        [dict(b) for b in plan.bundles], strategy=plan.strategy, name=name, lifetime=lifetime
    )
    ready = False
    try:
        ready = pg.wait(timeout_seconds=timeout_s)
    finally:
        if not ready:
            with contextlib.suppress(Exception):  # best-effort cleanup
                remove_placement_group(pg)
    if not ready:
        cards = ray.cluster_resources().get(plan.resource_name, 0.0)
        free = ray.available_resources().get(plan.resource_name, 0.0)
        raise PlacementError(
            f"impossible placement: {len(plan.replicas)} replicas asked for, {cards:g} "
            f"{plan.resource_name} cards available across nodes ({free:g} free); placement group "
            f"not ready after {timeout_s:g}s"
        )
    return pg


def bundle_nodes(pg: PlacementGroup) -> dict[int, str]:
    """Node id (hex) of each bundle of a ready placement group, by bundle index."""
    from ray.util.placement_group import placement_group_table

    table = placement_group_table(pg)
    return {int(k): str(v) for k, v in table.get("bundles_to_node_id", {}).items()}


def cards_by_node(resource_name: str = "MLU") -> dict[str, int]:
    """Whole cards of ``resource_name`` on each alive node of the connected Ray, by node id (hex)."""
    import ray

    out: dict[str, int] = {}
    for node in ray.nodes():
        if node.get("Alive"):
            out[str(node["NodeID"])] = int(
                math.floor(float(node.get("Resources", {}).get(resource_name, 0.0)) + _EPS)
            )
    return out


def resolve_card_indexes(
    plan: PlacementPlan, pg: PlacementGroup | None, previous: Mapping[str, int] | None = None
) -> dict[str, int]:
    """Card index of each replica for plans that set ``card_env_var``; ``{}`` otherwise.

    Reads each bundle's node from the ready placement group and the node's card count from the
    cluster, then calls :func:`assign_card_indexes` (``previous`` keeps indexes stable).
    """
    if plan.card_env_var is None or pg is None:
        return {}
    nodes = bundle_nodes(pg)
    node_of_replica = {
        rp.replica_id: nodes[rp.bundle_index] for rp in plan.replicas if rp.bundle_index is not None
    }
    return assign_card_indexes(
        node_of_replica,
        cards_by_node(plan.resource_name),
        previous,
        replicas_per_card=plan.replicas_per_card,
    )


def actor_options(
    replica: ReplicaPlacement,
    *,
    placement_group: PlacementGroup | None = None,
    card_index: int | None = None,
    extra_env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Final ``ActorClass.options(...)`` kwargs for one replica.

    Fills the placement-group scheduling strategy for a replica with a ``bundle_index`` (a
    ``placement_group`` is then required), and puts ``replica.env``, ``MLU_VISIBLE_DEVICES`` for
    ``card_index`` and ``extra_env`` into ``runtime_env["env_vars"]``. The caller adds name,
    namespace, lifetime, concurrency.
    """
    opts = {k: (dict(v) if isinstance(v, dict) else v) for k, v in replica.actor_options.items()}
    if replica.bundle_index is not None:
        if placement_group is None:
            raise ValueError(
                f"replica {replica.replica_id} goes into bundle {replica.bundle_index}: "
                "pass the placement group from create_placement_group"
            )
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group=placement_group,
            placement_group_bundle_index=replica.bundle_index,
            placement_group_capture_child_tasks=False,
        )
    elif opts.get("scheduling_strategy") is None:
        opts.pop("scheduling_strategy", None)
    env = dict(replica.env)
    if card_index is not None:
        env.update(mlu_env(card_index))
    if extra_env:
        env.update(extra_env)
    if env:
        opts["runtime_env"] = {"env_vars": env}
    return opts
