"""Memory-aware planning on a real cluster: 3 one-CPU worker nodes of 200 MiB each (Ray's
``memory`` resource, ``deploy/local-cluster up --memory-per-node``) and a 12-layer 1024 x 1024
float32 MLP (48 MiB of weights, 96 MiB with their gradients): with the planner's headroom and a
worker process's own 128 MiB, too large for any one node.

The sizes are scaled down together from 1200 MiB nodes and a 4096-wide MLP (a node's memory beyond
its worker process, the model and the batch too large for the cluster, each about 1/16): the
planner takes the same decisions, and the test moves 1/16 of the bytes.

- ``auto`` partitions split it over nodes, and the gradients are right;
- one partition is refused with RESOURCE_EXHAUSTED before anything runs, naming the memory it
  needs and the largest node's, and the server goes on serving;
- a batch too large for the whole cluster is refused the same way.
"""

from __future__ import annotations

import numpy as np
import pytest

import gradserve
from clusters import local_cluster
from gradserve.client.remote import ResourceExhausted
from gradserve.server.planning.memory import ACTOR_BASE_BYTES, parse_size

pytestmark = pytest.mark.slow

WIDTH, LAYERS = 1024, 12
NODE_MEMORY = "200M"
# Activations of this many samples need more memory than the 3 nodes have together (~280 MiB of
# the 3 x 72 MiB beyond the worker processes), while the largest single step still fits a node.
TOO_LARGE_BATCH = 2048


def _mlp() -> gradserve.Model:
    rng = np.random.default_rng(0)
    m = gradserve.ModelBuilder()
    h = m.input("x", (None, WIDTH), np.float32)
    for i in range(LAYERS):
        w = rng.standard_normal((WIDTH, WIDTH), dtype=np.float32) / np.float32(np.sqrt(WIDTH))
        h = m.tanh(h @ m.param(f"w{i}", w))
    return m.loss((h * h).mean())


def test_a_model_larger_than_any_node(tmp_path):
    model = _mlp()
    # the weights and their gradients alone, in one worker process, would not fit a node
    assert ACTOR_BASE_BYTES + 2 * sum(p.nbytes for p in model.params.values()) > parse_size(NODE_MEMORY)
    feeds = {"x": np.random.default_rng(1).standard_normal((32, WIDTH), dtype=np.float32)}
    reference = gradserve.local().gradients(model, feeds)
    with local_cluster(tmp_path, 3, "--memory-per-node", NODE_MEMORY) as (address, _):
        with gradserve.Client(address) as client:
            client.upload(model)

            with pytest.raises(ResourceExhausted) as refused:
                client.gradients(model, feeds, partitions=1)
            message = str(refused.value)
            assert "needs" in message and "largest node" in message, message

            result = client.gradients(model, feeds)  # partitions, micro-batches, replicas: auto
            nodes = {w["node_id"] for row in result.info["placement"] for w in row}
            assert result.info["partitions"] >= 2 and len(nodes) >= 2, result.info["placement"]
            assert abs(result.loss - reference.loss) <= 1e-5 * abs(reference.loss)
            for name, want in reference.grads.items():
                scale = float(np.abs(want).max())
                assert float(np.abs(result.grads[name] - want).max()) <= 1e-4 * scale, name

            huge = {"x": np.zeros((TOO_LARGE_BATCH, WIDTH), np.float32)}  # activations beyond the whole cluster
            with pytest.raises(ResourceExhausted, match="needs"):
                client.gradients(model, huge)

            assert client.gradients(model, feeds).loss == pytest.approx(result.loss, rel=1e-6)  # still serving
