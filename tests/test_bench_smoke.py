"""Smoke test of the refit benchmark: a tiny model, one replica, three refits under open-loop load.

Runs ``scripts/bench_refit.py`` in a subprocess (it starts its own local Ray) and checks that the
JSON it writes has every key issue 5 asks for, and that no response failed or was torn/mixed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

REQUIRED = ("model_bytes", "replicas", "refit_s", "floor_s", "ratio_to_floor", "checksum_s", "persist_s",
            "reload_baseline_s", "byvalue_baseline_s", "p99_idle_ms", "p99_refit_ms", "failed", "torn")


def _run_script(name: str, *args: str) -> None:
    """Run ``scripts/<name>`` (it starts its own local Ray) and fail with its stderr if it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=580)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_bench_refit_tiny(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    _run_script("bench_refit.py", "--sizes-mib", "4", "--replicas", "1", "--refits", "3", "--warm", "3",
                "--warmup", "1", "--idle-s", "1", "--rate", "100", "--concurrency", "4", "--bucket-mib", "2",
                "--json", str(out), "--workdir", str(tmp_path / "work"))
    result = json.loads(out.read_text())
    assert result["rows"], result.get("skipped")
    assert result["config"]["rate"] == 100
    for row in result["rows"]:
        missing = [k for k in REQUIRED if k not in row]
        assert not missing, f"row lacks {missing}"
        assert row["model_bytes"] == 4 << 20 and row["replicas"] == 1
        assert row["bucket_mib"] == 2 and row["profile_warm"]["buckets"] == 2  # 4 MiB put in 2 MiB buckets
        assert row["failed"] == 0 and row["torn"] == 0 and row["mixed"] == 0 and row["backwards"] == 0
        assert row["refit_s"] > 0 and row["floor_s"] > 0 and row["ratio_to_floor"] > 0
        assert row["reload_baseline_s"] > 0 and row["byvalue_baseline_s"] > 0
        assert row["n_idle"] > 0 and row["n_refit"] > 0
        # open loop: about 100 requests in the idle second, where 4 closed-loop threads send many more
        assert row["n_idle"] < 300, row["n_idle"]
        assert row["swap_us"] < 10_000
    assert result["floors"] and result["engine"]
    assert result["config"]["device"] == "cpu" and all(r["host_to_device"] is None for r in result["rows"])
    assert "partial" not in result  # the finished run wrote over the partial results of each row


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where torch sees no GPU")
def test_bench_refit_on_cuda_without_a_gpu_says_so_before_starting_anything(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_refit.py"), "--device", "cuda",
                           "--json", str(tmp_path / "x.json")], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "torch sees no CUDA GPU" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "x.json").exists()


def test_the_gpu_rows_script_parses_and_gives_bench_refit_only_options_it_knows() -> None:
    script = ROOT / "scripts" / "gpu_rows.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    command = script.read_text().replace("\\\n", " ").split("scripts/bench_refit.py", 1)[1].split("2>&1")[0]
    given = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", command))
    assert {"--device", "--host-to-device", "--sizes-mib", "--replicas", "--json"} <= given, given
    helptext = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_refit.py"), "--help"], cwd=ROOT,
                              capture_output=True, text=True, timeout=120).stdout
    known = set(re.findall(r"--[a-z][a-z-]*", helptext))
    assert given <= known, given - known


@pytest.mark.slow
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch sees none)")
@pytest.mark.timeout(600)
def test_bench_refit_on_cuda_measures_the_stage_against_pinned_host_to_device(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    _run_script("bench_refit.py", "--device", "cuda", "--sizes-mib", "16", "--replicas", "2", "--refits", "2",
                "--warm", "2", "--settled", "1", "--warmup", "1", "--idle-s", "1",
                "--host-to-device", "pinned", "pageable", "--json", str(out),
                "--workdir", str(tmp_path / "work"))
    result = json.loads(out.read_text())
    floors = next(iter(result["floors"].values()))
    assert floors["h2d_pinned_gbps"] > 0 and floors["card"]
    assert sorted(r["host_to_device"] for r in result["rows"]) == ["pageable", "pinned"]
    for row in result["rows"]:
        assert row["device"] == "cuda" and row["stage_over_pinned_h2d"] > 0
        assert row["failed"] == 0 and row["torn"] == 0 and row["mixed"] == 0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_bench_engine_call_measures_a_call_and_a_refit_of_each_model(tmp_path: Path) -> None:
    out = tmp_path / "call.json"
    _run_script("bench_engine_call.py", "--calls", "20", "--rounds", "2", "--refits", "2", "--json", str(out))
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"conv", "8xLinear256"}
    assert all(r["infer_us"] > 0 and r["refit_now_ms"] > 0 and len(r["infer_us_rounds"]) == 2
               for r in results.values())


