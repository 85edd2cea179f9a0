"""Deleting checkpoint versions nobody needs, in the background, once ``refit`` has returned.

Which versions stay is ``coordinator_protocol.retained_versions`` (pure). Only versions below the
next number to be assigned are considered, so a refit that starts meanwhile cannot lose its
checkpoint; ``wait`` lets rollbacks and ``versions()`` see the store after the last pass.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from .store import CheckpointStore

logger = logging.getLogger("weight_refit.coordinator")


class Retention:
    def __init__(self, store: CheckpointStore) -> None:
        self._store = store
        self._runner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="retain")
        self._pending: Future[Any] | None = None

    def schedule(self, keep: set[int], below: int) -> None:
        self._pending = self._runner.submit(self._store.retain, keep, below=below)

    def later(self, work: Any) -> None:
        """Run ``work`` on the same background thread, after what is scheduled (log compaction)."""
        self._pending = self._runner.submit(work)

    def wait(self) -> None:
        pending = self._pending
        if pending is not None:
            try:
                pending.result()
            except Exception:  # noqa: BLE001  (a failed pass is retried by the next one)
                logger.exception("checkpoint retention failed")

    def drop(self, version: int) -> None:
        """Delete an aborted version's files (a partial write, or one that completed too late)."""
        try:
            self._store.retain(set(self._store.versions()) - {version}, below=version + 1)
        except OSError:
            logger.exception("could not delete the files of aborted version %s", version)
