"""A replica's buckets of a version fetched, copied and hashed ahead of their PREPARE.

The caller announces each bucket as soon as it is in the object store (the coordinator forwards
it to the members), so that the replicas copy bucket k while bucket k+1 is still being put.

Contract:
- Only an optimisation: a PREPARE uses a prefetched bucket only if its refs name that very
  object (an object is immutable: the same ref is the same bytes), and stages every other bucket
  as it would have. A prefetched copy is checked against the PREPARE's checksums like any other;
  one copied without a hash (this replica was not its node's verifier) is hashed then if needed.
- Holds one publication (tag) at a time: a bucket of a new tag, a PREPARE (``claim``), ``forget``
  and ``expire`` (entries older than ``max_age_s``) free the others; copies go back to the
  engine's pool, and a bucket still being copied is freed when its copy ends.
- A bucket announced after its PREPARE claimed the refs, or after its publication was withdrawn
  (``forget(tag)``: the calls can arrive in either order), is ignored. Nothing here raises to its
  caller: a bucket that cannot be prefetched is simply not there, and the PREPARE fetches it.
- Buckets are prefetched one at a time, in the order announced, on one thread of its own.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("weight_refit.prefetch")

__all__ = ["Prefetched", "Prefetcher"]

# (bucket's tensors, hash them?) -> name -> (tensor, checksum or None), and whether the tensors
# are copies to adopt (else views of the fetched bucket, held as they are); None: not prefetched
Prestage = Callable[[dict[str, Any], bool], "tuple[dict[str, tuple[Any, str | None]], bool] | None"]
_RECENT = 256  # claimed refs remembered, so that a late announcement of one is ignored


@dataclass
class Prefetched:
    """One bucket ready for its PREPARE."""

    tensors: dict[str, Any]
    checksums: dict[str, str]  # the names hashed as they were copied
    copied: bool  # the tensors are engine buffers to adopt, not views of the fetched bucket
    nbytes: int


@dataclass
class _Job:
    tag: str
    key: str
    ref: Any
    specs: dict[str, Any]
    verify: bool
    done: threading.Event = field(default_factory=threading.Event)
    result: Prefetched | None = None
    dropped: bool = False  # freed (or to be freed when its copy ends): never handed out
    at: float = field(default_factory=time.monotonic)


class Prefetcher:
    """See the module docstring. ``fetch(ref)`` returns a bucket's tensors; ``prestage`` copies
    (or views) them; ``release`` gives copies back to the engine."""

    def __init__(self, fetch: Callable[[Any, dict[str, Any]], dict[str, Any]], prestage: Prestage,
                 release: Callable[[dict[str, Any]], None], *,
                 key_of: Callable[[Any], str] = lambda r: r.hex(), max_age_s: float = 60.0) -> None:
        self._fetch = fetch
        self._prestage = prestage
        self._release = release
        self._key_of = key_of
        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        self._jobs: dict[str, _Job] = {}
        self._claimed: deque[str] = deque(maxlen=_RECENT)
        self._withdrawn: deque[str] = deque(maxlen=_RECENT)
        self._queue: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        self.prefetched = self.skipped = 0

    # ------------------------------------------------------------------ the caller's side

    def offer(self, tag: str, ref: Any, specs: Mapping[str, Any], verify: bool) -> bool:
        """Prefetch the bucket ``ref`` of publication ``tag`` (in the background); False when it
        is ignored (claimed already, or announced twice)."""
        key = self._key_of(ref)
        with self._lock:
            if key in self._claimed or key in self._jobs or tag in self._withdrawn:
                self.skipped += 1
                return False
            self._drop_locked(lambda j: j.tag != tag or self._old(j))
            job = self._jobs[key] = _Job(tag, key, ref, dict(specs), verify)
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._run, name="prefetch", daemon=True)
                self._worker.start()
        self._queue.put(job)
        return True

    def claim(self, refs: list[Any], timeout: float) -> dict[int, Prefetched]:
        """The prefetched buckets among ``refs`` (index in ``refs`` -> bucket), each waited for
        up to ``timeout`` seconds in all if its copy is under way; every other bucket is freed.
        The caller owns what it gets (``release`` or adopt the copies)."""
        keys = {self._key_of(r): i for i, r in enumerate(refs) if _is_ref(r)}
        with self._lock:
            self._claimed.extend(keys)
            mine = [j for k, j in self._jobs.items() if k in keys]
            self._drop_locked(lambda j: j.key not in keys)
        deadline = time.monotonic() + timeout
        out: dict[int, Prefetched] = {}
        for job in mine:
            job.done.wait(max(0.0, deadline - time.monotonic()))
            with self._lock:
                self._jobs.pop(job.key, None)
                if job.done.is_set() and job.result is not None:
                    out[keys[job.key]] = job.result
                    job.result = None
                else:
                    job.dropped = True  # still copying: freed when the copy ends
        return out

    def forget(self, tag: str | None = None) -> None:
        """Free what is held for ``tag`` (for every tag when None); later buckets of ``tag`` are
        ignored."""
        with self._lock:
            if tag is not None:
                self._withdrawn.append(tag)
            self._drop_locked(lambda j: tag is None or j.tag == tag)

    def expire(self) -> None:
        """Free what is older than ``max_age_s`` (a publication whose refit never came)."""
        with self._lock:
            self._drop_locked(self._old)

    def release(self, buckets: Mapping[int, Prefetched]) -> None:
        """Give back buckets ``claim`` handed out and nothing adopted."""
        for p in buckets.values():
            self._free(p)

    def held(self) -> dict[str, Any]:
        """``tag``, ``buckets`` ready and ``bytes`` held (for ``status``), and counts."""
        with self._lock:
            ready = [j for j in self._jobs.values() if j.result is not None]
            tags = sorted({j.tag for j in self._jobs.values()})
        return {"tag": tags[0] if tags else None, "buckets": len(ready),
                "bytes": sum(j.result.nbytes for j in ready if j.result is not None),
                "prefetched": self.prefetched, "skipped": self.skipped}

    # ------------------------------------------------------------------ internals

    def _old(self, job: _Job) -> bool:
        return time.monotonic() - job.at > self.max_age_s

    def _drop_locked(self, which: Callable[[_Job], bool]) -> None:
        for key in [k for k, j in self._jobs.items() if which(j)]:
            job = self._jobs.pop(key)
            job.dropped = True
            if job.result is not None:
                self._free(job.result)
                job.result = None

    def _free(self, p: Prefetched) -> None:
        if p.copied:
            self._release(p.tensors)
        p.tensors = {}

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job.dropped:
                with self._lock:
                    self.skipped += 1
                continue
            try:
                result = self._prefetch(job)
            except Exception as exc:  # noqa: BLE001  (the PREPARE fetches it instead)
                logger.info("bucket %s not prefetched: %s: %s", job.key, type(exc).__name__, exc)
                result = None
            with self._lock:
                if job.dropped or result is None:
                    self.skipped += 1
                    if result is not None:
                        self._free(result)
                else:
                    self.prefetched += 1
                    job.result = result
            job.done.set()

    def _prefetch(self, job: _Job) -> Prefetched | None:
        got = self._prestage(self._fetch(job.ref, job.specs), job.verify)
        if got is None:
            return None
        staged, copied = got
        return Prefetched(tensors={n: t for n, (t, _) in staged.items()},
                          checksums={n: c for n, (_, c) in staged.items() if c is not None},
                          copied=copied, nbytes=sum(_nbytes(t) for t, _ in staged.values()))


def _is_ref(item: Any) -> bool:
    return hasattr(item, "hex") and not isinstance(item, (tuple, Mapping, bytes))


def _nbytes(t: Any) -> int:
    return int(t.numel() * t.element_size()) if hasattr(t, "numel") else int(getattr(t, "nbytes", 0))
