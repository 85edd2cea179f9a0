"""Faults beyond crashes, at the storage layer, against real actors under client load: a full
disk under the log and under the checkpoint store, I/O and permission errors at their OS calls, a
flipped bit in a checkpoint, a torn log tail and a garbage line in the middle of the log.

Each case ends with every member on one version with equal checksums and no failed client
request, and names its cause where a person looks: the refit's error, ``history``, ``status``, and
(for some) the CLI's one-line error.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
from fleet_models import (
    ClientLoad,
    build_probe_engine,
    converged,
    fleet_config,
    probe_input,
    probe_value,
    probe_weights,
    wait_for,
)
from safetensors.numpy import save_file

from cluster import Fleet, RefitAborted

ROOT = Path(__file__).resolve().parent.parent
TIMEOUTS = {"prepare_s": 4, "commit_s": 4, "activate_s": 4, "request_s": 15, "lease_s": 2,
            "launch_s": 60}
# A BEGIN record carries every tensor's checksum: with this many it is larger than a page, so a
# full filesystem refuses it whatever room the log file's last page has left.
MANY, NARROW = 200, 16


# ----------------------------------------------------------------------------- helpers


def _cli(fleet: Fleet, *args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("weight-refit", path=str(Path(sys.executable).parent))
    assert exe, "the weight-refit command is not installed"
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    return subprocess.run([exe, *args, "--fleet", fleet.name], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=180)


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a size-limited tmpfs needs root and mount(8)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")


def fill(directory: Path) -> Path:
    """Fill the filesystem under ``directory`` with one file, to the last byte it accepts."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        for chunk in (1 << 16, 1):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    return filler


def _flip_bit(path: Path, from_end: int = 3) -> None:
    raw = bytearray(path.read_bytes())
    raw[-from_end] ^= 0x01
    path.write_bytes(bytes(raw))


def _reason_in_history(fleet: Fleet, *words: str) -> dict[str, Any]:
    rows = [h for h in fleet.history() if all(w in (h.get("reason") or "") for w in words)]
    assert rows, [h.get("reason") for h in fleet.history()][-5:]
    return rows[-1]


def _values(fleet: Fleet, inputs: np.ndarray, n: int = 6) -> set[float | None]:
    return {probe_value(fleet.infer(inputs).outputs) for _ in range(n)}


def _handles(fleet: Fleet) -> dict[str, Any]:
    return ray.get(fleet._coord.member_handles.remote())


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def many_engine_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("engines") / "many.engine"
    build_probe_engine(path, weights=MANY, width=NARROW)
    return path


@pytest.fixture
def tmpfs_state(tmp_path: Path) -> Iterator[Path]:
    """A state dir on its own small tmpfs, with ``checkpoints/`` on a second one."""
    state = tmp_path / "state"
    mounted: list[Path] = []
    try:
        _mount_tmpfs(state, "4m")
        mounted.append(state)
        _mount_tmpfs(state / "checkpoints", "4m")
        mounted.append(state / "checkpoints")
        yield state
    finally:
        for point in reversed(mounted):
            subprocess.run(["umount", "-l", str(point)], capture_output=True)


@pytest.fixture
def disk_fleet(request: pytest.FixtureRequest, ray_session: None, many_engine_path: Path,
               tmpfs_state: Path) -> Iterator[Fleet]:
    durability = getattr(request, "param", "replicated")
    cfg = fleet_config(many_engine_path, tmpfs_state.parent, replicas=3, timeouts=TIMEOUTS,
                       state_dir=str(tmpfs_state), durability=durability)
    fleet = Fleet.launch(cfg)
    try:
        first = fleet.refit(probe_weights(1.0, MANY, NARROW))
        assert fleet.wait_persisted(first.version, 60)  # the disk is filled after this
        yield fleet
    finally:
        fleet.shutdown()


@pytest.fixture
def make_fleet(ray_session: None, probe_engine_path: Path, tmp_path: Path) -> Iterator[Any]:
    fleets: list[Fleet] = []

    def make(**over: Any) -> Fleet:
        fleets.append(Fleet.launch(fleet_config(probe_engine_path, tmp_path, replicas=3, timeouts=TIMEOUTS,
                                                **over)))
        first = fleets[-1].refit(probe_weights(1.0))
        assert fleets[-1].wait_persisted(first.version, 60)
        return fleets[-1]

    yield make
    for f in fleets:
        with contextlib.suppress(Exception):
            f.shutdown()


