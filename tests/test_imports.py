"""What each process imports at start: torch (about a second of CPU per process here) only where
an engine runs. The coordinator, the persistence worker until its first write, and a driver that
launches, connects, serves or runs the CLI never import it (``cluster.launch`` writes version 0
from the engine file's bytes)."""

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
