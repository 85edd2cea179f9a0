"""Run in a subprocess by tests/test_placement_cluster.py: a node removed in the middle of a refit.

Two worker nodes with two replicas each (commit policy ``exclude``, up to 2). One replica on the
doomed node is held in PREPARE by a failpoint, so the node's removal lands mid-refit. The refit
commits among the survivors, the lost replicas restart on the remaining node, catch up from their
surviving peers (checksums verified) and are re-admitted; clients never see a failed request.
Prints one JSON object.
"""

from __future__ import annotations

import json
import sys
import tempfile
import threading
from pathlib import Path

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

from cluster import Fleet  # noqa: E402
from cluster.placement import CONNECT_RETRY  # noqa: E402

SYSTEM = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
          "health_check_timeout_ms": 500, "health_check_failure_threshold": 3, **CONNECT_RETRY}


def main() -> None:
    tmp = Path(tempfile.mkdtemp())
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "object_store_memory": 128 << 20, "_system_config": SYSTEM})
    nodes = [cluster.add_node(num_cpus=2, object_store_memory=128 << 20) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    engine = tmp / "probe.engine"
    build_probe_engine(engine)
    cfg = fleet_config(engine, tmp, replicas=4, address=cluster.address, commit_policy="exclude",
                       max_exclude=3, timeouts={"prepare_s": 6, "commit_s": 4, "activate_s": 4,
                                              "request_s": 20, "lease_s": 2, "launch_s": 90})
    fleet = Fleet.launch(cfg)
    fleet.refit(probe_weights(1.0))
    st = fleet.status()
    node_ids = {n.node_id: n for n in nodes}
    coord_node = ray.get(fleet._coord.node_id.remote())
    # the node to lose hosts replicas but not the coordinator (its own crash is tested elsewhere)
    victim_node = next(r["node"] for r in st["replicas"] if r["node"] in node_ids and r["node"] != coord_node)
    victims = [r["id"] for r in st["replicas"] if r["node"] == victim_node]
    handles = ray.get(fleet._coord.member_handles.remote())
    ray.get(handles[victims[0]].arm_failpoint.remote("replica.before_vote", "sleep:30"))
    out: dict = {"victims": victims, "replicas_before": len(st["replicas"]),
                 "coordinator_on_head": coord_node == cluster.head_node.node_id}
    with ClientLoad(fleet) as load:
        result: dict = {}
        refit = threading.Thread(target=lambda: result.update(r=fleet.refit(probe_weights(2.0))))
        refit.start()
        wait_for(lambda: fleet.status()["in_flight"] is not None, 30, "the refit to begin")
        cluster.remove_node(node_ids[victim_node])
        refit.join(timeout=120)
        res = result["r"]
        out["committed_version"] = res.version
        out["excluded"] = sorted(res.excluded)
        wait_for(lambda: len(ray.get(fleet._coord.member_handles.remote())) == 4, 120,
                 "lost replicas re-admitted")
        st = converged(fleet)
        out["version_after"] = st["version"]
        out["members_after"] = len(st["replicas"])
        out["victims_caught_up_from"] = {r["id"]: r["caught_up_from"] for r in st["replicas"]
                                         if r["id"] in victims}
        out["values"] = sorted({probe_value(fleet.infer(probe_input()).outputs) for _ in range(12)})
    out["client_failures"] = load.failures[:5]
    out["responses"] = sum(len(m) for m in load.responses)
    out["torn_or_backwards"] = ""
    try:
        load.check(min_responses=1)  # under CPU load, clients may wait out a replica's restart
    except AssertionError as exc:
        out["torn_or_backwards"] = str(exc)
    fleet.shutdown()
    print("RESULT " + json.dumps(out))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()
