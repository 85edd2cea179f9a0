"""The caller's half of a refit: read, validate, checksum and put a version once."""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, wait
from dataclasses import dataclass
from typing import Any

import ray
import torch

from actors.payload import (
    BUCKET_BYTES,
    INLINE_BYTES,
    Publication,
    Wire,
    buckets,
    from_wire,
    packed_checksums,
    packed_non_finite,
    seal,
    spec_dict,
    to_wire,
)
from engines.checkpoint_dir import CheckpointDir, is_checkpoint_dir
from engines.config import NonFinitePolicy
from engines.errors import MissingWeightsError
from engines.manifest import TensorSpec
from engines.threads import helpers
from engines.validation import (
    check_weights,
    non_finite_error,
    start_checksums_and_non_finite,
)
from engines.weights import WeightsLike, check_header, fill_tied, load_weights, name_fn

from .errors import ObjectStoreTooSmall

_ALWAYS_FITS = 32 << 20  # bytes: below 80% of the smallest object store Ray allows

# (a bucket's ref, the specs of its tensors, Publication.hashed_on)
OnPut = Callable[[Any, dict[str, Any], str | None], None]


def manifest_specs(manifest: Mapping[str, Any]) -> dict[str, TensorSpec]:
    return {n: TensorSpec(shape=tuple(s["shape"]), dtype=s["dtype"]) for n, s in manifest.items()}


def tie_groups(manifest: Mapping[str, Any]) -> list[list[str]]:
    """The groups of names the engine ties (one tensor), from the fleet manifest's ``tied`` entries."""
    seen: set[str] = set()
    groups = []
    for name, entry in manifest.items():
        if entry.get("tied") and name not in seen:
            groups.append([name, *entry["tied"]])
            seen.update(groups[-1])
    return groups


@dataclass(frozen=True)
class CheckedManifest:
    """The fleet manifest as a caller checks weights against it, parsed once: each weight's spec
    and the groups of names the engine ties."""

    specs: dict[str, TensorSpec]
    ties: list[list[str]]

    @classmethod
    def of(cls, manifest: Mapping[str, Any] | CheckedManifest) -> CheckedManifest:
        return manifest if isinstance(manifest, cls) else cls(manifest_specs(manifest), tie_groups(manifest))


def load_and_check(weights: WeightsLike, manifest: Mapping[str, Any] | CheckedManifest, *,
                   non_finite: NonFinitePolicy = NonFinitePolicy.REJECT, strip_prefix: str | None = None,
                   add_prefix: str | None = None, mapping: Mapping[str, str] | None = None,
                   complete: bool = False) -> dict[str, torch.Tensor]:
    """Read ``weights`` and check them against the fleet manifest (names, shapes, dtypes, values,
    completeness when asked); raises the engine's errors naming the tensor. A file's names, shapes
    and dtypes are checked from its header before any tensor is read (no decompression bombs). A
    name the engine ties to others stands for them all (``engines.weights.fill_tied``)."""
    checked = CheckedManifest.of(manifest)
    specs = checked.specs
    tensors = fill_tied(load_weights(weights, strip_prefix=strip_prefix, add_prefix=add_prefix,
                                     mapping=mapping, expect=specs), checked.ties)
    check_weights(tensors, specs, non_finite)
    if complete and (missing := sorted(set(specs) - set(tensors))):
        raise MissingWeightsError(missing)
    return tensors