# ----------------------------------------------------------------------------- a full disk


def test_a_full_disk_under_the_log_aborts_the_refit_says_so_and_heals_when_space_is_freed(
        disk_fleet: Fleet, tmpfs_state: Path, tmp_path: Path) -> None:
    fleet = disk_fleet
    inputs = probe_input(NARROW)
    before = fleet.status()["version"]
    weights_file = tmp_path / "twos.safetensors"
    save_file(probe_weights(2.0, MANY, NARROW), str(weights_file))
    with ClientLoad(fleet, inputs=inputs) as load:
        filler = fill(tmpfs_state)
        with pytest.raises(RefitAborted, match="disk full") as info:
            fleet.refit(probe_weights(2.0, MANY, NARROW), key="k-log-full")
        assert "transaction log" in info.value.reason and "ENOSPC" in info.value.reason
        cli = _cli(fleet, "refit", str(weights_file))
        assert cli.returncode == 4  # aborted
        assert "disk full (ENOSPC) writing the transaction log" in _one_line_error(cli)
        assert _reason_in_history(fleet, "disk full", "transaction log")["status"] == "aborted"
        assert fleet.outcome("k-log-full")["status"] == "aborted"
        assert converged(fleet)["version"] == before and _values(fleet, inputs) == {1.0}
        filler.unlink()
        res = fleet.refit(probe_weights(3.0, MANY, NARROW))
        assert converged(fleet)["version"] == res.version > before
        assert _values(fleet, inputs) == {3.0}
    load.check()


@pytest.mark.parametrize("disk_fleet", ["disk"], indirect=True)
def test_a_full_disk_under_the_checkpoint_store_aborts_a_disk_durability_refit_says_so_and_heals(
        disk_fleet: Fleet, tmpfs_state: Path) -> None:
    fleet = disk_fleet
    inputs = probe_input(NARROW)
    before = fleet.status()["version"]
    with ClientLoad(fleet, inputs=inputs) as load:
        filler = fill(tmpfs_state / "checkpoints")
        with pytest.raises(RefitAborted, match="disk full") as info:
            fleet.refit(probe_weights(2.0, MANY, NARROW))
        assert "writing the checkpoint" in info.value.reason
        assert _reason_in_history(fleet, "disk full", "checkpoint")["status"] == "aborted"
        st = converged(fleet)
        assert st["version"] == before and all(r["staged_bytes"] == 0 for r in st["replicas"])
        assert not [p for p in (tmpfs_state / "checkpoints").iterdir() if p.name.endswith(".tmp")]
        filler.unlink()
        res = fleet.refit(probe_weights(3.0, MANY, NARROW))
        assert converged(fleet)["version"] == res.version and _values(fleet, inputs) == {3.0}
    load.check()


def test_a_full_disk_under_the_checkpoint_store_delays_a_replicated_checkpoint_until_space_is_freed(
        disk_fleet: Fleet, tmpfs_state: Path) -> None:
    """Under ``replicated`` the version commits in the members' memory; its checkpoint is written
    once there is room, with no repair (``status`` says why it is not yet)."""
    fleet = disk_fleet
    inputs = probe_input(NARROW)
    with ClientLoad(fleet, inputs=inputs) as load:
        filler = fill(tmpfs_state / "checkpoints")
        res = fleet.refit(probe_weights(2.0, MANY, NARROW))
        assert not res.persisted and _values(fleet, inputs) == {2.0}
        failing = wait_for(lambda: fleet.status()["persistence"]["failing"].get(res.version), 60,
                           "the checkpoint write to fail")
        assert "disk full" in failing and "checkpoint" in failing
        assert not fleet.wait_persisted(res.version, 1.0)
        filler.unlink()
        assert fleet.wait_persisted(res.version, 60)
        assert next(h for h in fleet.history() if h["version"] == res.version)["persisted"] is True
        assert converged(fleet)["version"] == res.version
    load.check()


