"""The command line at its edges, in subprocesses: every exit code of the documented table, one
line per error, bounded time when no Ray answers, and the README's commands in any order on a
machine with a live, dead or no Ray head."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from fleet_models import build_conv_engine
from ray_head import free_port, ray_head
from safetensors.numpy import save_file

from engines import BuilderConfig, build_engine

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
# The longest a command may take when no Ray answers: the connect bound (15 s) plus the start of
# a Python process that imports Ray and torch on a busy 2-core machine. A hang runs far past it.
NO_HANG_S = 60.0


def cli(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    exe = shutil.which("weight-refit", path=str(Path(sys.executable).parent))
    assert exe, "the weight-refit command is not installed"
    return subprocess.run([exe, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def error_line(p: subprocess.CompletedProcess) -> str:
    """The one ``error:`` line; nothing else on stderr."""
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr[-3000:]
    return lines[0]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(extra)
    return env


def write_config(path: Path, engine: Path, name: str, **over: Any) -> Path:
    fields = {"name": name, "engine": str(engine), "replicas": 2,
              "state_dir": str(path.parent / f"state-{name}"),
              "timeouts": {"lease_s": 2, "request_s": 20, "launch_s": 60}}
    fields.update(over)
    path.write_text(yaml.safe_dump(fields))
    return path


@pytest.fixture(scope="module")
def conv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    engine = tmp_path_factory.mktemp("engines") / "conv.engine"
    build_conv_engine(engine)
    return engine


@pytest.fixture(scope="module")
def head(conv: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, str], Path]]:
    """A private Ray head (token auth) with a fleet ``edges`` launched through the CLI."""
    work = tmp_path_factory.mktemp("edges")
    with ray_head() as (env, _dash):
        config = write_config(work / "edges.yaml", conv, "edges")
        p = cli("launch", "--config", str(config), env=env)
        assert p.returncode == 0, p.stderr[-3000:]
        yield env, work
        cli("shutdown", "--fleet", "edges", env=env)


# ----------------------------------------------------------------------------- the exit-code table


def test_every_row_of_the_exit_code_table(head: tuple[dict[str, str], Path], conv: Path) -> None:
    env, work = head
    ones = work / "ones.safetensors"
    save_file({"conv.weight": np.ones((1, 1, 3, 3), np.float32)}, str(ones))
    bad = work / "bad.safetensors"
    save_file({"conv.weight": np.ones((2, 2), np.float32)}, str(bad))
    frozen = work / "frozen.engine"
    build_engine(torch.nn.Linear(2, 2), [torch.ones(1, 2)], BuilderConfig(enable_refit=False)).save(frozen)
    a_file = work / "a-file"
    a_file.write_text("x")

    assert cli("status", "--fleet", "edges", env=env).returncode == 0  # 0 ok
    rows: list[tuple[list[str], int, str]] = [
        (["refit", "--fleet", "edges", str(bad)], 1, "conv.weight"),
        (["scale", "--fleet", "edges", "--replicas", "1000"], 1, "impossible placement"),
        (["launch", "--config", str(write_config(work / "f.yaml", conv, "statefile", state_dir=str(a_file)))],
         1, "is not a directory"),
        (["launch", "--config", str(write_config(work / "z.yaml", frozen, "frozen"))], 1, "enable_refit"),
        (["status", "--fleet", "edges", "--bogus"], 2, "No such option"),
        (["refit", "--fleet", "edges"], 2, "Missing argument"),
        (["status", "--fleet", "nosuchfleet"], 3, "nosuchfleet"),
        (["rollback", "--fleet", "edges", "--to", "999"], 4, "999"),
        (["launch", "--config", str(write_config(work / "d.yaml", conv, "dies",
                                                 failpoints={"replica.on_start": "r1/raise"}))],
         5, "replica r1 could not start: FailpointError"),
    ]
    for args, code, words in rows:
        p = cli(*args, env=env)
        assert p.returncode == code, f"{args}: rc {p.returncode}: {p.stderr[-2000:]}"
        assert words in error_line(p), (args, p.stderr)
    # nothing changed, and the failed launch left no fleet behind
    assert "version 0" in cli("status", "--fleet", "edges", env=env).stdout
    p = cli("status", "--fleet", "dies", env=env)
    assert p.returncode == 3 and "dies" in error_line(p)


def test_a_reused_key_is_named_a_duplicate_and_other_weights_under_it_are_refused(
        head: tuple[dict[str, str], Path]) -> None:
    env, work = head
    twos, threes = work / "twos.safetensors", work / "threes.safetensors"
    save_file({"conv.weight": np.full((1, 1, 3, 3), 2.0, np.float32)}, str(twos))
    save_file({"conv.weight": np.full((1, 1, 3, 3), 3.0, np.float32)}, str(threes))
    first = cli("refit", "--fleet", "edges", str(twos), "--key", "k-dup", env=env)
    assert first.returncode == 0 and "committed version" in first.stdout, first.stderr
    again = cli("refit", "--fleet", "edges", str(twos), "--key", "k-dup", env=env)
    assert again.returncode == 0 and again.stdout.startswith("duplicate:"), again.stdout
    other = cli("refit", "--fleet", "edges", str(threes), "--key", "k-dup", env=env)
    assert other.returncode == 1 and "k-dup" in error_line(other) and "other weights" in error_line(other)


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_a_weights_path_that_is_not_a_file_is_named_as_such(head: tuple[dict[str, str], Path],
                                                            kind: str) -> None:
    env, work = head
    path = work / f"not-a-file-{kind}"
    if kind == "directory":
        path.mkdir()
    else:
        os.mkfifo(path)
    p = cli("refit", "--fleet", "edges", str(path), env=env, timeout=NO_HANG_S)
    says = {"directory": "is a directory holding no checkpoint",
            "fifo": "is neither a regular file nor a directory"}[kind]
    assert p.returncode == 1 and says in error_line(p) and str(path) in error_line(p)


def test_address_wins_over_ray_address(head: tuple[dict[str, str], Path]) -> None:
    env, _ = head
    live = env["RAY_ADDRESS"]
    dead = {**env, "RAY_ADDRESS": f"127.0.0.1:{free_port()}"}
    p = cli("status", "--fleet", "edges", "--address", live, env=dead, timeout=NO_HANG_S)
    assert p.returncode == 0, p.stderr[-2000:]
    p = cli("status", "--fleet", "edges", env=dead, timeout=NO_HANG_S)
    assert p.returncode == 3 and "no Ray cluster answers" in error_line(p)


# ----------------------------------------------------------------------------- no cluster


@contextlib.contextmanager
def silent_listener() -> Iterator[int]:
    """A port that accepts connections and never says anything (not a Ray cluster)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    try:
        yield s.getsockname()[1]
    finally:
        s.close()


