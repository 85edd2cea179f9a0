"""Run in a subprocess by tests/test_placement_cluster.py: a 3-node fleet whose state is in object
storage (moto's S3 server on 127.0.0.1), with no directory shared between its parts.

Head (3 CPUs) and two worker nodes (2 CPUs each), 3 CPU replicas spread over them, the
coordinator on worker 1 (``coordinator_resources``: the head's seat is taken until step 2).
The coordinator's log lives in a working directory per node, restored from and mirrored to S3;
checkpoints are in S3; replicas never read either but the store as a last resort.

1. A refit, then worker 2 removed while one of its replicas is held in PREPARE: the refit commits
   among the survivors (commit policy ``exclude``), the lost replica restarts on another node and
   catches up from a live peer.
2. Worker 1 removed, with the coordinator and a replica on it: the coordinator restarts on the head,
   whose working directory has never held this fleet's log, and recovers from S3; the replica
   restarts on the head and catches up from a peer; then another refit.

Clients send requests throughout. Prints one JSON object.
"""

from __future__ import annotations

import json
import sys
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any

import ray
from ray.cluster_utils import Cluster

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fleet_models import (  # noqa: E402
    ClientLoad,
    build_probe_engine,
    converged,
    fleet_config,
    probe_input,
    probe_value,
    probe_weights,
    wait_for,
)
from s3_server import S3Server  # noqa: E402

from cluster import Fleet  # noqa: E402
from cluster.placement import CONNECT_RETRY  # noqa: E402


@ray.remote(num_cpus=0)
class Seat:
    def ready(self) -> bool:
        return True


SYSTEM = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
          "health_check_timeout_ms": 500, "health_check_failure_threshold": 3, **CONNECT_RETRY}


def _rows(fleet: Fleet) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in fleet.status()["replicas"]}


def _all_back(fleet: Fleet, version: int, count: int) -> dict[str, dict[str, Any]] | None:
    rows = _rows(fleet)
    ok = len(rows) == count and all(r.get("membership") == "member" and r.get("healthy")
                                    and r.get("version") == version for r in rows.values())
    return rows if ok else None


def main() -> None:
    s3 = S3Server()
    try:
        run(s3)
    finally:
        s3.stop()


def run(s3: S3Server) -> None:
    tmp = Path(tempfile.mkdtemp())
    cluster_ = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 3, "object_store_memory": 128 << 20, "_system_config": SYSTEM,
        "resources": {"coordinator": 1}})
    w1 = cluster_.add_node(num_cpus=2, object_store_memory=128 << 20, resources={"coordinator": 1})
    w2 = cluster_.add_node(num_cpus=2, object_store_memory=128 << 20)
    cluster_.wait_for_nodes()
    ray.init(address=cluster_.address, log_to_driver=False)
    head_seat = Seat.options(resources={"coordinator": 1}).remote()  # the head's seat is taken for now
    ray.get(head_seat.ready.remote())
    engine = tmp / "probe.engine"
    build_probe_engine(engine)
    state = s3.bucket(f"fleet-{uuid.uuid4().hex[:8]}") + "/state"
    cfg = fleet_config(engine, tmp, replicas=3, address=cluster_.address, commit_policy="exclude",
                       max_exclude=2, state_dir=state, state_options=s3.options,
                       placement={"strategy": "SPREAD"}, coordinator_resources={"coordinator": 1},
                       timeouts={"prepare_s": 6, "commit_s": 4, "activate_s": 4, "request_s": 20,
                                 "lease_s": 2, "launch_s": 90})
    out: dict[str, Any] = {}
    fleet = Fleet.launch(cfg)
    fleet.refit(probe_weights(1.0))
    coord_node = ray.get(fleet._coord.node_id.remote())
    out["coordinator_on_worker_1"] = coord_node == w1.node_id
    out["keys"] = len(s3.keys(state[5:].split("/")[0], "state/"))
    with ClientLoad(fleet) as load:
        # 1. worker 2 removed mid-refit
        rows = _rows(fleet)
        victim = next((rid for rid, r in rows.items() if r["node"] == w2.node_id), None)
        out["victim_1"] = victim
        handles = ray.get(fleet._coord.member_handles.remote())
        if victim is not None:
            ray.get(handles[victim].arm_failpoint.remote("replica.before_vote", "sleep:30"))
        result: dict[str, Any] = {}
        refit = threading.Thread(target=lambda: result.update(r=fleet.refit(probe_weights(2.0))))
        refit.start()
        wait_for(lambda: fleet.status()["in_flight"] is not None, 30, "the refit to begin")
        cluster_.remove_node(w2)
        refit.join(timeout=120)
        out["v2"] = result["r"].version
        out["excluded_1"] = sorted(result["r"].excluded)
        rows = wait_for(lambda: _all_back(fleet, out["v2"], 3), 120, "every replica back on v2")
        out["victim_1_caught_up_from"] = rows[victim]["caught_up_from"] if victim else None
        # 2. worker 1 removed: the coordinator and a replica on it
        epoch = fleet.status()["epoch"]
        lost = [rid for rid, r in rows.items() if r["node"] == w1.node_id]
        out["victim_2"] = lost
        ray.kill(head_seat)  # the head's seat is free: where the coordinator goes once worker 1 is gone
        cluster_.remove_node(w1)
        seen: dict[str, Any] = {}

        def recovered() -> bool:
            seen.update(fleet.status())
            return seen["epoch"] > epoch and seen["recovery"]["state"] == "ready"

        try:
            wait_for(recovered, 120, "the coordinator recovered on another node")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: epoch {seen.get('epoch')} (was {epoch}), "
                                 f"recovery {seen.get('recovery')}") from None
        out["coordinator_node_after"] = ray.get(fleet._coord.node_id.remote())
        rows = wait_for(lambda: _all_back(fleet, out["v2"], 3), 120, "every replica back after worker 1 went")
        out["victim_2_caught_up_from"] = {rid: rows[rid]["caught_up_from"] for rid in lost}
        out["v3"] = fleet.refit(probe_weights(3.0)).version
        st = converged(fleet)
        out["version_after"] = st["version"]
        out["values"] = sorted({probe_value(fleet.infer(probe_input()).outputs) for _ in range(9)})
        out["history"] = [h["version"] for h in fleet.history() if h.get("status") == "committed"]
    out["client_failures"] = load.failures[:5]
    out["responses"] = sum(len(m) for m in load.responses)
    out["torn_or_backwards"] = ""
    try:
        load.check(min_responses=1)
    except AssertionError as exc:
        out["torn_or_backwards"] = str(exc)
    out["head"] = cluster_.head_node.node_id
    fleet.shutdown()
    print("RESULT " + json.dumps(out))
    ray.shutdown()
    cluster_.shutdown()


if __name__ == "__main__":
    main()
