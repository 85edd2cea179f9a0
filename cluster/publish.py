"""The caller's half of a refit: read, validate, checksum and put a version once."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import ray
import torch

from actors.payload import (
    BUCKET_BYTES,
    INLINE_BYTES,
    Publication,
    Wire,
    buckets,
    packed_checksums,
    spec_dict,
    to_wire,
)
from engines.config import NonFinitePolicy
from engines.errors import MissingWeightsError
from engines.manifest import TensorSpec
from engines.threads import helpers
from engines.validation import (
    check_weights,
    non_finite_error,
    non_finite_names,
    start_checksums_and_non_finite,
)
from engines.weights import WeightsLike, load_weights

from .errors import ObjectStoreTooSmall

_ALWAYS_FITS = 32 << 20  # bytes: below 80% of the smallest object store Ray allows


def load_and_check(weights: WeightsLike, manifest: Mapping[str, Any], *,
                   non_finite: NonFinitePolicy = NonFinitePolicy.REJECT, strip_prefix: str | None = None,
                   add_prefix: str | None = None, mapping: Mapping[str, str] | None = None,
                   complete: bool = False) -> dict[str, torch.Tensor]:
    """Read ``weights`` and check them against the fleet manifest (names, shapes, dtypes, values,
    completeness when asked); raises the engine's errors naming the tensor. A file's names, shapes
    and dtypes are checked from its header before any tensor is read (no decompression bombs)."""
    specs = {n: TensorSpec(shape=tuple(s["shape"]), dtype=s["dtype"]) for n, s in manifest.items()}
    tensors = load_weights(weights, strip_prefix=strip_prefix, add_prefix=add_prefix, mapping=mapping,
                           expect=specs)
    check_weights(tensors, specs, non_finite)
    if complete and (missing := sorted(set(specs) - set(tensors))):
        raise MissingWeightsError(missing)
    return tensors


class _BucketChecks:
    """The checksums and non-finite scan of one bucket, started on the helper threads: packed
    tensors are hashed where they lie in the bucket, each large one hashed and scanned at once."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], wire: Wire, scan_values: bool) -> None:
        self._tensors = tensors
        self._wire = wire
        self._scan = scan_values
        large = {n: tensors[n] for n in wire[2]}
        self._large = start_checksums_and_non_finite(large, scan_values=scan_values)

    def result(self) -> tuple[dict[str, str], set[str]]:
        sums = packed_checksums(self._wire)
        large, bad = self._large()
        sums.update(large)
        if self._scan:
            bad += non_finite_names({n: self._tensors[n] for n in self._wire[1]})
        return sums, set(bad)


def publish(weights: WeightsLike, manifest: Mapping[str, Any], *,
            non_finite: NonFinitePolicy = NonFinitePolicy.REJECT, strip_prefix: str | None = None,
            add_prefix: str | None = None, mapping: Mapping[str, str] | None = None,
            complete: bool = False, inline_bytes: int = INLINE_BYTES,
            bucket_bytes: int = BUCKET_BYTES) -> Publication:
    """Validate ``weights`` against the fleet manifest (I4: before any transfer), checksum them
    (xxh3 per tensor) and ``ray.put`` them once, in buckets of at most ``bucket_bytes``: the
    checksums and non-finite scan of bucket k+1 run on helper threads while bucket k is put, and a
    refused value frees what was put and sends nothing. A version of at most ``inline_bytes`` is
    not put: it travels inside the calls (``actors.payload``). Raises the engine's errors naming
    the tensor, ``MissingWeightsError`` when ``complete`` and names are missing,
    ``ObjectStoreTooSmall`` with the numbers when the version cannot fit the object store.
    ``timings``: ``load_validate_s``, ``checksum_s`` (the checks not hidden behind a put),
    ``put_s``, ``buckets``."""
    t0 = time.perf_counter()
    tensors = load_and_check(weights, manifest, non_finite=NonFinitePolicy.ALLOW, strip_prefix=strip_prefix,
                             add_prefix=add_prefix, mapping=mapping, complete=complete)
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    # Ray's smallest object store is 75 MB, so a smaller version always fits: skip the GCS query
    capacity = ray.cluster_resources().get("object_store_memory", 0.0) if nbytes >= _ALWAYS_FITS else 0.0
    if capacity and nbytes > 0.8 * capacity:
        raise ObjectStoreTooSmall(
            f"version of {nbytes} bytes does not fit the object store: {int(capacity)} bytes in the "
            f"cluster, at most 80% usable for one version (raise object_store_memory)")
    t1 = time.perf_counter()
    scan = non_finite is NonFinitePolicy.REJECT
    groups = [tensors] if nbytes <= inline_bytes else buckets(tensors, bucket_bytes)
    wires = [to_wire(g) for g in groups]  # small tensors packed (one copy of them), views of the rest
    checks = [_BucketChecks(g, w, scan) for g, w in zip(groups, wires, strict=True)]
    sums: dict[str, str] = {}
    refs: list[Any] = []
    waited = put = 0.0
    try:
        for k, (wire, check) in enumerate(zip(wires, checks, strict=True)):
            t = time.perf_counter()
            got, bad = check.result()  # bucket k+1's checks run meanwhile on the helper threads
            waited += time.perf_counter() - t
            if bad:
                first = next(n for n in tensors if n in bad)
                raise non_finite_error(first, tensors[first])
            sums.update(got)
            t = time.perf_counter()
            # the copy into the object store runs on a refit-helper thread: at lower priority than
            # the threads that serve requests on this machine (engines.threads)
            refs.append(wire if nbytes <= inline_bytes else helpers().submit(ray.put, wire).result())
            put += time.perf_counter() - t
            checks[k] = None  # type: ignore[call-overload]  (its tensors are not needed any more)
    except BaseException:
        for c in checks:
            if c is not None:
                c.result()  # let the helper threads finish with these tensors before they go
        refs.clear()  # nothing was sent: what was put is freed
        raise
    return Publication(refs=refs, specs=spec_dict(tensors), checksums={n: sums[n] for n in tensors},
                       nbytes=nbytes, timings={"load_validate_s": t1 - t0, "checksum_s": waited,
                                               "put_s": put, "buckets": float(len(refs))})