@pytest.mark.parametrize("case", ["RAY_ADDRESS at nothing", "--address at nothing",
                                  "a stale record of a killed head", "a port that never answers"])
def test_a_command_aimed_at_no_cluster_exits_3_with_one_line_in_bounded_time(tmp_path: Path,
                                                                             case: str) -> None:
    ray_tmp = Path(tempfile.mkdtemp(prefix="wrt", dir="/tmp"))
    env = clean_env(RAY_TMPDIR=str(ray_tmp), WEIGHT_REFIT_HOME=str(tmp_path / "home"))
    args = ["status", "--fleet", "F"]
    with silent_listener() as mute:
        if case == "RAY_ADDRESS at nothing":
            env["RAY_ADDRESS"] = f"127.0.0.1:{free_port()}"
        elif case == "--address at nothing":
            args += ["--address", "127.0.0.1:1"]
        elif case == "a stale record of a killed head":
            (ray_tmp / "ray").mkdir()
            (ray_tmp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")
        else:
            args = ["--connect-timeout", "3", *args, "--address", f"127.0.0.1:{mute}"]
        t0 = time.monotonic()
        p = cli(*args, env=env, timeout=2 * NO_HANG_S)
        took = time.monotonic() - t0
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert p.returncode == 3, p.stderr[-2000:]
    line = error_line(p)
    assert "Ray" in line and ("answer" in line or "running" in line), line
    assert took < NO_HANG_S, f"took {took:.0f}s"


def test_a_config_error_names_the_field_on_the_cli_line(conv: Path, tmp_path: Path) -> None:
    env = clean_env()
    typo = write_config(tmp_path / "typo.yaml", conv, "typo", replicass=2)
    p = cli("launch", "--config", str(typo), env=env)
    assert p.returncode == 1 and "replicass: unknown field" in error_line(p)
    wrong = write_config(tmp_path / "wrong.yaml", conv, "wrong", replicas=True)
    p = cli("launch", "--config", str(wrong), env=env)
    assert p.returncode == 1 and "replicas: " in error_line(p) and "integer" in error_line(p)
    dotted = write_config(tmp_path / "dots.yaml", conv, "a..b")
    p = cli("launch", "--config", str(dotted), env=env)
    assert p.returncode == 1 and "invalid fleet name 'a..b'" in error_line(p)
    # a ray_init key no `ray start --head` takes: refused before anything changes (--fresh kept the state)
    env = clean_env(WEIGHT_REFIT_HOME=str(tmp_path / "home"), RAY_TMPDIR=str(tmp_path / "no-ray"))
    driver_only = write_config(tmp_path / "env.yaml", conv, "envy", ray_init={"runtime_env": {"pip": ["x"]}})
    (tmp_path / "state-envy").mkdir()
    (tmp_path / "state-envy" / "keep").write_text("mine")
    p = cli("launch", "--config", str(driver_only), "--fresh", env=env)
    assert p.returncode == 1 and "ray_init runtime_env: a Ray head" in error_line(p), p.stderr
    assert (tmp_path / "state-envy" / "keep").read_text() == "mine"


# ----------------------------------------------------------------------------- the README's order


def _head_processes(head: dict[str, Any]) -> list[int]:
    """The processes of a recorded head: its session's, and its Ray client server."""
    from cluster.ray_session import HeadRecord

    record = HeadRecord(address=head["address"], session_dir=head["session_dir"])
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if record.owns((proc / "cmdline").read_bytes()):
                    found.append(int(proc.name))
    return found


def test_the_readme_commands_in_any_order_with_a_live_a_dead_and_no_head(conv: Path, tmp_path: Path) -> None:
    """Quick start, the CLI tour, then the main job again; the main job while the tour's head
    runs; a head killed behind the CLI's back; and the tour ends with nothing left running."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="wrt", dir="/tmp"))
    home = tmp_path / "home"
    env = clean_env(RAY_TMPDIR=str(ray_tmp), WEIGHT_REFIT_HOME=str(home), HOME=str(home))
    config = write_config(tmp_path / "local.yaml", conv, "tour",
                          ray_init={"num_cpus": 2, "resources": {"tour_card": 3}})
    demo_config = write_config(tmp_path / "demo.yaml", conv, "demo", ray_init={"num_cpus": 2})
    port = str(free_port())

    def demo() -> None:
        p = subprocess.run([sys.executable, "scripts/fleet_demo.py", "--fresh", "--config", str(demo_config),
                            "--interval", "0.1", "--clients", "1"], env=env, cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
        assert p.returncode == 0 and "0 problem(s)" in p.stdout, p.stdout[-2000:] + p.stderr[-2000:]

    def tour_start() -> dict[str, Any]:
        p = cli("launch", "--config", str(config), "--head-port", port, env=env)
        assert p.returncode == 0 and "ready" in p.stdout, p.stderr[-3000:]
        import json

        return json.loads((home / "ray-head.json").read_text())

    try:
        demo()  # no head
        head = tour_start()
        assert _head_processes(head)
        # every ray_init key reached the head: its raylet has the config's resource
        cmdlines = [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in _head_processes(head)]
        assert any(b"raylet" in c and b"tour_card" in c for c in cmdlines)
        assert cli("status", "--fleet", "tour", env=env).returncode == 0
        demo()  # the main job while the tour's head runs: a private Ray of its own
        # the same state dir while its fleet runs: refused, not corrupted
        p = cli("launch", "--config", str(config), "--fresh", env=env)
        assert p.returncode == 1 and "in use" in error_line(p)
        # joining the running head, ray_init does not apply: a key no head takes is not refused
        joining = write_config(tmp_path / "joining.yaml", conv, "tour",
                               ray_init={"num_cpus": 2, "runtime_env": {"env_vars": {"A": "1"}}})
        p = cli("launch", "--config", str(joining), "--fresh", env=env)
        assert p.returncode == 1 and "in use" in error_line(p), error_line(p)
        p = cli("shutdown", "--fleet", "tour", "--stop-ray", env=env)
        assert p.returncode == 0, p.stderr[-2000:]
        deadline = time.monotonic() + 30
        while _head_processes(head) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _head_processes(head) == []
        assert not (ray_tmp / "ray" / "ray_current_cluster").exists()
        demo()  # the main job again, after the tour
        # a head killed behind the CLI's back leaves a stale record: launch starts a new one
        head = tour_start()
        for pid in _head_processes(head):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        p = cli("status", "--fleet", "tour", env=env, timeout=2 * NO_HANG_S)
        assert p.returncode == 3 and "does not answer" in error_line(p)
        head = tour_start()
        assert cli("shutdown", "--fleet", "tour", "--stop-ray", env=env).returncode == 0
    finally:
        record = home / "ray-head.json"
        if record.exists():
            import json

            for pid in _head_processes(json.loads(record.read_text())):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)
        shutil.rmtree(ray_tmp, ignore_errors=True)
