"""Placement on a simulated multi-node cluster (subprocess: one process attaches to one Ray)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run_check(script: str) -> dict:
    """Run one cluster check in its own process; return the JSON it prints after ``RESULT``."""
    proc = subprocess.run([sys.executable, str(ROOT / "tests/cluster_checks" / script)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def observed() -> dict:
    return _run_check("mlu_placement.py")


def test_one_replica_per_card_and_indexes_unique_per_node(observed: dict) -> None:
    assert observed["replicas"] == 6
    assert len(observed["indexes_per_node"]) == 3, "replicas were not spread over the 3 nodes"
    for indexes in observed["indexes_per_node"].values():
        assert indexes == [0, 1]
    assert observed["card_field"] == [0, 0, 0, 1, 1, 1]


def test_refit_across_nodes_and_one_copy_per_node(observed: dict) -> None:
    assert observed["status"] == "committed"
    assert observed["values"] == [5.0]
    copies = observed["copies_per_node"]
    assert set(observed["replica_nodes"]) <= set(copies)
    assert all(n == 1 for n in copies.values())  # each node holds one copy, whatever its replica count


def test_more_replicas_than_cards_is_refused(observed: dict) -> None:
    assert "impossible placement" in observed["impossible"]


@pytest.fixture(scope="module")
def node_removed() -> dict:
    return _run_check("node_removal.py")


def test_node_removed_mid_refit_commits_among_survivors(node_removed: dict) -> None:
    # the replica held in PREPARE is excluded; another replica of the lost node may instead have
    # voted before the loss, restarted elsewhere and caught up from the store in time
    assert node_removed["victims"][0] in node_removed["excluded"]
    assert set(node_removed["excluded"]) <= set(node_removed["victims"])
    assert node_removed["version_after"] == node_removed["committed_version"]


def test_node_removed_replicas_come_back_and_no_request_failed(node_removed: dict) -> None:
    assert node_removed["members_after"] == node_removed["replicas_before"]
    assert node_removed["values"] == [2.0]
    assert node_removed["client_failures"] == []
    # the clients kept being answered; how often depends on how long the lost replicas take to
    # restart elsewhere (requests sent to a restarting replica wait for it, up to one attempt)
    assert node_removed["torn_or_backwards"] == "" and node_removed["responses"] > 0
    # they came back from a surviving peer, not the checkpoint store (issue 15)
    for rid, caught in node_removed["victims_caught_up_from"].items():
        assert (caught["source"], caught["version"]) == ("peer", node_removed["version_after"]), (rid, caught)


@pytest.fixture(scope="module")
def on_object_storage() -> dict:
    return _run_check("object_state.py")


def test_a_fleet_with_its_state_in_s3_loses_a_node_mid_refit_and_commits_among_survivors(
        on_object_storage: dict) -> None:
    seen = on_object_storage
    assert seen["coordinator_on_worker_1"] and seen["keys"] > 0
    assert seen["victim_1"] is not None and seen["victim_1"] in seen["excluded_1"]
    caught = seen["victim_1_caught_up_from"]
    assert (caught["source"], caught["version"]) == ("peer", seen["v2"]), caught


def test_a_coordinator_restarted_on_another_node_recovers_its_log_from_s3(on_object_storage: dict) -> None:
    seen = on_object_storage
    assert seen["coordinator_node_after"] == seen["head"]  # worker 1 is gone; its directory with it
    assert seen["victim_2"], "worker 1 held no replica"
    for rid, caught in seen["victim_2_caught_up_from"].items():
        assert (caught["source"], caught["version"]) == ("peer", seen["v2"]), (rid, caught)
    assert seen["v3"] == seen["v2"] + 1 and seen["version_after"] == seen["v3"] and seen["values"] == [3.0]
    assert seen["history"][-2:] == [seen["v2"], seen["v3"]]
    assert seen["client_failures"] == [] and seen["torn_or_backwards"] == "" and seen["responses"] > 0
