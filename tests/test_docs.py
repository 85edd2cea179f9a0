"""Docs that must match the code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_configuration_reference_is_generated_from_the_models() -> None:
    p = subprocess.run([sys.executable, "scripts/gen_config_reference.py", "--check"], cwd=ROOT,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def test_readme_commands_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    for script in ("scripts/fleet_demo.py", "scripts/refit_job.py", "scripts/single_thread.py",
                   "scripts/multi_thread.py", "scripts/gen_model.py", "scripts/gen_pytorch_model.py"):
        assert script in readme and (ROOT / script).exists(), script
    for command in ("launch", "refit", "rollback", "status", "history", "scale", "shutdown"):
        assert f"weight-refit {command}" in readme, command
