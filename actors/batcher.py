"""Joining concurrent inference requests into batches along the engine's dynamic batch dim (dim 0
of every input), in the manner of Ray Serve's ``@serve.batch``. Plain Python: no Ray.

Contract of ``Batcher``:
- ``submit(inputs)`` blocks until the request's own outputs are back, with the version of the
  weight set that produced them, or raises what its batch raised.
- A batch starts with the oldest waiting request and takes the requests after it whose inputs
  have the same shapes beyond dim 0 and the same dtypes, while the sum of their batch sizes stays
  within ``max_batch_size``. It runs once the sum reaches ``max_batch_size`` or ``max_wait_s``
  after its first request arrived, whichever comes first. A request larger than
  ``max_batch_size`` on its own runs alone.
- A batch runs once, on one weight set: every response in it names the same version (I1 per
  batch). Each output is split back along dim 0 by the requests' sizes; an output without that
  batch dim fails the whole batch with a ``BatchingError`` saying so.
- Requests run in arrival order within a shape; a shape never waits behind another shape's batch
  for longer than one run.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Batcher", "BatchingError", "BatchStats"]

Run = Callable[[list[np.ndarray]], tuple[list[np.ndarray], int]]  # joined inputs -> (outputs, version)


class BatchingError(RuntimeError):
    """A batch's outputs cannot be split back into its requests' outputs."""


@dataclass
class BatchStats:
    batches: int = 0
    requests: int = 0
    largest: int = 0  # the largest batch run, in samples

    def as_dict(self) -> dict[str, int]:
        return {"batches": self.batches, "requests": self.requests, "largest": self.largest}


@dataclass(eq=False)  # identity: requests are removed from the queue by identity
class _Request:
    inputs: list[np.ndarray]
    size: int
    key: tuple[Any, ...]
    arrived: float
    future: Future = field(default_factory=Future)


def _key(inputs: Sequence[np.ndarray]) -> tuple[Any, ...]:
    return tuple((a.shape[1:], a.dtype.str) for a in inputs)


class Batcher:
    """See the module docstring."""

    def __init__(self, run: Run, *, max_batch_size: int, max_wait_s: float) -> None:
        if max_batch_size < 1 or max_wait_s < 0:
            raise ValueError(f"max_batch_size must be >= 1 and max_wait_s >= 0, got {max_batch_size}, "
                             f"{max_wait_s}")
        self._run = run
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.stats = BatchStats()
        self._queue: deque[_Request] = deque()
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="batcher", daemon=True)
        self._thread.start()

    def submit(self, inputs: Sequence[np.ndarray]) -> tuple[list[np.ndarray], int]:
        arrays = [np.asarray(x) for x in inputs]
        if not arrays or any(a.ndim == 0 for a in arrays):
            raise BatchingError("batching needs every input to have a batch dim 0")
        size = int(arrays[0].shape[0])
        request = _Request(arrays, size, _key(arrays), time.monotonic())
        with self._cond:
            if self._stopped:
                raise BatchingError("the batcher is stopped")
            self._queue.append(request)
            self._cond.notify_all()
        return request.future.result()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    # -- the batching thread

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._execute(batch)

    def _next_batch(self) -> list[_Request] | None:
        with self._cond:
            while True:
                while not self._queue and not self._stopped:
                    self._cond.wait()
                if self._stopped and not self._queue:
                    return None
                first = self._queue[0]
                chosen, total = self._gather(first)
                deadline = first.arrived + self.max_wait_s
                now = time.monotonic()
                if total >= self.max_batch_size or now >= deadline or self._stopped:
                    for r in chosen:
                        self._queue.remove(r)
                    return chosen
                self._cond.wait(deadline - now)

    def _gather(self, first: _Request) -> tuple[list[_Request], int]:
        chosen, total = [first], first.size
        for r in list(self._queue)[1:]:
            if r.key == first.key and total + r.size <= self.max_batch_size:
                chosen.append(r)
                total += r.size
        return chosen, total

    def _execute(self, batch: list[_Request]) -> None:
        try:
            if len(batch) == 1:
                joined = batch[0].inputs
            else:
                joined = [np.concatenate([r.inputs[i] for r in batch]) for i in range(len(batch[0].inputs))]
            outputs, version = self._run(joined)
            total = sum(r.size for r in batch)
            for i, out in enumerate(outputs):
                if out.ndim == 0 or out.shape[0] != total:
                    raise BatchingError(f"output {i} has shape {list(out.shape)}: no batch dim 0 of size "
                                        f"{total} to split among the batch's requests")
        except BaseException as exc:  # noqa: BLE001  (handed to every request of the batch)
            for r in batch:
                r.future.set_exception(exc)
            return
        self.stats.batches += 1
        self.stats.requests += len(batch)
        self.stats.largest = max(self.stats.largest, total)
        start = 0
        for r in batch:
            r.future.set_result(([o[start:start + r.size] for o in outputs], version))
            start += r.size
