"""A private `ray start --head` for tests that need a real cluster process (job submission, CLI).

Token authentication on, with a token of its own (never the machine's ~/.ray/auth_token); a short
temp dir (AF_UNIX socket paths are limited to 107 bytes); free ports; stopped by killing exactly
the processes whose command line names its temp dir (``ray stop`` would stop every Ray here).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_bin() -> str:
    found = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
    assert found, "the ray CLI is not installed"
    return found


def run(args: list[str], env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _stop(temp_dir: str) -> None:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if temp_dir.encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(-1, os.WNOHANG)
        time.sleep(0.1)


@contextlib.contextmanager
def ray_head(num_cpus: int = 4) -> Iterator[tuple[dict[str, str], int]]:
    """Yields (env for clients: RAY_ADDRESS + token, dashboard port)."""
    gcs, dash, agent = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    temp_dir = tempfile.mkdtemp(prefix="wrhead", dir="/tmp")
    start = run([ray_bin(), "start", "--head", f"--port={gcs}", f"--num-cpus={num_cpus}",
                 "--include-dashboard=true", f"--dashboard-port={dash}", "--disable-usage-stats",
                 f"--dashboard-agent-listen-port={agent}", "--object-store-memory=268435456",
                 f"--temp-dir={temp_dir}"], env)
    assert start.returncode == 0, start.stderr[-3000:]
    env["RAY_ADDRESS"] = f"127.0.0.1:{gcs}"
    try:
        yield env, dash
    finally:
        _stop(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
