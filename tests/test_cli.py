"""The `weight-refit` command line end to end, in subprocesses, against a private Ray head."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from fleet_models import build_conv_engine
from ray_head import ray_head, run
from safetensors.numpy import save_file

from cluster import Probe, save_probes

pytestmark = pytest.mark.slow


def _cli() -> list[str]:
    found = shutil.which("weight-refit", path=str(Path(sys.executable).parent))
    return [found] if found else [sys.executable, "-m", "cluster.cli"]


def _weights(path: Path, value: float, shape: tuple[int, ...] = (1, 1, 3, 3)) -> Path:
    save_file({"conv.weight": np.full(shape, value, np.float32)}, str(path))
    return path


def test_cli_end_to_end(tmp_path: Path) -> None:
    engine = tmp_path / "conv.engine"
    build_conv_engine(engine)
    config = tmp_path / "fleet.yaml"
    config.write_text(yaml.safe_dump({
        "name": "clifleet", "engine": str(engine), "replicas": 2, "state_dir": str(tmp_path / "state"),
        "timeouts": {"lease_s": 2, "request_s": 20, "launch_s": 90}}))
    cli = _cli()
    with ray_head() as (env, _dash):
        def wr(*args: str, code: int = 0) -> subprocess.CompletedProcess:
            p = run([*cli, *args], env, timeout=300)
            assert p.returncode == code, f"{args}: rc {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
            return p

        wr("launch", "--config", str(config))
        st = json.loads(wr("status", "--fleet", "clifleet", "--json").stdout)
        assert st["version"] == 0 and [r["id"] for r in st["replicas"]] == ["r0", "r1"]
        assert all(r["healthy"] and r["device"] == "cpu" for r in st["replicas"])

        ones = _weights(tmp_path / "ones.safetensors", 1.0)
        dry = json.loads(wr("refit", "--fleet", "clifleet", str(ones), "--dry-run", "--json").stdout)
        assert dry["valid"] and dry["tensors"] == 1 and dry["bytes"] == 36
        assert json.loads(wr("status", "--fleet", "clifleet", "--json").stdout)["version"] == 0

        res = json.loads(wr("refit", "--fleet", "clifleet", str(ones), "--key", "k1", "--json").stdout)
        assert res["status"] == "committed" and res["version"] == 1 and set(res["replicas"]) == {"r0", "r1"}
        again = json.loads(wr("refit", "--fleet", "clifleet", str(ones), "--key", "k1", "--json").stdout)
        assert again["version"] == 1 and again["duplicate"]
        np.savez(tmp_path / "twos.npz", **{"conv.weight": np.full((1, 1, 3, 3), 2.0, np.float32)})
        twos = tmp_path / "twos.npz"
        assert json.loads(wr("refit", "-f", "clifleet", str(twos), "--json").stdout)["version"] == 2
        back = json.loads(wr("rollback", "--fleet", "clifleet", "--json").stdout)
        assert back["status"] == "committed" and back["version"] == 3

        hist = json.loads(wr("history", "--fleet", "clifleet", "--json").stdout)
        assert [h["version"] for h in hist if h["status"] == "committed"] == [1, 2, 3]
        assert hist[-1]["origin_version"] == 1
        page = json.loads(wr("history", "-f", "clifleet", "--limit", "2", "--json").stdout)
        assert [h["version"] for h in page] == [2, 3]
        assert [h["version"] for h in json.loads(wr("history", "-f", "clifleet", "--since", "2",
                                                     "--json").stdout)] == [3]
        assert "--limit" in wr("history", "-f", "clifleet", "--limit", "2").stdout  # says there is more

        scaled = json.loads(wr("scale", "--fleet", "clifleet", "--replicas", "3", "--json").stdout)
        assert scaled["added"] == ["r2"]
        st = json.loads(wr("status", "--fleet", "clifleet", "--json").stdout)
        assert [r["version"] for r in st["replicas"]] == [3, 3, 3]
        newcomer = next(r for r in st["replicas"] if r["id"] == "r2")["caught_up_from"]
        assert (newcomer["source"], newcomer["version"]) == ("peer", 3)  # a newcomer catches up from a peer
        table = wr("status", "--fleet", "clifleet").stdout
        assert "r2" in table and "version 3" in table and "last catch-up" in table

        # errors: one line on stderr, exit codes scripts can rely on, nothing changed
        bad = _weights(tmp_path / "bad.safetensors", 1.0, shape=(2, 2))
        p = wr("refit", "--fleet", "clifleet", str(bad), code=1)
        assert "conv.weight" in p.stderr and len(p.stderr.strip().splitlines()) == 1
        p = wr("refit", "--fleet", "clifleet", str(tmp_path / "nope.safetensors"), code=1)
        assert "does not exist" in p.stderr
        p = wr("status", "--fleet", "nosuchfleet", code=3)
        assert "nosuchfleet" in p.stderr
        p = wr("rollback", "--fleet", "clifleet", "--to", "999", code=4)
        assert "999" in p.stderr
        assert json.loads(wr("status", "--fleet", "clifleet", "--json").stdout)["version"] == 3

        # a checkpoint directory as training code saves it: sharded, an index, names to map
        ckpt = tmp_path / "ckpt"
        ckpt.mkdir()
        save_file({"model.conv.weight": np.full((1, 1, 3, 3), 4.0, np.float32)},
                  str(ckpt / "model-00001-of-00001.safetensors"))
        (ckpt / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {"model.conv.weight": "model-00001-of-00001.safetensors"}}))
        res = json.loads(wr("refit", "-f", "clifleet", str(ckpt), "--strip-prefix", "model.",
                            "--json").stdout)
        assert res["status"] == "committed" and res["version"] == 4
        # a behaviour probe refuses weights whose outputs overflow; nothing changes
        probes = tmp_path / "probes.safetensors"
        save_probes([Probe("overflow", [np.full((1, 1, 3, 3), 1e10, np.float32)])], probes)
        huge = _weights(tmp_path / "huge.safetensors", 1e30)
        p = wr("refit", "-f", "clifleet", str(huge), "--probes", str(probes), code=4)
        assert "probe 'overflow' output 0" in p.stderr
        assert json.loads(wr("status", "--fleet", "clifleet", "--json").stdout)["version"] == 4

        # a canary on one replica with half of new requests, then promoted; another, aborted
        fives = _weights(tmp_path / "fives.safetensors", 5.0)
        p = wr("refit", "-f", "clifleet", str(fives), "--canary", "1", "--traffic", "50%")
        assert "canary: version 6 on r0 with 50% of new requests; the rest stays on version 4" in p.stdout
        table = wr("status", "-f", "clifleet").stdout
        assert "canary running: version 6 on r0 with 50% of new requests; the rest on version 4" in table
        assert [line.split("│")[8].strip() for line in table.splitlines() if line.startswith("│ r")] \
            == ["canary", "main", "main"]
        p = wr("refit", "-f", "clifleet", str(ones), code=4)
        assert "a canary of v6 is running on r0" in p.stderr
        assert json.loads(wr("promote", "-f", "clifleet", "--json").stdout)["version"] == 6
        st = json.loads(wr("status", "-f", "clifleet", "--json").stdout)
        assert [r["version"] for r in st["replicas"]] == [6, 6, 6] and st["canary"] is None
        wr("refit", "-f", "clifleet", str(ones), "--canary", "34%", "--json")
        out = json.loads(wr("abort-canary", "-f", "clifleet", "--reason", "cli test", "--json").stdout)
        assert out["version"] == 8 and out["status"] == "committed"
        hist = {h["version"]: h for h in json.loads(wr("history", "-f", "clifleet", "--json").stdout)}
        assert "aborted (cli test); ended by v8" in hist[7]["canary"]
        p = wr("promote", "-f", "clifleet", code=1)
        assert "no canary is running" in p.stderr
        p = wr("refit", "-f", "clifleet", str(ones), "--canary", "150%", code=1)
        assert "--canary must be above 0% and at most 100%" in p.stderr

        wr("shutdown", "--fleet", "clifleet")
        wr("status", "--fleet", "clifleet", code=3)

