"""Run by e2e/test_multinode.py in a fresh process (Ray allows one cluster per driver process): start a
3-node Ray cluster on this machine with ray.cluster_utils.Cluster, run a job with 3 partitions and
print the placement and the largest gradient difference from the inline engine as JSON."""

import json
import sys

import numpy as np
import ray
from ray.cluster_utils import Cluster

import gradserve
from gradserve.server.ray_engine import RayEngine

sys.path.insert(0, sys.argv[1])
from dags import random_dag  # noqa: E402

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
for _ in range(2):
    cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
ray.init(address=cluster.address, include_dashboard=False)
try:
    model, feeds = random_dag(4, depth=12)
    reference = gradserve.local().gradients(model, feeds)
    with RayEngine(threads_per_worker=1) as engine:
        result = engine.gradients(model, feeds, partitions=3, micro_batches=2)
    worst = max(
        float(np.abs(result.grads[p] - g).max() / max(np.abs(g).max(), 1e-300)) for p, g in reference.grads.items()
    )
    print(
        json.dumps(
            {
                "cluster_nodes": len([n for n in ray.nodes() if n["Alive"]]),
                "partition_nodes": [w["node_id"] for w in result.info["placement"][0]],
                "loss_diff": abs(result.loss - reference.loss),
                "worst_rel_grad_diff": worst,
            }
        )
    )
finally:
    ray.shutdown()
    cluster.shutdown()
