"""Run in a subprocess by tests/test_placement_cluster.py: a simulated multi-node Ray cluster.

Three worker nodes with two fake MLU cards each (Ray 2.60 has no MLU accelerator manager, so the
cards are a custom resource), a fleet of six replicas placed by placement-group bundles. The
engine runs on the CPU (``engine_device: cpu``): the placement logic is what is under test. Prints
one JSON object with what it observed.
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fleet_models import build_probe_engine, fleet_config, probe_input, probe_weights  # noqa: E402

from actors.payload import Publication  # noqa: E402,F401
from cluster import Fleet  # noqa: E402
from cluster.placement import CONNECT_RETRY  # noqa: E402
from cluster.publish import publish  # noqa: E402

NODES, CARDS = 3, 2


def main() -> None:
    tmp = Path(tempfile.mkdtemp())
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "object_store_memory": 128 << 20,
        "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 3,
                           **CONNECT_RETRY}})
    for _ in range(NODES):
        cluster.add_node(num_cpus=2, resources={"MLU": CARDS}, object_store_memory=128 << 20)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    engine = tmp / "probe.engine"
    build_probe_engine(engine)
    cfg = fleet_config(engine, tmp, replicas=NODES * CARDS, device="mlu", engine_device="cpu",
                       address=cluster.address, placement={"cards_per_node": CARDS})
    fleet = Fleet.launch(cfg)
    out: dict = {}
    st = fleet.status()
    per_node: dict[str, list[int]] = defaultdict(list)
    for rep in st["replicas"]:
        per_node[rep["node"]].append(int(rep["visible_devices"]["MLU_VISIBLE_DEVICES"]))
    out["replicas"] = len(st["replicas"])
    out["indexes_per_node"] = {n: sorted(v) for n, v in per_node.items()}
    out["card_field"] = sorted(rep["card"] for rep in st["replicas"])

    # one version through the object store: which nodes hold a copy afterwards
    pub = publish(probe_weights(5.0), fleet.manifest(), inline_bytes=0)  # through the object store
    res = ray.get(fleet._coord.refit.remote(pub.refs, pub.specs, pub.checksums, None))
    locations = ray.experimental.get_object_locations(pub.refs)[pub.refs[0]]
    replica_nodes = Counter(rep["node"] for rep in st["replicas"])
    out["status"] = res.status
    out["copies_per_node"] = dict(Counter(locations["node_ids"]))
    out["replica_nodes"] = dict(replica_nodes)
    out["values"] = sorted({float(fleet.infer(probe_input()).outputs[0][0]) for _ in range(12)})
    # an impossible placement: more replicas than cards
    try:
        Fleet.launch(fleet_config(engine, tmp, replicas=NODES * CARDS + 1, device="mlu",
                                  engine_device="cpu", address=cluster.address,
                                  placement={"cards_per_node": CARDS},
                                  timeouts={"launch_s": 5}))
        out["impossible"] = "launched"
    except Exception as exc:  # noqa: BLE001
        out["impossible"] = str(exc)
    fleet.shutdown()
    print("RESULT " + json.dumps(out))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()
