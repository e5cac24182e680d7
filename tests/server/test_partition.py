"""The partitioner, without Ray: balanced cuts, boundary bookkeeping, manual split points."""

import numpy as np
import pytest

import gradserve
from gradserve.server.planning.partition import plan_model
from gradserve.worker.graph import GraphError

from dags import random_dag


def chain(widths=(64, 64, 64, 64, 64)):
    rng = np.random.default_rng(0)
    m = gradserve.ModelBuilder()
    x = m.input("x", (None, widths[0]), np.float64)
    h = x
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        h = m.tanh(h @ m.param(f"w{i}", rng.standard_normal((a, b))))
    return m.loss(h.mean()), {"x": np.ones((32, widths[0]))}


def test_every_node_in_exactly_one_partition_in_topological_order():
    model, feeds = random_dag(0, depth=14)
    plan = plan_model(model, feeds, partitions=4)
    names = [n for p in plan.partitions for n in p.node_names()]
    assert len(names) == len(set(names))
    where = {n: p.index for p in plan.partitions for n in p.node_names()}
    dead = [n.name for n in model.nodes if n.name not in where]
    assert dead, "the dead branch is pruned"
    for b in plan.boundaries.values():
        assert all(c > b.producer for c in b.consumers), "boundaries point forward: the partitions pipeline"


def test_balances_estimated_flops():
    model, feeds = chain()
    plan = plan_model(model, feeds, partitions=4)
    flops = [p.flops for p in plan.partitions]
    assert len(flops) == 4
    assert max(flops) <= 1.2 * min(flops), flops


def test_boundaries_report_producer_consumers_and_size():
    model, feeds = chain()
    plan = plan_model(model, feeds, partitions=2)
    (b,) = plan.boundaries.values()
    assert (b.producer, b.consumers, b.shape, b.nbytes) == (0, [1], (32, 64), 32 * 64 * 8)
    text = plan.describe()
    assert "partition 0" in text and "partition 1" in text and b.name in text


def test_shared_parameter_listed_in_both_partitions():
    rng = np.random.default_rng(1)
    m = gradserve.ModelBuilder()
    x = m.input("x", (None, 8), np.float64)
    w = m.param("w", rng.standard_normal((8, 8)))
    h = m.tanh(x @ w)
    for i in range(4):
        h = m.tanh(h @ m.param(f"v{i}", rng.standard_normal((8, 8))))
    model = m.loss(m.tanh(h @ w).sum())
    plan = plan_model(model, {"x": np.ones((4, 8))}, partitions=3)
    assert len(plan.param_partitions["w"]) == 2
    assert "shared parameter w" in plan.describe()


def test_manual_split_points():
    model, feeds = chain()
    names = [n.name for n in model.nodes]
    plan = plan_model(model, feeds, partitions=2, split_at=[names[3]])
    assert plan.partitions[1].node_names()[0] == names[3]
    with pytest.raises(GraphError, match="split point 'nope'"):
        plan_model(model, feeds, partitions=2, split_at=["nope"])
