"""The seed's samples, run as subprocesses: they print what the C++ samples print."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engines import load_engine

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
RESULT = re.compile(r"result: (-?[\d.]+)")


def run_script(name: str, *args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(SCRIPTS / name), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{name} {args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def results(stdout: str) -> list[float]:
    return [float(m) for m in RESULT.findall(stdout)]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """gen_pytorch_model.py, then gen_model.py, into a temporary directory."""
    tmp = tmp_path_factory.mktemp("samples")
    weights, engine = tmp / "conv.safetensors", tmp / "conv.engine"
    gen = run_script("gen_pytorch_model.py", "--out", str(weights), cwd=tmp)
    build = run_script("gen_model.py", "--weights", str(weights), "--out", str(engine), cwd=tmp)
    return tmp, weights, engine, gen.stdout, build.stdout


def test_gen_pytorch_model_writes_the_zero_conv(built):
    _, weights, _, stdout, _ = built
    state = load_file(str(weights))
    assert list(state) == ["conv.weight"]
    assert state["conv.weight"].shape == (1, 1, 3, 3)
    assert state["conv.weight"].dtype == torch.float32
    assert torch.count_nonzero(state["conv.weight"]) == 0
    assert str(weights) in stdout


def test_gen_model_builds_a_refittable_engine(built):
    _, _, engine_path, _, stdout = built
    assert str(engine_path) in stdout
    engine = load_engine(engine_path)
    assert engine.config.enable_refit is True
    spec = engine.manifest()
    assert list(spec) == ["conv.weight"]
    assert spec["conv.weight"].shape == (1, 1, 3, 3)
    assert spec["conv.weight"].dtype == "float32"
    r = engine.infer(torch.ones(1, 1, 3, 3))
    assert r.outputs[0].shape == (1, 1, 1, 1)
    assert float(r.outputs[0].item()) == 0.0
    assert r.version == 0


def test_single_thread_prints_0_then_9(built):
    tmp, _, engine, _, _ = built
    out = run_script("single_thread.py", "--engine", str(engine), cwd=tmp).stdout
    before, sep, after = out.partition("--- weight refit ---\n")
    assert sep
    assert results(before) == [0.0]
    assert results(after) == [9.0]
    # the C++ sample's print_data_info layout
    assert before.splitlines()[:3] == [
        "input: 1 1 1  conv kernel: 0 0 0  result: 0",
        "       1 1 1               0 0 0 ",
        "       1 1 1               0 0 0 ",
    ]
    assert after.splitlines()[0] == "input: 1 1 1  conv kernel: 1 1 1  result: 9"
    assert load_engine(engine).version == 0  # the sample refits in memory, the file is unchanged


def test_single_thread_builds_a_missing_engine_and_its_weights(tmp_path):
    engine = tmp_path / "sub" / "new.engine"
    out = run_script("single_thread.py", "--engine", str(engine), cwd=tmp_path).stdout
    assert engine.is_file()
    assert (tmp_path / "sub" / "new.safetensors").is_file()
    assert results(out) == [0.0, 9.0]


def test_multi_thread_results_grow_by_9_up_to_81(built):
    tmp, _, engine, _, _ = built
    proc = run_script("multi_thread.py", "--interval", "0.05", "--engine", str(engine), cwd=tmp)
    seen = results(proc.stdout)
    assert seen == [9.0 * k for k in range(10)], proc.stdout[-2000:]
    assert all(v % 9 == 0 for v in seen)
    assert seen == sorted(seen)
    summary = [line for line in proc.stdout.splitlines() if line.startswith("summary:")]
    assert len(summary) == 1
    assert summary[0].endswith("; ok")
    assert "9 refits" in summary[0]
    assert "-------------------------" in proc.stdout
    assert len(proc.stdout) < 20_000  # prints on change, not on every inference


def test_scripts_have_help_and_default_to_out(tmp_path):
    code = (
        "import contextlib, io, sys\n"
        f"sys.path.insert(0, {str(SCRIPTS)!r})\n"
        "for name in ['gen_pytorch_model', 'gen_model', 'single_thread', 'multi_thread']:\n"
        "    buf = io.StringIO()\n"
        "    with contextlib.redirect_stdout(buf):\n"
        "        try:\n"
        "            __import__(name).main(['--help'])\n"
        "        except SystemExit as e:\n"
        "            assert e.code == 0, (name, e.code)\n"
        "    print('=== ' + name)\n"
        "    print(buf.getvalue())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    helps = dict(re.findall(r"=== (\w+)\n(.*?)(?==== |\Z)", proc.stdout, re.S))
    assert set(helps) == {"gen_pytorch_model", "gen_model", "single_thread", "multi_thread"}
    flat = {k: " ".join(v.split()) for k, v in helps.items()}
    assert "out/conv.safetensors" in flat["gen_pytorch_model"]
    assert "out/conv.engine" in flat["gen_model"]
    assert "--device" in flat["gen_model"]
    assert "out/conv.engine" in flat["single_thread"]
    assert "--interval" in flat["multi_thread"]
    assert "only when the result changes" in flat["multi_thread"]
    assert not (tmp_path / "out").exists()  # --help writes nothing


def test_the_cli_demo_runs_the_samples_in_order(tmp_path):
    """`weight-refit demo`, the README tour's first command: builds out/conv.engine, then 0 -> 9,
    then 0 ... 81."""
    import shutil

    cli = shutil.which("weight-refit", path=str(Path(sys.executable).parent))
    cmd = [cli] if cli else [sys.executable, "-m", "cluster.cli"]
    proc = subprocess.run([*cmd, "demo", "--interval", "0.05"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wrote" in proc.stdout and "result: 9" in proc.stdout and "81" in proc.stdout
    assert "Traceback" not in proc.stderr
