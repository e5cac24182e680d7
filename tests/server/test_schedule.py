"""Pipeline schedules and how their steps are grouped into actor calls (no Ray needed)."""

from __future__ import annotations

import pytest

from gradserve.server.planning.schedule import (
    BACKWARD,
    FORWARD,
    WEIGHTS,
    Links,
    Step,
    calls,
    one_f_one_b,
    reduction_children,
    reduction_parent,
)

LINKS = {
    "chain2": Links.chain(2),
    "chain4": Links.chain(4),
    "skip": Links.of({0: [], 1: [0], 2: [0, 1], 3: [2]}),  # a residual-style cut: 2 reads 0 and 1
    "branches": Links.of({0: [], 1: [0], 2: [0], 3: [1, 2]}),
}


def _needs(step: Step, links: Links) -> set[Step]:
    if step.phase == FORWARD:
        return {Step(FORWARD, q, step.micro_batch) for q in links.sources[step.partition]}
    if step.phase == BACKWARD:
        return {Step(BACKWARD, q, step.micro_batch) for q in links.readers[step.partition]} | {
            Step(FORWARD, step.partition, step.micro_batch)
        }
    return set()


def _read_by_others(step: Step, links: Links) -> bool:
    """Forward outputs go to the readers, backward errors to the sources."""
    return bool({FORWARD: links.readers, BACKWARD: links.sources}.get(step.phase, {}).get(step.partition))


def _all(links: Links, m: int) -> set[Step]:
    k = len(links.sources)
    return {Step(ph, p, c) for p in range(k) for c in range(m) for ph in (FORWARD, BACKWARD)} | {
        Step(WEIGHTS, p) for p in range(k)
    }


@pytest.mark.parametrize("name", sorted(LINKS))
@pytest.mark.parametrize("m", [1, 2, 3, 4, 8])
def test_1f1b_is_a_valid_order(name: str, m: int) -> None:
    links = LINKS[name]
    k = len(links.sources)
    order = one_f_one_b(links, m)
    assert len(order) == len(set(order)) and set(order) == _all(links, m)
    seen: set[Step] = set()
    for step in order:
        assert _needs(step, links) <= seen, f"{step} submitted before what it needs"
        if step.phase == WEIGHTS:  # after every backward of its partition
            assert {Step(BACKWARD, step.partition, c) for c in range(m)} <= seen
        seen.add(step)
    for p in range(k):  # 1F1B keeps at most K-p micro-batches in flight on partition p (GPipe: M)
        live = peak = 0
        for step in (s for s in order if s.partition == p):
            live += {FORWARD: 1, BACKWARD: -1}.get(step.phase, 0)
            peak = max(peak, live)
        assert peak == min(k - p, m)


@pytest.mark.parametrize("name", sorted(LINKS))
@pytest.mark.parametrize("m", [1, 2, 4])
@pytest.mark.parametrize("deferred", [True, False])
def test_calls_keep_the_order_and_delay_nobody(name: str, m: int, deferred: bool) -> None:
    links = LINKS[name]
    order = one_f_one_b(links, m)
    grouped = calls(order, links, m, deferred=deferred)
    # Flattened, the calls hold every step once, each partition's steps in the schedule's order.
    flat = [s for call in grouped for s in call.steps]
    assert sorted(flat, key=order.index) == order and len(flat) == len(order)
    for p in links.sources:
        assert [s for s in flat if s.partition == p] == [s for s in order if s.partition == p]
    submitted: set[Step] = set()
    for call in grouped:
        assert all(s.partition == call.partition for s in call.steps)
        for i, step in enumerate(call.steps):
            # Whatever a step needs from other partitions was submitted before its call.
            assert {s for s in _needs(step, links) if s.partition != call.partition} <= submitted
            # A step joins a call only when nothing the call made so far is read by others (or
            # it is a weight step with nothing left to compute: it only hands over the sums).
            free = step.phase == WEIGHTS and not deferred
            assert free or not any(_read_by_others(before, links) for before in call.steps[:i]), f"{step} delays others"
        submitted |= set(call.steps)


def test_small_jobs_are_few_calls() -> None:
    one = calls(one_f_one_b(Links.chain(1), 1), Links.chain(1), 1)
    assert [[s.phase for s in c.steps] for c in one] == [[FORWARD, BACKWARD, WEIGHTS]]
    two = calls(one_f_one_b(Links.chain(2), 1), Links.chain(2), 1)
    assert [(c.partition, [s.phase for s in c.steps]) for c in two] == [
        (0, [FORWARD]),
        (1, [FORWARD, BACKWARD]),
        (1, [WEIGHTS]),
        (0, [BACKWARD, WEIGHTS]),
    ]
    # Weights computed during the backwards: handing them over joins the last backward's call.
    eager = calls(one_f_one_b(Links.chain(2), 1), Links.chain(2), 1, deferred=False)
    assert [(c.partition, [s.phase for s in c.steps]) for c in eager] == [
        (0, [FORWARD]),
        (1, [FORWARD, BACKWARD, WEIGHTS]),
        (0, [BACKWARD, WEIGHTS]),
    ]
    # The last partition runs each micro-batch's forward and backward as one call.
    four = calls(one_f_one_b(Links.chain(2), 4), Links.chain(2), 4)
    assert sum(1 for c in four if c.partition == 1 and [s.phase for s in c.steps] == [FORWARD, BACKWARD]) == 4


@pytest.mark.parametrize("r", range(1, 18))
def test_reduction_tree_sums_every_replica_once(r: int) -> None:
    parents = [reduction_parent(i, r) for i in range(r)]
    for i, parent in enumerate(parents):
        assert parent is None or (parent > i and i in reduction_children(parent, r))
    for i in range(r):
        assert all(parents[child] == i for child in reduction_children(i, r))
    # Every replica reaches exactly one root; roots are few and the tree is shallow.
    roots = [i for i, p in enumerate(parents) if p is None]
    assert r - 1 in roots and len(roots) == bin(r).count("1")

    def depth(i: int) -> int:
        return 1 + max((depth(c) for c in reduction_children(i, r)), default=0)

    assert max(depth(root) for root in roots) <= r.bit_length()