# ----------------------------------------------------------------------------- OS errors


@pytest.mark.parametrize(("where", "hook", "action", "words"), [
    ("coordinator", "log.write", "oserror:EIO", "I/O error (EIO) writing the transaction log"),
    ("coordinator", "log.fsync", "oserror:EIO@1", "I/O error (EIO) writing the transaction log"),
    ("persist", "store.write", "oserror:EACCES", "permission denied (EACCES) writing the checkpoint"),
    ("persist", "store.fsync", "oserror:EIO", "I/O error (EIO) writing the checkpoint"),
], ids=["log-write-EIO", "log-fsync-EIO", "store-write-EACCES", "store-fsync-EIO"])
def test_an_os_error_under_the_log_or_the_store_aborts_the_refit_naming_it(
        make_fleet: Any, where: str, hook: str, action: str, words: str) -> None:
    fleet = make_fleet(durability="disk")  # (under replicated a failed checkpoint write is redone later)
    target = fleet._coord if where == "coordinator" else ray.get(fleet._coord.persist_worker.remote())
    before = fleet.status()["version"]
    with ClientLoad(fleet) as load:
        ray.get(target.arm_failpoint.remote(hook, action))
        with pytest.raises(RefitAborted) as info:
            fleet.refit(probe_weights(2.0), key=f"k-{hook}")
        assert words in info.value.reason
        ray.get(target.arm_failpoint.remote(hook, None))
        assert words in (fleet.outcome(f"k-{hook}")["reason"] or "")
        assert _reason_in_history(fleet, words)["status"] == "aborted"
        assert converged(fleet)["version"] == before and {probe_value(fleet.infer(probe_input()).outputs)
                                                          for _ in range(4)} == {1.0}
        res = fleet.refit(probe_weights(3.0))
        assert converged(fleet)["version"] == res.version
    load.check()


# ----------------------------------------------------------------------------- corruption


def test_a_flipped_bit_in_a_stored_version_is_named_and_a_rollback_to_it_changes_nothing(
        make_fleet: Any) -> None:
    fleet = make_fleet()
    old = fleet.refit(probe_weights(2.0)).version
    fleet.refit(probe_weights(3.0))
    current = fleet.refit(probe_weights(4.0)).version
    assert fleet.wait_persisted(old, 60)
    store = Path(fleet._cfg["state_dir"]) / "checkpoints"
    _flip_bit(store / f"v{old}.safetensors")
    with ClientLoad(fleet) as load:
        with pytest.raises(RefitAborted, match="ChecksumMismatch") as info:
            fleet.rollback(to=old)
        assert f"v{old}" in info.value.reason and "w." in info.value.reason
        assert _reason_in_history(fleet, "ChecksumMismatch")["status"] == "aborted"
        assert converged(fleet)["version"] == current
        assert {probe_value(fleet.infer(probe_input()).outputs) for _ in range(4)} == {4.0}
    load.check()


def test_a_replica_restarting_onto_a_corrupted_checkpoint_serves_nothing_until_a_good_version(
        make_fleet: Any) -> None:
    fleet = make_fleet()
    active = fleet.refit(probe_weights(2.0)).version
    assert fleet.wait_persisted(active, 60)  # replicated: the checkpoint follows the refit
    _flip_bit(Path(fleet._cfg["state_dir"]) / "checkpoints" / f"v{active}.safetensors")
    handles = _handles(fleet)
    r2 = handles["r2"]
    for peer in ("r0", "r1"):  # no peer gives it the version: the store is its only source
        ray.get(handles[peer].arm_failpoint.remote("replica.export", "raise"))
    with ClientLoad(fleet) as load:
        ray.kill(r2, no_restart=False)

        def excluded() -> dict[str, Any] | None:
            rows = {r["id"]: r for r in fleet.status()["replicas"]}
            return rows.get("r2") if rows.get("r2", {}).get("membership") == "excluded" else None

        row = wait_for(excluded, 60, "r2 excluded after failing to load its weights")
        assert "ChecksumMismatch" in row["excluded_reason"] and "ChecksumMismatch" in row["error"]
        answers: list[dict[str, Any]] = []

        def failed_answer() -> dict[str, Any] | None:
            # the repair loop retries the catch-up each round (a peer may come back): between two
            # tries the replica is failed, during one it is catching up; it serves nothing in both
            answers.append(ray.get(r2.infer.remote([probe_input()], 0), timeout=30))
            return answers[-1] if answers[-1]["reason"].startswith("failed: ChecksumMismatch") else None

        wait_for(failed_answer, 60, "r2 to answer that it failed, naming the checksum")
        assert all(a["stale"] for a in answers), answers
        assert {a["reason"].split(":")[0] for a in answers} <= {"failed", "catching_up"}, answers
        for peer in ("r0", "r1"):
            ray.get(handles[peer].arm_failpoint.remote("replica.export", None))
        res = fleet.refit(probe_weights(3.0))  # a full set: commits among the others
        assert set(res.replicas) == {"r0", "r1"}
        wait_for(lambda: "r2" in _handles(fleet), 60, "r2 re-admitted at the new version")
        assert converged(fleet)["version"] == res.version
        assert {probe_value(fleet.infer(probe_input()).outputs) for _ in range(6)} == {3.0}
    load.check()


