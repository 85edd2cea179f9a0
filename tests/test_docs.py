"""Docs that must match the code."""

from __future__ import annotations

import ast
import re
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


def test_every_test_the_guarantees_name_exists() -> None:
    """docs/guarantees.md is the contract users read: each test it cites must exist."""
    text = (ROOT / "docs" / "guarantees.md").read_text()
    defined: dict[str, set[str]] = {}
    for path in (ROOT / "tests").glob("test_*.py"):
        tree = ast.parse(path.read_text())
        defined[path.name] = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    missing = []
    current = None
    for file, name in re.findall(r"`(test_\w+\.py)?::(test_\w+\*?)", text):
        current = file or current
        assert current is not None, name
        names = defined.get(current, set())
        found = any(n.startswith(name[:-1]) for n in names) if name.endswith("*") else name in names
        if not found:
            missing.append(f"{current}::{name}")
    for file in re.findall(r"`(test_\w+\.py)`", text):
        if file not in defined:
            missing.append(file)
    assert not missing, missing
