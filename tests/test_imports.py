"""What each process imports at start: torch (about a second of CPU per process here) only where
an engine runs. The coordinator, the persistence worker, and a driver that launches, connects,
serves or runs the CLI never import it (``cluster.launch`` writes version 0 from the engine file's
bytes; the persistence worker writes versions from their buckets' bytes)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("modules", [
    "actors.coordinator",
    "actors.persist",
    "cluster",
    "cluster.cli",
    "engines",
    "engines.checksum, engines.errors, engines.manifest, engines.engine_file",
])
def test_importing_it_does_not_import_torch(modules: str) -> None:
    code = (f"import sys; import {modules}; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:5]")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]


def test_the_engines_package_still_offers_every_name_it_lists() -> None:
    import engines

    for name in engines.__all__:
        assert getattr(engines, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        engines.nope  # noqa: B018


_WRITER_WITHOUT_TORCH = """
import sys
sys.modules["torch"] = None  # from here on, any import of torch raises ImportError
import numpy as np
import xxhash
from actors.payload import PACK_BYTES, seal
from actors.persist import PersistJob, persist

def h(a):
    return xxhash.xxh3_64_hexdigest(a.tobytes())

small = np.arange(6, dtype=np.float32)
bf16 = np.array([1, 2, 3, 4], dtype=np.int16)  # bfloat16 bits travel as int16
large = np.full(PACK_BYTES // 4 + 1, 7.0, np.float32)
packed = np.zeros(128, np.uint8)
packed[0:24] = small.view(np.uint8)
packed[64:72] = bf16.view(np.uint8)
specs = {"small": {"shape": [2, 3], "dtype": "float32"}, "bf16": {"shape": [4], "dtype": "bfloat16"},
         "large": {"shape": [large.size], "dtype": "float32"}}
sums = {"small": h(small), "bf16": h(bf16), "large": h(large)}
state = sys.argv[1]
wire = (packed, {"small": (0, 24), "bf16": (64, 8)}, {"large": large})
persist(PersistJob(state_dir=state, version=1, refs=[seal(wire)], specs=specs, checksums=sums,
                   base_version=None, from_version=None, fsync=False))
changed = small + 10  # a subset refit of "small" alone, overlaid on version 1
subset = (np.frombuffer(changed.tobytes() + bytes(40), np.uint8), {"small": (0, 24)}, {})
persist(PersistJob(state_dir=state, version=2, refs=[seal(subset)], specs={"small": specs["small"]},
                   checksums={"small": h(changed)}, base_version=1, from_version=None, fsync=False))
persist(PersistJob(state_dir=state, version=3, refs=None, specs={}, checksums={}, base_version=None,
                   from_version=1, fsync=False))  # a rollback to version 1, re-saved as 3
assert sys.modules["torch"] is None
"""


def test_the_checkpoint_writer_stores_every_kind_of_version_without_torch(tmp_path: Path) -> None:
    """The persistence worker never imports torch (it would share the cores of the refits just
    after a launch with a second of import): a version from its buckets (packed, large and bf16
    tensors), a subset refit overlaid on a stored one and a rollback are written with torch
    unimportable, and each loads back, with torch, bit for bit."""
    import torch

    from actors.store import CheckpointStore

    p = subprocess.run([sys.executable, "-c", _WRITER_WITHOUT_TORCH, str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    store = CheckpointStore.in_state_dir(tmp_path, cleanup=False)
    small = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    bf16 = torch.tensor([1, 2, 3, 4], dtype=torch.int16).view(torch.bfloat16)
    large = torch.full((16385,), 7.0)
    for version, want_small in ((1, small), (2, small + 10), (3, small)):
        got = store.load(version)
        assert set(got) == {"small", "bf16", "large"}
        assert torch.equal(got["small"], want_small), version
        assert got["bf16"].dtype == torch.bfloat16 and torch.equal(got["bf16"], bf16), version
        assert torch.equal(got["large"], large), version
