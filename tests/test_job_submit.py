"""A real `ray start --head` + `ray job submit` of scripts/refit_job.py against a running fleet."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str], env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _stop_cluster(temp_dir: str) -> None:
    """Stop only this test's Ray (``ray stop`` would stop every Ray on the machine): kill the
    processes whose command line names its temp dir, then wait for them to go."""
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


def test_ray_job_submit_refits_a_running_fleet(tmp_path: Path) -> None:
    ray_bin = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
    assert ray_bin, "the ray CLI is not installed"
    gcs, dash, agent = _free_port(), _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # token authentication, as the README's secure set-up: the cluster, the drivers and the job
    # client share one token (never the machine's ~/.ray/auth_token, which other Rays may own)
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    temp_dir = tempfile.mkdtemp(prefix="wrjob", dir="/tmp")  # AF_UNIX paths must stay short
    start = _run([ray_bin, "start", "--head", f"--port={gcs}", "--num-cpus=4",
                  "--include-dashboard=true", f"--dashboard-port={dash}", "--disable-usage-stats",
                  f"--dashboard-agent-listen-port={agent}",
                  "--object-store-memory=268435456", f"--temp-dir={temp_dir}"], env)
    assert start.returncode == 0, start.stderr[-3000:]
    env["RAY_ADDRESS"] = f"127.0.0.1:{gcs}"
    try:
        engine = tmp_path / "conv.engine"
        name = "jobfleet"
        launch = (
            "import sys; sys.path.insert(0, 'tests')\n"
            "from fleet_models import build_conv_engine, fleet_config\n"
            "from pathlib import Path\n"
            "from cluster import Fleet\n"
            f"build_conv_engine(Path({str(engine)!r}))\n"
            f"Fleet.launch(fleet_config(Path({str(engine)!r}), Path({str(tmp_path)!r}), name={name!r}))\n"
            "print('launched')\n"
        )
        out = _run([sys.executable, "-c", launch], env)
        assert out.returncode == 0 and "launched" in out.stdout, out.stderr[-3000:]
        weights = tmp_path / "sevens.safetensors"
        save_file({"conv.weight": np.full((1, 1, 3, 3), 7.0, np.float32)}, str(weights))
        submit = [ray_bin, "job", "submit", f"--address=http://127.0.0.1:{dash}", "--working-dir", ".",
                  "--", "python", "scripts/refit_job.py", "--fleet", name, "--weights", str(weights),
                  "--key", "job-1"]
        deadline = time.monotonic() + 120
        while True:  # the dashboard's job agent comes up some seconds after `ray start` returns
            job = _run(submit, env, timeout=600)
            if "No available agent" not in job.stderr or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        line = next(ln for ln in job.stdout.splitlines() if ln.startswith("{"))
        result = json.loads(line)
        assert result["status"] == "committed" and result["version"] >= 1
        check = (
            "import numpy as np\n"
            "from cluster import Fleet\n"
            f"f = Fleet.connect({name!r})\n"
            "r = f.infer(np.ones((1, 1, 3, 3), np.float32))\n"
            "print('RESULT', float(r.outputs[0].ravel()[0]), r.version)\n"
            "f.shutdown()\n"
        )
        out = _run([sys.executable, "-c", check], env)
        assert out.returncode == 0, out.stderr[-3000:]
        line = next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT"))
        assert line.split()[1:] == ["63.0", str(result["version"])]
    finally:
        _stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