def _log(fleet: Fleet) -> Path:
    return Path(fleet._cfg["state_dir"]) / "txn.log"


def _restart_coordinator(fleet: Fleet) -> int:
    epoch = fleet.status()["epoch"]
    ray.kill(fleet._coord, no_restart=False)
    return epoch


def test_a_torn_log_tail_is_cut_named_and_its_transaction_finished_again(make_fleet: Any) -> None:
    fleet = make_fleet(durability="disk")  # ACTIVATED is the last record (no PERSISTED follows)
    res = fleet.refit(probe_weights(2.0), key="k-torn")
    log = _log(fleet)
    lines = log.read_bytes().splitlines(keepends=True)
    assert b'"ACTIVATED"' in lines[-1]
    with ClientLoad(fleet) as load:
        with open(log, "r+b") as f:
            f.truncate(log.stat().st_size - 10)  # the ACTIVATED record, torn
        epoch = _restart_coordinator(fleet)
        st = wait_for(lambda: (s := fleet.status())["epoch"] == epoch + 1
                      and s["recovery"]["state"] == "ready" and s, 60, "the coordinator's recovery")
        assert any(f"line={len(lines)}" in cut for cut in st["log"]["cut_tails"]), st["log"]
        out = fleet.outcome("k-torn")
        assert out["status"] == "committed" and out["activated"]
        assert converged(fleet)["version"] == res.version
        assert fleet.refit(probe_weights(3.0)).version > res.version
    load.check()


def test_a_garbage_line_in_the_log_stops_refits_naming_the_line_while_the_fleet_serves_on(
        make_fleet: Any) -> None:
    fleet = make_fleet()
    version = fleet.refit(probe_weights(2.0)).version
    log = _log(fleet)
    good = log.read_bytes()
    lines = good.splitlines(keepends=True)
    bad_line = 3
    with ClientLoad(fleet) as load:
        log.write_bytes(b"".join([*lines[:bad_line - 1], b"not a record\n", *lines[bad_line - 1:]]))
        epoch = _restart_coordinator(fleet)
        st = wait_for(lambda: (s := fleet.status())["recovery"]["state"] == "failed" and s, 60,
                      "recovery to fail")
        assert f"txn.log:{bad_line}" in st["recovery"]["error"], st["recovery"]
        with pytest.raises(RefitAborted, match=f"txn.log:{bad_line}"):
            fleet.refit(probe_weights(9.0))
        cli = _cli(fleet, "rollback")
        assert cli.returncode == 4 and f"txn.log:{bad_line}" in _one_line_error(cli)
        assert {probe_value(fleet.infer(probe_input()).outputs) for _ in range(6)} == {2.0}
        log.write_bytes(good)  # the operator repairs the file; the next attempt succeeds
        wait_for(lambda: fleet.status()["recovery"]["state"] == "ready", 60, "recovery after the repair")
        assert fleet.status()["epoch"] > epoch
        res = fleet.refit(probe_weights(3.0))
        assert res.version > version and converged(fleet)["version"] == res.version
    load.check()
