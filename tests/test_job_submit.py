"""A real `ray start --head` + `ray job submit` of scripts/refit_job.py against a running fleet."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from ray_head import ray_bin, ray_head, run
from safetensors.numpy import save_file

pytestmark = pytest.mark.slow


def test_ray_job_submit_refits_a_running_fleet(tmp_path: Path) -> None:
    with ray_head() as (env, dash):
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
        out = run([sys.executable, "-c", launch], env)
        assert out.returncode == 0 and "launched" in out.stdout, out.stderr[-3000:]
        weights = tmp_path / "sevens.safetensors"
        save_file({"conv.weight": np.full((1, 1, 3, 3), 7.0, np.float32)}, str(weights))
        submit = [ray_bin(), "job", "submit", f"--address=http://127.0.0.1:{dash}", "--working-dir", ".",
                  "--", "python", "scripts/refit_job.py", "--fleet", name, "--weights", str(weights),
                  "--key", "job-1"]
        deadline = time.monotonic() + 120
        while True:  # the dashboard's job agent comes up some seconds after `ray start` returns
            job = run(submit, env, timeout=600)
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
        out = run([sys.executable, "-c", check], env)
        assert out.returncode == 0, out.stderr[-3000:]
        line = next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT"))
        assert line.split()[1:] == ["63.0", str(result["version"])]
