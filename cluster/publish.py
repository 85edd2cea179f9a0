"""The caller's half of a refit: read, validate, checksum and put a version once."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import ray
import torch

from actors.payload import INLINE_BYTES, Publication, Wire, packed_checksums, spec_dict, to_wire
from engines.config import NonFinitePolicy
from engines.errors import MissingWeightsError
from engines.manifest import TensorSpec
from engines.validation import check_weights, checksums_and_non_finite, non_finite_error, non_finite_names
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


def _checksums_and_non_finite(tensors: Mapping[str, torch.Tensor], wire: Wire, *,
                              scan_values: bool) -> tuple[dict[str, str], list[str]]:
    """Checksums of every tensor and the non-finite ones (in ``tensors``' order): the packed ones
    hashed where they lie in the bucket, each large one read once for both."""
    sums = packed_checksums(wire)
    large, bad = checksums_and_non_finite({n: tensors[n] for n in wire[2]}, scan_values=scan_values)
    sums.update(large)
    if scan_values:
        bad += non_finite_names({n: tensors[n] for n in wire[1]})
    return {n: sums[n] for n in tensors}, [n for n in tensors if n in set(bad)]


def publish(weights: WeightsLike, manifest: Mapping[str, Any], *,
            non_finite: NonFinitePolicy = NonFinitePolicy.REJECT, strip_prefix: str | None = None,
            add_prefix: str | None = None, mapping: Mapping[str, str] | None = None,
            complete: bool = False, inline_bytes: int = INLINE_BYTES) -> Publication:
    """Validate ``weights`` against the fleet manifest (I4: before any transfer), checksum them
    (xxh3 per tensor, in one pass with the non-finite scan) and ``ray.put`` them once (a version of
    at most ``inline_bytes`` is not put: it travels inside the calls, ``actors.payload``). Raises the
    engine's errors naming the tensor, ``MissingWeightsError`` when ``complete`` and names are
    missing, ``ObjectStoreTooSmall`` with the numbers when the version cannot fit the object store.
    ``timings["checksum_s"]`` is that one pass."""
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
    wire = to_wire(tensors)  # small tensors packed (one copy of them), views of the large ones
    sums, bad = _checksums_and_non_finite(tensors, wire, scan_values=non_finite is NonFinitePolicy.REJECT)
    if bad:
        raise non_finite_error(bad[0], tensors[bad[0]])
    t2 = time.perf_counter()
    refs = [wire] if nbytes <= inline_bytes else [ray.put(wire)]
    t3 = time.perf_counter()
    return Publication(refs=refs, specs=spec_dict(tensors), checksums=sums, nbytes=nbytes,
                       timings={"load_validate_s": t1 - t0, "checksum_s": t2 - t1, "put_s": t3 - t2})
