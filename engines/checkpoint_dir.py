"""Checkpoint directories as training code saves them: ``save_pretrained`` and sharded safetensors
with an index, read one shard at a time. Never executes code from a file.

A directory is read from the first of these it holds:

- ``model.safetensors.index.json``: shards named by its ``weight_map`` (weight name -> shard file);
- ``model.safetensors``;
- ``pytorch_model.bin.index.json`` (the same, with ``.bin`` shards read by torch's weights-only
  unpickler);
- ``pytorch_model.bin``.

Contract of ``CheckpointDir``:
- Opening it reads the index and every shard's header (names, shapes, dtypes; no tensor data) and
  refuses, naming the file and the weight: a shard outside the directory, a missing shard, a
  weight the index names that its shard lacks, a weight in a shard the index does not name, a
  name twice. ``entries`` are the mapped ``(name, shape, dtype)`` of every weight.
- ``shards(expect)`` yields each shard's tensors under their mapped names, one shard at a time
  (the caller drops one before the next is read), each shard's header checked against ``expect``
  again as it is read.
- Other files (``config.json``, tokenizer files) are ignored.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import WeightFileError
from .manifest import TensorSpec

__all__ = ["CHECKPOINT_FILES", "CheckpointDir", "is_checkpoint_dir"]

CHECKPOINT_FILES = ("model.safetensors.index.json", "model.safetensors",
                    "pytorch_model.bin.index.json", "pytorch_model.bin")

Entry = tuple[str, tuple[int, ...], str]
NameFn = Callable[[str], str]


def is_checkpoint_dir(weights: Any) -> bool:
    return isinstance(weights, (str, os.PathLike)) and Path(weights).is_dir()


class CheckpointDir:
    """See the module docstring."""

    def __init__(self, path: str | os.PathLike, names: NameFn) -> None:
        from .weights import file_entries  # weights imports this module lazily: no cycle at import

        self.path = Path(path)
        self._names = names
        found = next((f for f in CHECKPOINT_FILES if (self.path / f).is_file()), None)
        if found is None:
            raise WeightFileError(f"weights file {str(self.path)!r} is a directory holding no checkpoint: "
                                  f"none of {', '.join(CHECKPOINT_FILES)}")
        if found.endswith(".index.json"):
            self.shard_files = self._shards_of_index(self.path / found)
        else:
            self.shard_files = {self.path / found: None}
        self.entries: list[Entry] = []
        for shard, listed in self.shard_files.items():
            keys = file_entries(shard)
            if listed is not None:
                self._check_against_index(shard, [k for k, _, _ in keys], listed)
            self.entries += [(names(k), shape, dtype) for k, shape, dtype in keys]

    def _shards_of_index(self, index: Path) -> dict[Path, list[str] | None]:
        where = f"checkpoint index {str(index)!r}"
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise WeightFileError(f"{where} is not a checkpoint index with a 'weight_map': {exc}") from None
        if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise WeightFileError(f"{where}: 'weight_map' must map weight names to shard file names")
        shards: dict[Path, list[str] | None] = {}
        root = self.path.resolve()
        for name, file in weight_map.items():
            shard = (self.path / file)
            if shard.resolve().parent != root:
                raise WeightFileError(f"{where}: weight {name!r} names shard {file!r}, which is not a file "
                                      f"in the checkpoint directory")
            if not shard.is_file():
                raise WeightFileError(f"{where}: weight {name!r} is in shard {file!r}, which does not exist")
            listed = shards.setdefault(shard, [])
            assert listed is not None
            listed.append(name)
        return shards

    @staticmethod
    def _check_against_index(shard: Path, keys: list[str], listed: list[str]) -> None:
        held = set(keys)
        if missing := [n for n in listed if n not in held]:
            raise WeightFileError(f"weight {missing[0]!r}: the checkpoint index puts it in shard "
                                  f"{shard.name!r}, which does not hold it", name=missing[0])
        named = set(listed)
        if extra := [k for k in keys if k not in named]:
            raise WeightFileError(f"weight {extra[0]!r}: shard {shard.name!r} holds it but the checkpoint "
                                  f"index does not name it", name=extra[0])

    @property
    def nbytes(self) -> int:
        return sum(TensorSpec(shape=shape, dtype=dtype).nbytes for _, shape, dtype in self.entries)

    def shards(self, expect: Mapping[str, TensorSpec] | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Each shard's tensors under their mapped names, one shard at a time."""
        from .weights import read_weights_file

        for shard in self.shard_files:
            yield read_weights_file(shard, expect=expect, names=self._names)

    def read_all(self, expect: Mapping[str, TensorSpec] | None = None) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for tensors in self.shards(expect):
            out.update(tensors)
        return out
