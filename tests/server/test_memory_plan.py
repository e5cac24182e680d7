"""The memory model and memory-aware planning: estimates against hand-computed buffers, the
planner splitting further when nodes are small, and refusals (RESOURCE_EXHAUSTED) when nothing fits.
Pure planning: no Ray, clusters described by hand."""

import math

import grpc
import pytest

from gradserve.client.demo import mlp_example
from gradserve.server.errors import status_for
from gradserve.server.planning.memory import (
    ACTOR_BASE_BYTES,
    HEADROOM,
    MemoryModel,
    NodeInfo,
    ResourceExhausted,
    nodes_of,
    pack,
    parse_size,
)
from gradserve.server.planning.partition import plan_job
from gradserve.server.planning.prepare import prepare
from graphs import deep_mlp

F32 = 4


def _total(counted: int) -> int:
    return ACTOR_BASE_BYTES + math.ceil(HEADROOM * counted)


@pytest.fixture(scope="module")
def mlp():
    model, feeds = mlp_example()  # 16 -> 64 -> 64 -> 4 tanh MLP, MSE loss, float32, batch 256
    return model, feeds, prepare(model, feeds)


def test_whole_mlp_estimate_matches_hand_count(mlp):
    model, feeds, job = mlp
    need = plan_job(job, model, 1).memory[0]
    weights = 16 * 64 + 64 + 64 * 64 + 64 + 64 * 4 + 4
    # (the mean squared error runs as one node: the Pow's exponent constant is no longer read)
    assert need.params == weights * F32
    assert need.grads == weights * F32
    # Kept for the backward pass: both tanh outputs (Tanh keeps y; MatMul's kept input is one of
    # them or the feed), and the fused mean squared error's inputs: the prediction and the feed y
    # (a feed: counted as a boundary); Add keeps nothing.
    assert need.activations == 2 * 256 * 64 * F32 + 256 * 4 * F32
    assert need.boundary == 256 * 16 * F32 + 256 * 4 * F32 + F32  # feeds x, y and the loss
    assert need.working == 2 * 256 * 64 * F32  # the largest nodes: a product or a tanh (256x64 in, 256x64 out)
    assert need.total == _total(need.params + need.grads + need.activations + need.boundary + need.working)


def test_partition_estimates_count_boundaries_and_micro_batches(mlp):
    model, feeds, job = mlp
    # (each MatMul and the Add of its bias run as one node, named after the MatMul)
    plan = plan_job(job, model, 3, split_at=["matmul1", "tanh1"], micro_batches=4)
    middle = plan.memory[1]  # just matmul1 (+ its bias): receives tanh0's output, sends its own product
    assert [n.name for n in plan.partitions[1].nodes] == ["matmul1"]
    assert (middle.params, middle.grads) == ((64 * 64 + 64) * F32, (64 * 64 + 64) * F32)
    assert middle.activations == 0  # MatMul keeps its input, but that is the received boundary value
    assert middle.boundary == 2 * 256 * 64 * F32
    assert middle.in_flight == 4 * 2 * 256 * 64 * F32  # GPipe: all 4 micro-batches in flight
    first = plan.memory[0]  # matmul0 (+ add0), tanh0: keeps tanh0's output, receives x, sends tanh0's output
    assert first.activations == 256 * 64 * F32
    assert first.boundary == 256 * 16 * F32 + 256 * 64 * F32


def test_range_table_agrees_with_single_ranges(mlp):
    model, _, job = mlp
    mm = MemoryModel(job, model, micro_batches=2)
    positions = sorted({0, 1, 2, len(job.nodes) - 1, len(job.nodes)})
    table = mm.needs(positions)
    for a in range(len(positions)):
        for b in range(a + 1, len(positions)):
            assert table[a][b] == mm.range(positions[a], positions[b]).total


def test_planner_splits_further_when_nodes_are_small():
    model, feeds, job = deep_mlp()
    whole = plan_job(job, model, 1).memory[0].total
    small = ACTOR_BASE_BYTES + (whole - ACTOR_BASE_BYTES) * 2 // 5
    cluster = nodes_of(4, small)
    plan = plan_job(job, model, 1, cluster=cluster, grow=True)
    assert len(plan.partitions) >= 3
    assert all(m.total <= small for m in plan.memory)
    assert pack([m.total for m in plan.memory], cluster) is not None
    # an explicit K that fits is kept exactly, with cuts chosen so every partition fits
    plan = plan_job(job, model, 4, cluster=cluster)
    assert len(plan.partitions) == 4 and all(m.total <= small for m in plan.memory)


def test_explicit_partitions_that_do_not_fit_are_refused_naming_need_and_largest_node():
    model, feeds, job = deep_mlp()
    whole = plan_job(job, model, 1).memory[0].total
    top = ACTOR_BASE_BYTES + (whole - ACTOR_BASE_BYTES) * 3 // 5
    cluster = [NodeInfo("a", 1, top - (1 << 20)), NodeInfo("b", 1, top)]
    with pytest.raises(ResourceExhausted) as err:
        plan_job(job, model, 1, cluster=cluster)
    message = str(err.value)
    assert "partition 0 of 1 needs" in message and "the largest node has" in message
    mib = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
    assert mib(whole) in message and mib(top) in message
    assert status_for(err.value)[0] == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_job_larger_than_the_cluster_is_refused_before_planning():
    model, feeds, job = deep_mlp()
    whole = plan_job(job, model, 1).memory[0].total
    with pytest.raises(ResourceExhausted, match="more than the whole cluster's"):
        plan_job(job, model, 1, cluster=nodes_of(2, ACTOR_BASE_BYTES + (whole - ACTOR_BASE_BYTES) // 3), grow=True)


def test_one_node_too_big_for_any_worker_is_refused():
    model, feeds, job = deep_mlp(layers=2, width=2048, batch=8)  # a 16 MiB weight in one MatMul
    with pytest.raises(ResourceExhausted, match=r"node 'matmul\d' \(MatMul\) alone needs .* largest node has"):
        plan_job(job, model, 1, cluster=nodes_of(8, ACTOR_BASE_BYTES + (20 << 20)), grow=True)


def test_replicas_must_pack_too():
    model, feeds, job = deep_mlp()
    need = plan_job(job, model, 1).memory[0].total
    plan_job(job, model, 1, cluster=nodes_of(2, need), replicas=2)
    with pytest.raises(ResourceExhausted, match="2 replicas"):
        plan_job(job, model, 1, cluster=nodes_of(1, need + need // 2), replicas=2)


def test_describe_shows_memory_per_partition(mlp):
    model, feeds, job = mlp
    text = plan_job(job, model, 2).describe()
    assert text.count("  memory: ~") == 2 and "parameters" in text and "activations" in text


@pytest.mark.parametrize(
    "text, value",
    [
        ("1200M", 1200 << 20),
        ("2G", 2 << 30),
        ("1.5Gi", 3 << 29),
        ("512MiB", 512 << 20),
        ("1048576", 1 << 20),
    ],
)
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "big", "12Q", "-1"])
def test_parse_size_refuses_nonsense(text):
    with pytest.raises(ValueError, match="cannot read the size"):
        parse_size(text)