def test_bench_history_synthesises_a_log_the_fleet_recovers_from_and_compacts(tmp_path: Path) -> None:
    out = tmp_path / "history.json"
    _run_script("bench_history.py", "--versions", "15", "60", "--refits", "3", "--history-window", "10",
                "--json", str(out))
    rows = {r["versions"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {15, 60}
    for n, row in rows.items():
        assert row["restart_s"] > 0 and row["catch_up_s"] > 0 and len(row["refit_s"]) == 3
        assert row["log_records"] + row["archived_records"] >= 3 * n  # nothing synthesised was lost
        assert row["history_rows"] <= 10 + 10 + 3  # the window, the slack before compaction, new refits
    assert rows[60]["archived_records"] > rows[15]["archived_records"]
    assert rows[60]["log_bytes_after"] < 2 * rows[15]["log_bytes_after"]  # bounded, not 4x


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_bench_serving_measures_both_modes_idle_and_during_refits_without_failures(tmp_path: Path) -> None:
    """The fleet's rows only: the Ray Serve baseline needs the bench extra (ray[serve])."""
    out = tmp_path / "serving.json"
    _run_script("bench_serving.py", "--no-serve", "--clients", "2", "--seconds", "0.5", "--out", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert {(r["batching"], r["load"]) for r in rows} == {(False, "idle"), (False, "refits"), (True, "idle"),
                                                         (True, "refits")}
    for row in rows:
        assert row["errors"] == 0 and row["requests"] > 0 and row["p99_ms"] >= row["p50_ms"] > 0
        assert row["load"] == "idle" or row["refits"] > 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_launch_times_each_step_of_a_launch_from_a_fresh_command_and_the_first_refit(
        tmp_path: Path) -> None:
    out = tmp_path / "launch.json"
    _run_script("bench_launch.py", "--reps", "1", "--first-refit", "disk", "--json", str(out))
    result = json.loads(out.read_text())
    (run,) = result["runs"]["this"]
    steps = ("imports_s", "ray_s", "replicas_start_s", "replicas_join_s", "first_response_s")
    assert all(run[k] > 0 for k in steps), run
    assert run["total_s"] >= sum(run[k] for k in steps)
    assert result["medians"]["this"]["total_s"] == run["total_s"]
    # under durability: disk the refit returns once its checkpoint is written
    assert 0 < run["first_refit_s"] <= run["first_checkpoint_s"]
    # the checkpoint writer wrote it without torch (persist_worker_torch: libtorch mapped or not)
    assert run["persist_worker_torch"] == 0.0 and run["persist_worker_rss_anon_kib"] > 0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_bench_background_load_measures_serving_beside_each_load_between_idle_windows(tmp_path: Path) -> None:
    out = tmp_path / "background.json"
    chosen = ["copy, SCHED_IDLE, pinned", "cached copy, nice 19", "copy, nice 19, duty 0.25"]
    _run_script("bench_background_load.py", "--window-s", "0.4", "--loads", *chosen, "--json", str(out))
    result = json.loads(out.read_text())
    loads = [w["load"] for w in result["windows"]]
    assert loads == ["idle", chosen[0], "idle", chosen[1], "idle", chosen[2], "idle"]
    for w in result["windows"]:
        assert w["n"] > 0 and 0 < w["p50_ms"] <= w["p99_ms"] <= w["max_ms"], w
        assert w["p99_over_idle"] > 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_control_channel_times_a_fan_out_round_through_each_transport(tmp_path: Path) -> None:
    out = tmp_path / "control.json"
    _run_script("bench_control_channel.py", "--rounds", "20", "--sittings", "1", "--faults",
                "--json", str(out))
    result = json.loads(out.read_text())
    (sitting,) = result["sittings"]
    assert all(sitting[mode]["median_ms"] > 0 for mode in ("tasks", "compiled", "socket", "channel"))
    assert sitting["tasks"]["p90_ms"] >= sitting["tasks"]["median_ms"]
    assert len(result["faults"]) == 6  # each outcome reported, whatever this Ray makes of it
    assert result["faults"]["the_members_answer_tasks_meanwhile"] == "True"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_publish_times_the_publication_against_its_put_and_checks_alone(tmp_path: Path) -> None:
    out = tmp_path / "publish.json"
    _run_script("bench_publish.py", "--sizes-mib", "8", "--buckets-mib", "4", "2", "--reps", "2",
                "--json", str(out))
    (row,) = json.loads(out.read_text())["rows"]
    assert row["model_bytes"] == 8 << 20 and row["copy_s"] > 0
    assert [(p["bucket_mib"], p["buckets"]) for p in row["publish"]] == [(4, 2), (2, 4)]
    for p in row["publish"]:
        assert p["put_s"] > 0 and p["checks_s"] > 0 and p["publish_s"] > 0 and p["overlap_gain"] > 0, p
        assert p["publish_put_wait_s"] > 0 and p["put_over_copy"] == pytest.approx(p["put_s"] / row["copy_s"])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_passes_times_each_pass_of_a_swap_refit_alone_against_the_floor(tmp_path: Path) -> None:
    out = tmp_path / "passes.json"
    _run_script("bench_passes.py", "--sizes-mib", "8", "--replicas", "2", "--bucket-mib", "4", "--reps", "2",
                "--json", str(out))
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["model_bytes"], row["replicas"], row["buckets"]) == (8 << 20, 2, 2)
    assert row["replica_copies_match"], "a replica's buffers do not hold the stored version"
    parts = ["copy_s", "put_one_array_s", "put_one_object_s", "put_buckets_s", "checks_s",
             "replica_copy_alone_s", "replica_copies_s"]
    assert all(row[k] > 0 for k in parts), row
    assert row["passes_s"] == pytest.approx(row["put_buckets_s"] + row["checks_s"] + row["replica_copies_s"])
    assert row["bound_over_floor"] == pytest.approx(row["bound_s"] / row["floor_s"])
