"""``auto`` partitions, micro-batches and replicas on hand-made clusters (no Ray), and the wire
contract: 0 means auto."""

import pytest

from gradserve.client.demo import mlp_example
from gradserve.client.remote import Client
from gradserve.client.wire import job_stream
from gradserve.proto.v1 import service_pb2
from gradserve.server.planning.auto import AUTO, choose, count_from_wire, count_to_wire, parse_count
from gradserve.server.planning.memory import ACTOR_BASE_BYTES, ResourceExhausted, nodes_of
from gradserve.server.planning.partition import plan_job
from graphs import deep_mlp

BIG = 8 << 30


@pytest.fixture(scope="module")
def deep():
    return deep_mlp(layers=6, width=512, batch=1024)  # ~3.2 GFLOPs forward: worth sharing out


def _squeezed(model, job, fraction):
    """Node memory that holds ``fraction`` of the whole job's tensors."""
    whole = plan_job(job, model, 1).memory[0].total
    return ACTOR_BASE_BYTES + int((whole - ACTOR_BASE_BYTES) * fraction)


def test_one_big_node_runs_one_partition(deep):
    model, feeds, job = deep
    choice = choose(job, model, feeds, nodes_of(1, BIG))
    assert (choice.k, choice.m, choice.r) == (1, 1, 1)
    assert any("fits one node" in r for r in choice.reasons)


def test_two_free_nodes_get_a_replica_each(deep):
    model, feeds, job = deep
    choice = choose(job, model, feeds, nodes_of(2, BIG))
    assert (choice.k, choice.m, choice.r) == (1, 1, 2)
    assert len(choice.split.chunks) == 2
    # ... but only the free ones: with one of them busy, one replica
    busy = choose(job, model, feeds, nodes_of(2, BIG), free=nodes_of(1, BIG))
    assert busy.r == 1 and any("no spare node" in r for r in busy.reasons)


def test_small_jobs_stay_on_one_node():
    model, feeds = mlp_example()  # ~3 MFLOPs
    from gradserve.server.planning.prepare import prepare

    choice = choose(prepare(model, feeds), model, feeds, nodes_of(2, BIG))
    assert (choice.k, choice.m, choice.r) == (1, 1, 1)
    assert any("too small to share out" in r for r in choice.reasons)


def test_small_memory_splits_and_pipelines(deep):
    model, feeds, job = deep
    small = _squeezed(model, job, 0.7)
    choice = choose(job, model, feeds, nodes_of(3, small))
    assert choice.k == 2 and choice.m > 1 and choice.r == 1
    assert len(choice.plan.partitions) == 2
    assert all(m.total <= small for m in choice.plan.memory)
    assert all(m.micro_batches == choice.m for m in choice.plan.memory)
    assert any(r.startswith("partitions: 2, auto: the whole job needs") for r in choice.reasons)
    assert any(r.startswith(f"micro-batches: {choice.m}, auto: pipelining") for r in choice.reasons)


def test_explicit_numbers_mean_exactly_those(deep):
    model, feeds, job = deep
    choice = choose(job, model, feeds, nodes_of(4, BIG), 3, 2, 1)
    assert (choice.k, choice.m, choice.r) == (3, 2, 1)
    assert len(choice.plan.partitions) == 3
    with pytest.raises(ResourceExhausted, match="largest node has"):
        choose(job, model, feeds, nodes_of(3, _squeezed(model, job, 0.7)), 1, AUTO, AUTO)


def test_unsplittable_batch_falls_back_to_one_micro_batch(deep):
    model, feeds, job = deep
    one = {k: v[:1] for k, v in feeds.items()}
    from gradserve.server.planning.prepare import prepare

    choice = choose(prepare(model, one), model, one, nodes_of(3, _squeezed(model, job, 0.7)), 2)
    assert (choice.k, choice.m, choice.r) == (2, 1, 1)


def test_count_parsing():
    assert parse_count("auto") == AUTO and parse_count("AUTO") == AUTO and parse_count("3") == 3 and parse_count(2) == 2
    for bad in ("0", "-1", "two", "1.5"):
        with pytest.raises(ValueError, match="'auto' or a whole number"):
            parse_count(bad)


