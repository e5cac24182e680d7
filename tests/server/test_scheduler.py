"""The scheduler's placement decisions and the job registry's admission (concurrency that follows
the engine's capacity, fairness between clients), without Ray or sockets."""

import argparse
import dataclasses
import itertools
import threading
import time

import numpy as np
import pytest

from gradserve.client.serve_args import add_serve_args
from gradserve.server.job import JobOptions, client_of
from gradserve.server.jobs import DEFAULT_CONCURRENCY, JobRegistry
from gradserve.server.planning.memory import ACTOR_BASE_BYTES
from gradserve.server.ray_engine.scheduler import MIN_RESERVATION, ActorInfo, NewActor, NodeInfo, choose, size_class
from gradserve.server.result import Result

A, B, C = NodeInfo("a", 1), NodeInfo("b", 1), NodeInfo("c", 1)


def _nodes_of(picks):
    return [p.node_id for p in picks]


# -- placement --------------------------------------------------------------------------------------
GB = 1 << 30


def test_actors_reserve_the_memory_their_partition_needs():
    """A new actor reserves its slot's need, on a node whose unreserved memory holds it; an actor
    is reused only if its reservation covers the slot."""
    small, big = NodeInfo("a", 1, 1 * GB), NodeInfo("b", 1, 4 * GB)
    (pick,) = choose(["s/0"], [small, big], [], needs=[2 * GB])
    assert pick == NewActor("b", 2 * GB)
    held = [ActorInfo(1, "b", memory=1 * GB, stages=frozenset({"s/0"}))]
    (pick,) = choose(["s/0"], [NodeInfo("b", 2, 4 * GB)], held, needs=[2 * GB])
    assert isinstance(pick, NewActor) and pick.memory == 2 * GB and not pick.retire  # 3 GB left: fits
    (pick,) = choose(["s/0"], [NodeInfo("b", 2, 4 * GB)], held, needs=[GB // 2])
    assert pick == held[0]  # big enough: reused


def test_idle_actors_too_small_are_retired_to_make_room():
    node = NodeInfo("a", 2, 4 * GB)
    idle = [ActorInfo(1, "a", memory=int(1.5 * GB)), ActorInfo(2, "a", memory=int(1.5 * GB))]
    (pick,) = choose(["s/0"], [node], idle, needs=[3 * GB])
    assert isinstance(pick, NewActor) and pick.memory == 3 * GB
    assert set(pick.retire) == {1, 2}  # 1 GB free + one 1.5 GB actor is not enough: both go
    (pick,) = choose(["s/0"], [node], idle, needs=[2 * GB])
    assert len(pick.retire) == 1  # 1 GB free + 1.5 GB
    busy = [ActorInfo(1, "a", load=1, memory=int(1.5 * GB)), ActorInfo(2, "a", load=1, memory=int(1.5 * GB))]
    (pick,) = choose(["s/0"], [node], busy, needs=[3 * GB])
    assert pick.retire == ()  # busy actors are never retired: the new one waits in Ray's queue


def test_a_fresh_cluster_gets_one_partition_per_node():
    picks = choose(["s/0", "s/1", "s/2"], [A, B, C], [])
    assert all(isinstance(p, NewActor) for p in picks)
    assert sorted(_nodes_of(picks)) == ["a", "b", "c"]


def test_partitions_share_nodes_only_when_there_are_too_few():
    picks = choose(["s/0", "s/1", "s/2", "s/3"], [A, B], [])
    assert sorted(_nodes_of(picks)) == ["a", "a", "b", "b"]


def test_concurrent_jobs_go_to_idle_nodes():
    actors = [ActorInfo(1, "a", load=1, stages=frozenset({"s/0"})), ActorInfo(2, "b", load=0)]
    (pick,) = choose(["s/0"], [A, B], actors)
    assert pick == actors[1], "the idle node, though the busy actor holds the stage"
    # every node busy: the least loaded one, on an actor holding the stage (no new actor on a full node)
    actors = [
        ActorInfo(1, "a", load=2),
        ActorInfo(2, "b", load=1, stages=frozenset({"s/0"})),
        ActorInfo(3, "b", load=1),
    ]
    (pick,) = choose(["s/0"], [A, NodeInfo("b", 2)], actors)
    assert pick == actors[1]


def test_an_idle_actor_holding_the_stage_is_reused():
    actors = [
        ActorInfo(1, "a"),
        ActorInfo(2, "b", stages=frozenset({"s/1"})),
        ActorInfo(3, "c", stages=frozenset({"s/0"})),
    ]
    picks = choose(["s/0", "s/1"], [A, B, C], actors)
    assert picks == [actors[2], actors[1]]


def test_a_multi_cpu_node_gets_a_second_actor_while_the_first_is_busy():
    big = NodeInfo("a", 2)
    (pick,) = choose(["s/0"], [big], [ActorInfo(1, "a", load=1, stages=frozenset({"s/0"}))])
    assert pick == NewActor("a")
    # ... but a 1-CPU node does not: the job shares the busy actor
    (pick,) = choose(["s/0"], [A], [ActorInfo(1, "a", load=1)])
    assert pick == ActorInfo(1, "a", load=1)


def test_actors_on_nodes_that_left_are_not_chosen_and_replacements_go_where_the_pool_has_fewest():
    # node c lost its actor (killed); a and b each still have one, and d is gone
    actors = [
        ActorInfo(1, "a", stages=frozenset({"s/0"})),
        ActorInfo(2, "b", stages=frozenset({"s/1"})),
        ActorInfo(9, "d", stages=frozenset({"s/2"})),
    ]
    picks = choose(["s/0", "s/1", "s/2"], [A, B, C], actors)
    assert picks[:2] == actors[:2] and picks[2] == NewActor("c")
    # several replacements after failures piled actors onto one node: new ones go to the emptiest
    crowded = [ActorInfo(i, "a") for i in range(3)]
    picks = choose(["t/0", "t/1", "t/2"], [A, B, C], crowded)
    assert sorted(_nodes_of(picks)) == ["a", "b", "c"]


def test_decisions_are_repeatable():
    actors = [ActorInfo(i, n) for i, n in enumerate("aabbcc")]
    assert choose(["s/0", "s/1"], [A, B, C], actors) == choose(["s/0", "s/1"], [A, B, C], actors)


def test_no_known_node_lets_ray_place_actors():
    assert choose(["s/0"], [], []) == [NewActor("")]


# -- reservations in coarse sizes (issue 19) ----------------------------------------------------------
MB = 1 << 20
BASE = ACTOR_BASE_BYTES
# What the planner estimates for benchmarks/small_jobs.py's two models (5 x 32 and 3 x 40 tanh MLPs,
# batch 16) at K = 1, 2, 3: the worker process plus some tens of KB per partition.
SMALL_NEEDS = {
    ("a", 1): [75850],
    ("a", 2): [47040, 39050],
    ("a", 3): [36480, 33920, 25930],
    ("b", 1): [71610],
    ("b", 2): [48800, 35610],
    ("b", 3): [32400, 32400, 32410],
}


_new_ids = itertools.count(1000)


def _run_job(actors: list, stages: list, nodes: list, needs: list) -> tuple[list, list]:
    """Place one job and apply the decisions to the pool as the engine does: retire, start, load.
    Returns the new pool (every actor idle again: jobs run one after another) and the picks."""
    picks = choose(stages, nodes, actors, needs)
    pool = {a.actor_id: a for a in actors}
    for pick, stage in zip(picks, stages):
        if isinstance(pick, NewActor):
            for gone in pick.retire:
                del pool[gone]
            actor = ActorInfo(next(_new_ids), pick.node_id, memory=pick.memory)
        else:
            actor = pool[pick.actor_id]
        pool[actor.actor_id] = dataclasses.replace(actor, stages=actor.stages | {stage})
    return list(pool.values()), picks


def test_size_classes_are_coarse_powers_of_two():
    assert size_class(0) == 0
    assert size_class(BASE + 75850) == size_class(1) == MIN_RESERVATION == 256 * MB
    assert size_class(256 * MB + 1) == 512 * MB and size_class(512 * MB) == 512 * MB
    assert size_class(3 * GB) == 4 * GB


def test_small_stages_of_any_model_and_k_share_the_pool_once_warm():
    """Two small models, K = 3, 2, 1 in turn, model and K changing every job: after the first job
    of each (model, K), no actor is started or retired."""
    node = NodeInfo("a", 2, 8 * GB)
    order = [("b", 3), ("a", 2), ("b", 1), ("a", 3), ("b", 2), ("a", 1)]
    actors: list = []
    for cycle in range(4):
        for model, k in order:
            stages = [f"{model}{k}/{p}" for p in range(k)]
            actors, picks = _run_job(actors, stages, [node], [BASE + n for n in SMALL_NEEDS[model, k]])
            if cycle:
                assert all(isinstance(p, ActorInfo) for p in picks), (cycle, model, k, picks)
    assert len(actors) == 3 and {a.memory for a in actors} == {MIN_RESERVATION}


def test_new_actors_round_up_only_into_memory_nobody_needs():
    """A new actor reserves its need's size class where its node has that much unreserved, after
    the job's other new actors have their needs, and within one CPU's share of the node."""
    (pick,) = choose(["s/0"], [NodeInfo("a", 2, 8 * GB)], [], needs=[600 * MB])
    assert pick.memory == GB
    (pick,) = choose(["s/0"], [NodeInfo("a", 2, GB)], [], needs=[300 * MB])
    assert pick.memory == 512 * MB  # the class is the CPU's share
    (pick,) = choose(["s/0"], [NodeInfo("a", 2, GB)], [], needs=[600 * MB])
    assert pick.memory == 600 * MB  # the class (1 GiB) would leave the other CPU nothing: exact
    (pick,) = choose(["s/0"], [NodeInfo("a", 1, 400 * MB)], [], needs=[300 * MB])
    assert pick.memory == 400 * MB  # what the node has, short of the class
    small, big = choose(["s/0", "s/1"], [NodeInfo("a", 2, GB)], [], needs=[300 * MB, 600 * MB])
    assert small.memory >= 300 * MB and big.memory >= 600 * MB and small.memory + big.memory <= GB
    (pick,) = choose(["s/0"], [NodeInfo("a", 1)], [], needs=[300 * MB])
    assert pick.memory == 300 * MB  # unknown memory: nothing to round into
    busy = [ActorInfo(1, "a", load=1, memory=7 * GB + 256 * MB)]
    (pick,) = choose(["s/0"], [NodeInfo("a", 2, 8 * GB)], busy, needs=[600 * MB])
    assert pick.memory == 768 * MB  # all that is left, short of the class (1 GiB)


def test_the_smallest_actor_that_holds_a_stage_is_chosen():
    """Best fit: a small stage takes the small actor, leaving the big one for the big stage, so the
    job starts nothing."""
    node = NodeInfo("a", 2, 4 * GB)
    actors = [ActorInfo("big", "a", memory=GB), ActorInfo("small", "a", memory=256 * MB)]
    picks = choose(["s/0", "s/1"], [node], actors, needs=[200 * MB, 700 * MB])
    assert [p.actor_id for p in picks] == ["small", "big"]


# -- admission --------------------------------------------------------------------------------------
class _GatedRunner:
    """Runs jobs only when released; records the order jobs started in."""

    def __init__(self, capacity=None):
        self.started: list[str] = []
        self.gate = threading.Semaphore(0)
        self.cap = capacity
        self.lock = threading.Lock()

    def capacity(self):
        return self.cap

    def __call__(self, job):
        with self.lock:
            self.started.append(job.id)
        assert self.gate.acquire(timeout=10)
        return Result(0.0, {"w": np.zeros(1)})

    def running(self):
        with self.lock:
            return len(self.started)


def _wait(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_one_clients_backlog_does_not_starve_another():
    runner = _GatedRunner()
    registry = JobRegistry(runner, max_concurrent=1, max_queued=200)
    try:
        flood = [registry.submit("m", object(), {}, JobOptions(), client="flood") for _ in range(100)]
        single = registry.submit("m", object(), {}, JobOptions(), client="single")
        assert _wait(lambda: runner.running() == 1)
        runner.gate.release()  # the first flood job ends: the other client is next in turn
        assert _wait(lambda: runner.running() == 2)
        assert runner.started == [flood[0].id, single.id]
        for _ in range(101):
            runner.gate.release()
        assert single.wait(5) and all(j.wait(5) for j in flood)
        assert runner.started[2:] == [j.id for j in flood[1:]], "first come first served within a client"
    finally:
        registry.shutdown(1)


def test_cancelled_waiting_jobs_are_skipped():
    runner = _GatedRunner()
    registry = JobRegistry(runner, max_concurrent=1)
    try:
        first = registry.submit("m", object(), {}, JobOptions(), client="x")
        second = registry.submit("m", object(), {}, JobOptions(), client="y")
        third = registry.submit("m", object(), {}, JobOptions(), client="x")
        registry.cancel(second.id)
        assert _wait(lambda: runner.running() == 1)
        runner.gate.release()
        runner.gate.release()
        assert third.wait(5) and first.state == "done" and second.state == "cancelled"
        assert runner.started == [first.id, third.id]
    finally:
        registry.shutdown(1)


def test_auto_concurrency_follows_the_engines_capacity():
    runner = _GatedRunner(capacity=1)
    registry = JobRegistry(runner, max_concurrent=None, max_queued=10)
    try:
        jobs = [registry.submit("m", object(), {}, JobOptions(), client=str(i)) for i in range(4)]
        assert _wait(lambda: runner.running() == 1)
        registry.dispatch()  # a dispatch pass, as the registry makes every few seconds: it must start none
        assert registry.counts().admitted == 1, "capacity 1: one job at a time"
        runner.cap = 3  # nodes joined: waiting jobs start without any job ending
        assert _wait(lambda: runner.running() == 3, timeout=10)
        runner.cap = 1  # nodes left: no new job starts until the running ones are below the limit
        runner.gate.release()
        runner.gate.release()
        assert _wait(lambda: registry.counts().admitted == 1)  # two ended; their ends dispatched nothing
        registry.dispatch()
        assert runner.running() == 3 and registry.counts().admitted == 1
        runner.gate.release()
        assert _wait(lambda: runner.running() == 4)
        runner.gate.release()
        assert all(j.wait(5) for j in jobs)
    finally:
        registry.shutdown(1)


def test_auto_concurrency_without_an_engine_capacity_uses_the_default():
    runner = _GatedRunner(capacity=None)
    registry = JobRegistry(runner, max_concurrent=None)
    try:
        for i in range(DEFAULT_CONCURRENCY + 2):
            registry.submit("m", object(), {}, JobOptions(), client=str(i))
        assert _wait(lambda: runner.running() == DEFAULT_CONCURRENCY)
        registry.dispatch()
        assert registry.counts().admitted == DEFAULT_CONCURRENCY and registry.counts().waiting == 2
        for _ in range(DEFAULT_CONCURRENCY + 2):
            runner.gate.release()
    finally:
        registry.shutdown(1)


def test_serve_option_takes_auto_or_a_number():
    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    assert parser.parse_args([]).max_concurrent_jobs is None
    assert parser.parse_args(["--max-concurrent-jobs", "auto"]).max_concurrent_jobs is None
    assert parser.parse_args(["--max-concurrent-jobs", "3"]).max_concurrent_jobs == 3
    with pytest.raises(SystemExit):
        parser.parse_args(["--max-concurrent-jobs", "0"])


def test_client_identity_is_the_peer():
    class Context:
        def peer(self):
            return "ipv4:10.0.0.5:53412"

    assert client_of(Context()) == "ipv4:10.0.0.5:53412"
    assert client_of(object()) == ""


def test_a_bigger_stage_replaces_idle_small_actors_under_the_per_node_cap():
    """One-CPU nodes each hold an idle actor reserved for a smaller stage: concurrent jobs of a
    bigger stage retire them and spread over the nodes instead of sharing one new actor."""
    nodes = [NodeInfo(n, 1, 4 * GB) for n in "abc"]
    actors = [ActorInfo(i, n, memory=GB // 4) for i, n in enumerate("abc")]
    placed = []
    for job in range(3):
        (pick,) = choose(["big/0"], nodes, actors, needs=[GB])
        assert isinstance(pick, NewActor) and len(pick.retire) == 1, pick
        placed.append(pick.node_id)
        actors = [a for a in actors if a.actor_id not in pick.retire]
        actors.append(ActorInfo(f"new{job}", pick.node_id, load=1, memory=GB, stages=frozenset({"big/0"})))
    assert sorted(placed) == ["a", "b", "c"]
