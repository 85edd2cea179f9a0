"""A fleet's state on object storage (issue 15): the checkpoint store and the log on an
``s3://`` URL, against a real S3-compatible server (moto's, on 127.0.0.1; not AWS), and on
``file://``. Versions appear whole or not at all; the log's copy in object storage is fenced by
exclusive creates, so a coordinator that should be dead cannot write where the live one reads."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import torch
from fleet_models import (
    ClientLoad,
    converged,
    fleet_config,
    probe_input,
    probe_value,
    probe_weights,
    wait_for,
)
from s3_server import S3Server

from actors.failpoints import Failpoints
from actors.log import LOG_NAME, AbortRecord, EpochRecord, TxnLog, replay
from actors.log_mirror import LogFenced, LogMirror
from actors.object_state import (
    ObjectCheckpointStore,
    checkpoint_store,
    drop_kept,
    is_url,
    kept,
    local_copy,
    local_dir,
)
from actors.store import CheckpointCorrupted, CheckpointMissing
from engines.checksum import ChecksumMismatch, checksums


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    server = S3Server()
    yield server
    server.stop()


@pytest.fixture
def url(s3: S3Server) -> str:
    return s3.bucket(f"b{uuid.uuid4().hex[:12]}")


def _set(value: float) -> dict[str, torch.Tensor]:
    return {n: torch.from_numpy(a) for n, a in probe_weights(value).items()}


# ----------------------------------------------------------------------------- the checkpoint store


@pytest.mark.parametrize("where", ["s3", "file"])
def test_a_version_in_object_storage_is_whole_or_absent_and_verified_on_load(
        where: str, s3: S3Server, tmp_path: Path) -> None:
    state = s3.bucket(f"b{uuid.uuid4().hex[:12]}") + "/fleet" if where == "s3" else f"file://{tmp_path}/st"
    store = checkpoint_store(state, s3.options if where == "s3" else {})
    assert isinstance(store, ObjectCheckpointStore) and is_url(state)
    store.save(1, _set(2.0), checksums(_set(2.0)))
    assert store.versions() == [1] and store.has(1)
    assert torch.equal(store.load(1)["w.0"], _set(2.0)["w.0"])
    fp = Failpoints(owner="t")
    failing = checkpoint_store(state, s3.options if where == "s3" else {}, fp=fp)
    fp.arm("store.write", "oserror:EIO")
    with pytest.raises(OSError, match="v2.safetensors"):
        failing.save(2, _set(3.0), checksums(_set(3.0)))
    assert store.versions() == [1] and not store.has(2)  # nothing of v2 stays
    with pytest.raises(CheckpointMissing):
        store.load(2)
    store.save(3, _set(4.0), checksums(_set(4.0)))
    assert store.retain({3}) == [1] and store.versions() == [3]


def test_a_flipped_bit_or_a_truncated_object_in_s3_is_named_on_load(url: str, s3: S3Server) -> None:
    store = checkpoint_store(url + "/fleet", s3.options)
    store.save(4, _set(1.0), checksums(_set(1.0)))
    key = "fleet/checkpoints/v4.safetensors"
    data = bytearray(s3.client().get_object(Bucket=url[5:], Key=key)["Body"].read())
    data[-1] ^= 0x01
    s3.client().put_object(Bucket=url[5:], Key=key, Body=bytes(data))
    with pytest.raises(ChecksumMismatch, match="v4"):
        store.load(4)
    s3.client().put_object(Bucket=url[5:], Key=key, Body=bytes(data[:-8]))
    with pytest.raises(CheckpointCorrupted, match="truncated"):
        store.load(4)
    s3.client().delete_object(Bucket=url[5:], Key="fleet/checkpoints/v4.json")
    assert store.versions() == []  # data without its manifest is not a version


# ----------------------------------------------------------------------------- the log's copy


def _log(path: Path, mirror: LogMirror) -> TxnLog:
    restored = mirror.restore(path / LOG_NAME)
    log = TxnLog.open(path)
    mirror.start(restored)
    log.mirror = mirror
    return log


def test_the_log_comes_back_from_object_storage_byte_for_byte(url: str, s3: S3Server, tmp_path: Path) -> None:
    log = _log(tmp_path / "a", LogMirror(url + "/log", s3.options))
    log.bump_epoch()
    log.append(AbortRecord(epoch=1, txn="t1", reason="test"))
    log.close()
    again = _log(tmp_path / "b", LogMirror(url + "/log", s3.options))  # another node: nothing local
    assert (tmp_path / "b" / LOG_NAME).read_bytes() == (tmp_path / "a" / LOG_NAME).read_bytes()
    assert again.bump_epoch() == 2
    assert [type(r).__name__ for r in again.records()] == ["EpochRecord", "AbortRecord", "EpochRecord"]


def test_a_coordinator_still_writing_after_its_successor_started_is_fenced(url: str, s3: S3Server,
                                                                           tmp_path: Path) -> None:
    old = _log(tmp_path / "old", LogMirror(url + "/log", s3.options))
    old.bump_epoch()
    new = _log(tmp_path / "new", LogMirror(url + "/log", s3.options))  # seals the old generation
    new.bump_epoch()
    size = (tmp_path / "old" / LOG_NAME).stat().st_size
    with pytest.raises(LogFenced, match="another coordinator"):
        old.append(AbortRecord(epoch=1, txn="t9", reason="late"))
    assert (tmp_path / "old" / LOG_NAME).stat().st_size == size  # the record was cut back locally
    survivor = _log(tmp_path / "third", LogMirror(url + "/log", s3.options))
    records = survivor.records()
    assert all(getattr(r, "txn", None) != "t9" for r in records)
    assert max(r.epoch for r in records if isinstance(r, EpochRecord)) == 2
    assert replay(records).epoch == 2


def test_a_compacted_log_is_a_new_generation_and_the_old_ones_go(url: str, s3: S3Server,
                                                                   tmp_path: Path) -> None:
    mirror = LogMirror(url + "/log", s3.options)
    log = _log(tmp_path / "a", mirror)
    log.bump_epoch()
    for i in range(3):
        log.append(AbortRecord(epoch=1, txn=f"t{i}", reason="x"))
    log.rewrite([EpochRecord(epoch=1), AbortRecord(epoch=1, txn="t2", reason="x")])
    log.append(AbortRecord(epoch=1, txn="t3", reason="x"))
    keys = s3.keys(url[5:], "log/")
    older = [k for k in keys if not k.startswith(f"log/g{mirror.generation:08d}/")]
    assert len(older) == 1 and s3.client().get_object(Bucket=url[5:], Key=older[0])["ContentLength"] == 0
    # of the generation before the compaction only its seal stays
    again = _log(tmp_path / "b", LogMirror(url + "/log", s3.options))
    assert [getattr(r, "txn", None) for r in again.records()] == [None, "t2", "t3"]


def test_a_failed_upload_fails_the_durable_append_and_keeps_nothing_locally(tmp_path: Path) -> None:
    mirror = LogMirror(f"file://{tmp_path}/remote/log")
    log = _log(tmp_path / "local", mirror)
    log.bump_epoch()
    size = (tmp_path / "local" / LOG_NAME).stat().st_size
    shutil.rmtree(tmp_path / "remote")
    (tmp_path / "remote").write_bytes(b"")  # the "bucket" is gone: uploads fail
    with pytest.raises(OSError):
        log.append(AbortRecord(epoch=1, txn="t1", reason="x"))
    assert (tmp_path / "local" / LOG_NAME).stat().st_size == size


def test_a_bad_url_or_unreachable_store_is_refused_at_launch_naming_it(tmp_path: Path) -> None:
    from cluster.launch import check_state_dir

    with pytest.raises(ValueError, match="state_dir 'nosuch://x'"):
        check_state_dir("nosuch://x")
    with pytest.raises(ValueError, match="state_dir 's3://bucket/p' cannot be used"):
        check_state_dir("s3://bucket/p", {"key": "k", "secret": "s",
                                          "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"},
                                          "config_kwargs": {"connect_timeout": 1,
                                                            "retries": {"max_attempts": 1}}})


# ----------------------------------------------------------------------------- a fleet on S3


def test_a_fleet_on_s3_refits_and_its_restarted_coordinator_recovers_from_object_storage(
        ray_session: None, probe_engine_path: Path, tmp_path: Path, url: str, s3: S3Server) -> None:
    from cluster import Fleet

    state = url + "/fleets/one"
    cfg = fleet_config(probe_engine_path, tmp_path, replicas=2, state_dir=state, state_options=s3.options,
                       durability="disk", timeouts={"request_s": 20, "launch_s": 60, "lease_s": 2})
    fleet = Fleet.launch(cfg)
    try:
        v1 = fleet.refit(probe_weights(1.0)).version
        keys = s3.keys(url[5:], "fleets/one/")
        assert "fleets/one/checkpoints/v1.json" in keys and "fleets/one/checkpoints/v0.json" in keys
        assert any(k.startswith("fleets/one/log/g") for k in keys)
        node = ray.get(fleet._coord.node_id.remote())
        work = local_dir(cfg.name, state, node)
        assert (work / LOG_NAME).exists()
        with ClientLoad(fleet, clients=2) as load:
            epoch = fleet.status()["epoch"]
            ray.kill(fleet._coord, no_restart=False)
            shutil.rmtree(work)  # its working copy is gone: only object storage can bring it back
            wait_for(lambda: fleet.status()["epoch"] == epoch + 1 and fleet.status()["recovery"]["state"]
                     == "ready", 90, "the coordinator recovered")
            v2 = fleet.refit(probe_weights(2.0)).version
        load.check(min_responses=1)
        assert v2 == v1 + 1 and converged(fleet)["version"] == v2
        assert [h["version"] for h in fleet.history()][-2:] == [v1, v2]
        assert probe_value(fleet.infer(probe_input()).outputs) == 2.0
    finally:
        fleet.shutdown()


def test_the_config_keeps_a_url_state_dir_as_it_is_and_refuses_options_for_a_path(
        probe_engine_path: Path, tmp_path: Path) -> None:
    from pydantic import ValidationError

    cfg: Any = fleet_config(probe_engine_path, tmp_path, state_dir="s3://bucket/prefix/",
                            state_options={"anon": False})
    assert cfg.state_dir == "s3://bucket/prefix" and cfg.state_options == {"anon": False}
    with pytest.raises(ValidationError, match="state_options apply to an object-storage state_dir"):
        fleet_config(probe_engine_path, tmp_path, state_options={"anon": False})


def test_a_file_kept_in_s3_comes_back_on_a_node_that_never_had_it(url: str, s3: S3Server,
                                                                   tmp_path: Path) -> None:
    made = tmp_path / "node-a" / "v3.probes.safetensors"
    made.parent.mkdir()
    made.write_bytes(b"probes")
    where = kept(made, url + "/canary", s3.options)
    assert where == url + "/canary/v3.probes.safetensors"
    back = local_copy(where, tmp_path / "node-b", s3.options)
    assert back.read_bytes() == b"probes" and back.parent == tmp_path / "node-b"
    assert kept(made, None) == str(made) and local_copy(str(made), tmp_path / "x") == made


def test_files_kept_in_s3_are_dropped_there_and_locally_and_the_others_stay(url: str, s3: S3Server,
                                                                            tmp_path: Path) -> None:
    node = tmp_path / "node-a"
    node.mkdir()
    for name in ("v3.probes.safetensors", "v4.probes.safetensors", "notes.txt"):
        (node / name).write_bytes(b"x")
        kept(node / name, url + "/canary", s3.options)
    dropped = drop_kept(node, url + "/canary", "v*.probes.safetensors", s3.options)
    assert dropped == ["v3.probes.safetensors", "v4.probes.safetensors"]
    assert [p.name for p in node.iterdir()] == ["notes.txt"]
    assert s3.keys(url[len("s3://"):]) == ["canary/notes.txt"]
    assert drop_kept(tmp_path / "never-made", None, "v*.probes.safetensors") == []


def test_launch_fresh_removes_a_url_state(tmp_path: Path) -> None:
    from cluster.cli import _remove_state

    store = checkpoint_store(f"file://{tmp_path}/st")
    store.save(1, _set(1.0), checksums(_set(1.0)))
    _remove_state(f"file://{tmp_path}/st", {})
    assert not (tmp_path / "st").exists()