def test_wire_contract_round_trip():
    """The client sends auto as 0 and numbers as themselves; the server reads 0 (also: unset) as auto."""
    model, feeds = mlp_example()
    client = Client("127.0.0.1:1")  # no call is made: messages are only built
    try:
        first = next(job_stream(*client._job_options("id", feeds, "auto", 4, "auto", ())))
    finally:
        client.close()
    wire = service_pb2.JobChunk.FromString(first.SerializeToString()).options
    assert (wire.partitions, wire.micro_batches, wire.replicas) == (0, 4, 0)
    assert [count_from_wire(v) for v in (wire.partitions, wire.micro_batches, wire.replicas)] == [AUTO, 4, AUTO]
    unset = service_pb2.JobOptions(model_id="id")
    assert count_from_wire(unset.partitions) == AUTO
    assert [count_to_wire(v) for v in (AUTO, 1, 7)] == [0, 1, 7]
    with pytest.raises(ValueError):
        count_to_wire(0)


# -- load and placement: auto under a fake cluster's load, with the engine's measured costs ---------


def test_a_queue_gets_whole_jobs_not_replicas(deep):
    """Replicas only out of capacity nobody waits for: with other jobs running or queued, R = 1."""
    model, feeds, job = deep
    idle = choose(job, model, feeds, nodes_of(2, BIG), others=0)
    assert idle.r == 2
    loaded = choose(job, model, feeds, nodes_of(2, BIG), others=3)
    assert (loaded.k, loaded.m, loaded.r) == (1, 1, 1)
    assert any("3 other jobs running or waiting" in r for r in loaded.reasons)


def test_partitions_sharing_a_node_are_not_pipelined(deep):
    """Stages on one node share its cores: pipelining them only adds calls (M = 1)."""
    model, feeds, job = deep
    one_node = choose(job, model, feeds, nodes_of(1, BIG, cpus=2), 2)
    assert (one_node.k, one_node.m) == (2, 1)
    assert any("share 1 node" in r for r in one_node.reasons)
    two_nodes = choose(job, model, feeds, nodes_of(2, BIG, cpus=1), 2)
    assert two_nodes.k == 2 and two_nodes.m > 1


def test_measured_costs_decide_whether_splitting_pays(deep):
    """The same job on the same idle nodes: where a Ray call is cheap the work is shared out;
    where calls cost as much as the work, it stays whole."""
    from gradserve.server.planning.timing import Costs

    model, feeds, job = deep
    cheap = choose(job, model, feeds, nodes_of(2, BIG), costs=Costs(call_seconds=1e-4))
    dear = choose(job, model, feeds, nodes_of(2, BIG), costs=Costs(call_seconds=5.0))
    assert cheap.r == 2 and dear.r == 1
    assert any("too small to share out" in r for r in dear.reasons)
    piped = choose(job, model, feeds, nodes_of(2, BIG), 2, costs=Costs(call_seconds=1e-4))
    whole = choose(job, model, feeds, nodes_of(2, BIG), 2, costs=Costs(call_seconds=5.0))
    assert piped.m > 1 and whole.m == 1


@pytest.mark.parametrize("call", [1e-5, 1e-3, 2e-2, 1.0])
@pytest.mark.parametrize("nodes", [1, 2, 3, 6])
def test_auto_never_predicts_slower_than_one_copy_unpipelined(deep, call, nodes):
    from gradserve.server.planning.auto import _Timing
    from gradserve.server.planning.timing import Costs, Shape

    model, feeds, job = deep
    costs = Costs(call_seconds=call)
    for k in (1, 2, 3):
        choice = choose(job, model, feeds, nodes_of(nodes, BIG, cpus=2), k, costs=costs)
        plan = plan_job(job, model, k)
        shape = Shape(
            sum(p.flops for p in plan.partitions),
            sum(b.nbytes for b in plan.boundaries.values()),
            sum(v.nbytes for v in model.params.values()),
        )
        timing = _Timing(shape, costs, 2, nodes)
        assert timing.seconds(k, choice.m, choice.r) <= timing.seconds(k, 1, 1)