class _Source:
    """What a refit publishes, as groups of tensors read one after the other: a whole set read at
    once, or a checkpoint directory one shard at a time (never all shards in memory). Everything
    the headers can tell (names, shapes, dtypes, completeness) is checked before any data is read;
    values as each group is read."""

    def __init__(self, weights: WeightsLike, manifest: CheckedManifest, *, names: Any,
                 complete: bool, inline_bytes: int, load: Any) -> None:
        self._specs = manifest.specs
        self._ties = manifest.ties
        self._checkpoint = CheckpointDir(weights, names) if is_checkpoint_dir(weights) else None
        self._tensors: dict[str, torch.Tensor] | None = None
        if self._checkpoint is None:
            self._tensors = load()
            self.specs = spec_dict(self._tensors)
        else:
            check_header(self._checkpoint.entries, self._specs)
            given = [n for n, _, _ in self._checkpoint.entries]
            self._aliases: dict[str, list[str]] = {}  # a tied name given -> its group's names not given
            for group in self._ties:
                present = [n for n in group if n in given]
                if present and (absent := [n for n in group if n not in given]):
                    self._aliases[present[0]] = absent
            every = given + [a for more in self._aliases.values() for a in more]
            if complete and (missing := sorted(set(self._specs) - set(every))):
                raise MissingWeightsError(missing)
            self.specs = {n: {"shape": list(self._specs[n].shape), "dtype": self._specs[n].dtype}
                          for n in every}
            if sum(self._specs[n].nbytes for n in every) <= inline_bytes:
                self._tensors = self._with_aliases(self._checkpoint.read_all(self._specs))
                self._checkpoint = None
        self.groups_read = self.most_held = 0
        self.nbytes = sum(self._specs[n].nbytes for n in self.specs)

    def _with_aliases(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for name, aliases in self._aliases.items():
            if name in tensors:
                for alias in aliases:
                    tensors[alias] = tensors[name]
        return tensors

    def groups(self) -> Iterator[dict[str, torch.Tensor]]:
        """The groups in order; the caller drops each before asking for the next (``most_held``
        counts the groups read and not yet freed, at most, when a group is read)."""
        if self._checkpoint is None:
            assert self._tensors is not None
            yield self._tensors
            return
        earlier: list[weakref.ref] = []
        for shard in self._checkpoint.shards(self._specs):
            tensors = self._with_aliases(shard)
            del shard
            check_weights(tensors, self._specs, NonFinitePolicy.ALLOW)
            self.groups_read += 1
            self.most_held = max(self.most_held, 1 + sum(ref() is not None for ref in earlier))
            earlier += [weakref.ref(t) for t in list(tensors.values())[:1]]
            yield tensors
            del tensors


class _BucketChecks:
    """The checksums and non-finite scan of one bucket, started on the helper threads: packed
    tensors are hashed and scanned where they lie in the bucket, each large one hashed and scanned
    at once."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], wire: Wire, specs: Mapping[str, Any],
                 scan_values: bool) -> None:
        self._wire = wire
        self._specs = specs
        self._scan = scan_values
        large = {n: tensors[n] for n in wire[2]}
        self._large = start_checksums_and_non_finite(large, scan_values=scan_values)

    def result(self) -> tuple[dict[str, str], set[str]]:
        sums = packed_checksums(self._wire)
        large, bad = self._large()
        sums.update(large)
        packed_bad = packed_non_finite(self._wire, self._specs) if self._scan else set()
        return sums, set(bad) | packed_bad


def publish(weights: WeightsLike, manifest: Mapping[str, Any] | CheckedManifest, *,
            non_finite: NonFinitePolicy = NonFinitePolicy.REJECT, strip_prefix: str | None = None,
            add_prefix: str | None = None, mapping: Mapping[str, str] | None = None,
            complete: bool = False, inline_bytes: int = INLINE_BYTES,
            bucket_bytes: int = BUCKET_BYTES, on_put: OnPut | None = None,
            hash_stored: bool = True) -> Publication:
    """Validate ``weights`` against the fleet manifest (I4: before any transfer), checksum them
    (xxh3 per tensor) and ``ray.put`` them once, in buckets of at most ``bucket_bytes``: the
    checksums and non-finite scan of bucket k run on helper threads while bucket k+1 is put, and a
    refused value frees what was put and sends nothing. With ``hash_stored`` (unless this process
    is a Ray client) each bucket is hashed and scanned where it lies in this node's object store,
    the copy this node's replicas read: ``Publication.hashed_on`` names the node, whose replicas
    need not hash it again (one read of every byte fewer). A version of at most ``inline_bytes`` is
    not put: it travels inside the calls, sealed (``actors.payload``). Raises the engine's errors naming
    the tensor, ``MissingWeightsError`` when ``complete`` and names are missing,
    ``ObjectStoreTooSmall`` with the numbers when the version cannot fit the object store.
    ``timings``: ``load_validate_s``, ``checksum_s`` and ``put_s`` (the waits for checks and for
    puts, each not hidden behind the other), ``buckets``; for a checkpoint directory read shard by
    shard also ``shards`` and ``shards_held_at_most`` (shards in memory at once, at most).
    ``on_put(ref, specs, hashed_on)`` is called with each bucket as soon as it is in the object
    store and passed its checks (not for an inline version), with the specs of its tensors; what
    it raises fails the publication."""
    t0 = time.perf_counter()
    manifest = CheckedManifest.of(manifest)
    source = _Source(weights, manifest, names=name_fn(strip_prefix, add_prefix, mapping), complete=complete,
                     inline_bytes=inline_bytes,
                     load=lambda: load_and_check(weights, manifest, non_finite=NonFinitePolicy.ALLOW,
                                                 strip_prefix=strip_prefix, add_prefix=add_prefix,
                                                 mapping=mapping, complete=complete))
    nbytes = source.nbytes
    # Ray's smallest object store is 75 MB, so a smaller version always fits: skip the GCS query
    capacity = ray.cluster_resources().get("object_store_memory", 0.0) if nbytes >= _ALWAYS_FITS else 0.0
    if capacity and nbytes > 0.8 * capacity:
        raise ObjectStoreTooSmall(
            f"version of {nbytes} bytes does not fit the object store: {int(capacity)} bytes in the "
            f"cluster, at most 80% usable for one version (raise object_store_memory)")
    hashed_on = _this_node() if hash_stored and nbytes > inline_bytes else None
    t1 = time.perf_counter()
    scan = non_finite is NonFinitePolicy.REJECT
    sums: dict[str, str] = {}
    refs: list[Any] = []
    timings = {"load_validate_s": t1 - t0, "checksum_s": 0.0, "put_s": 0.0, "buckets": 0.0}
    try:
        for tensors in source.groups():
            refs += _put_group(tensors, source.specs, sums, scan, inline=nbytes <= inline_bytes,
                               bucket_bytes=bucket_bytes, timings=timings, stored=hashed_on is not None,
                               on_put=on_put and _with_specs(on_put, source.specs, hashed_on))
            del tensors  # before the next group is read
    except BaseException:
        refs.clear()  # nothing was sent: what was put is freed
        raise
    timings["load_validate_s"] = time.perf_counter() - t0 - timings["checksum_s"] - timings["put_s"]
    timings["buckets"] = float(len(refs))
    if source.groups_read:
        timings["shards"], timings["shards_held_at_most"] = float(source.groups_read), float(source.most_held)
    return Publication(refs=refs, specs=source.specs, checksums={n: sums[n] for n in source.specs},
                       nbytes=nbytes, timings=timings, hashed_on=hashed_on)


def _this_node() -> str | None:
    """The node whose object store this process puts into; None for a Ray client (its puts go
    to the server's node, and a get would bring back a copy)."""
    from ray.util.client import ray as client

    return None if client.is_connected() else ray.get_runtime_context().get_node_id()


def _with_specs(on_put: OnPut, specs: dict[str, Any], hashed_on: str | None) -> Callable[[Any, Wire], None]:
    return lambda ref, wire: on_put(ref, {n: specs[n] for part in (wire[1], wire[2]) for n in part},
                                    hashed_on)


def _put_group(tensors: dict[str, torch.Tensor], specs: Mapping[str, Any], sums: dict[str, str],
               scan: bool, *, inline: bool, bucket_bytes: int, timings: dict[str, float], stored: bool,
               on_put: Callable[[Any, Wire], None] | None = None) -> list[Any]:
    """Put, checksum and scan one group of tensors in buckets (or inline); their refs, once every
    bucket passed its checks. With ``stored`` a bucket is hashed and scanned where it lies in this
    node's object store, else as given; ``on_put`` hears of a bucket only once it passed."""
    groups = [tensors] if inline else buckets(tensors, bucket_bytes)
    wires = [to_wire(g) for g in groups]  # small tensors packed (one copy of them), views of the rest
    refs: list[Any] = []
    pending: tuple[Any, Wire, _BucketChecks] | None = None  # the bucket put last, its checks running

    def accept(ref: Any, wire: Wire, checks: _BucketChecks) -> None:
        t = time.perf_counter()
        got, bad = checks.result()
        timings["checksum_s"] += time.perf_counter() - t
        if bad:
            first = next(n for n in tensors if n in bad)
            raise non_finite_error(first, tensors[first])
        sums.update(got)
        refs.append(ref)
        if on_put is not None and not inline:
            on_put(ref, wire)

    # the copy into the object store runs on a refit-helper thread: at lower priority than the
    # threads that serve requests on this machine (engines.threads)
    put: Future[Any] | None = None if inline else helpers().submit(ray.put, wires[0])
    try:
        for k, wire in enumerate(wires):
            t = time.perf_counter()
            ref = seal(wire) if put is None else put.result()
            timings["put_s"] += time.perf_counter() - t
            if pending is not None:  # bucket k-1's checks ran while bucket k was put
                done, pending = pending, None
                accept(*done)
            # bucket k+1's put goes first on the helper pool (it runs jobs in order), then bucket
            # k's checks beside it: one bucket ahead, no further
            put = helpers().submit(ray.put, wires[k + 1]) if not inline and k + 1 < len(wires) else None
            if not inline and stored:
                view = ray.get(ref)
                large = from_wire((None, {}, view[2]), specs)  # packed ones are checked where they lie
                pending = (ref, wire, _BucketChecks(large, view, specs, scan))
            else:
                pending = (ref, wire, _BucketChecks(groups[k], wire, specs, scan))
        if pending is not None:
            done, pending = pending, None
            accept(*done)
    except BaseException:
        # the helper threads finish with these bytes before they go; what was put is dropped
        wait([put] if put is not None else [])
        if pending is not None:
            pending[2].result()
        raise
    return refs
