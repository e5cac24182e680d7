"""Pipeline schedules: in what order each partition runs its steps, and which steps share a call.

A job on K partitions and M micro-batches is a set of steps: a forward and a backward per
(partition, micro-batch) and one weight step per partition that computes dL/dw once its
backwards are done (the zero-bubble split: backwards hand their errors on first, the weights fill
the time the other stages still need). A step depends on steps of other partitions: a forward on
the forwards of the partitions whose outputs it reads, a backward on the backwards of the
partitions that read its outputs (they send the errors).

:func:`one_f_one_b` orders each partition's steps as PyTorch pipelining's 1F1B does -- partition p
runs K-1-p forwards ahead, then alternates one forward and one backward -- so a partition keeps at
most K-p micro-batches' activations instead of GPipe's M, and the last one runs each backward right
after its forward. The engine submits steps in the returned order (a topological order of the
dependencies in which every partition's own order is kept), each actor runs its steps in
submission order, so concurrent work on shared actors cannot deadlock.

:func:`calls` groups consecutive steps of a partition into one actor call wherever that delays
nobody: a step joins the call before it when it needs nothing from other partitions that the call
does not already wait for, and nothing the call computed so far is read by another partition. On
the last partition a forward and its backward become one call; with one micro-batch, the weight
step joins the first partition's backward; a one-partition, one-micro-batch job is a single call.
Every call costs a Ray task round trip (about a millisecond), which for small jobs is most of
their time.

Replicas sum their dL/dw on the workers, along a binomial tree (:func:`reduction_children`): each
weight step adds its children's results to its own, and the driver fetches the roots' sums only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

FORWARD, BACKWARD, WEIGHTS = "forward", "backward", "weights"


@dataclass(frozen=True)
class Step:
    """One step of a schedule: ``phase`` of ``partition`` on ``micro_batch`` (-1 for weights)."""

    phase: str  # FORWARD, BACKWARD or WEIGHTS
    partition: int
    micro_batch: int = -1


@dataclass
class Call:
    """Consecutive steps of one partition that run as one actor call."""

    partition: int
    steps: list[Step] = field(default_factory=list)


@dataclass(frozen=True)
class Links:
    """Which partitions read which: ``readers[p]`` read outputs of ``p``; ``sources[p]`` are read
    by ``p``. A partition's backward sends errors to its sources and waits for its readers'."""

    readers: Mapping[int, frozenset[int]]
    sources: Mapping[int, frozenset[int]]

    @classmethod
    def chain(cls, partitions: int) -> "Links":
        """Partition p reads p-1 only."""
        return cls.of({p: [p - 1] if p else [] for p in range(partitions)})

    @classmethod
    def of(cls, sources: Mapping[int, Sequence[int]]) -> "Links":
        readers: dict[int, set[int]] = {p: set() for p in sources}
        for p, srcs in sources.items():
            for s in srcs:
                readers[s].add(p)
        return cls({p: frozenset(r) for p, r in readers.items()}, {p: frozenset(s) for p, s in sources.items()})


def _needs(step: Step, links: Links, micro_batches: int) -> set[Step]:
    """The steps of other partitions ``step`` waits for (its own partition's come before it)."""
    p, c = step.partition, step.micro_batch
    if step.phase == FORWARD:
        return {Step(FORWARD, q, c) for q in links.sources[p]}
    if step.phase == BACKWARD:
        return {Step(BACKWARD, q, c) for q in links.readers[p]}
    return set()  # weights: after the partition's own backwards


def _read_by_others(step: Step, links: Links) -> bool:
    """Whether another partition reads what ``step`` returns."""
    if step.phase == FORWARD:
        return bool(links.readers[step.partition])
    if step.phase == BACKWARD:
        return bool(links.sources[step.partition])
    return False


def one_f_one_b(links: Links, micro_batches: int) -> list[Step]:
    """Every step of a job, in an order to submit them in (see the module docs)."""
    k = len(links.sources)
    orders: list[list[Step]] = []
    for p in range(k):
        ahead = min(k - 1 - p, micro_batches)
        order = [Step(FORWARD, p, c) for c in range(ahead)]
        for c in range(micro_batches):
            if ahead + c < micro_batches:
                order.append(Step(FORWARD, p, ahead + c))
            order.append(Step(BACKWARD, p, c))
        order.append(Step(WEIGHTS, p))
        orders.append(order)
    return _merge(orders, links, micro_batches)


def _merge(orders: list[list[Step]], links: Links, micro_batches: int) -> list[Step]:
    """One global order holding each partition's own order, every step after the steps it needs:
    the order the steps would run in if each partition ran its next step as soon as it could."""
    done: set[Step] = set()
    heads = [0] * len(orders)
    out: list[Step] = []
    while len(out) < sum(map(len, orders)):
        progressed = False
        for p, order in enumerate(orders):
            while heads[p] < len(order) and _needs(order[heads[p]], links, micro_batches) <= done:
                step = order[heads[p]]
                out.append(step)
                done.add(step)
                heads[p] += 1
                progressed = True
        if not progressed:  # cannot happen for orders from a valid schedule; guard against bugs
            stuck = [order[h] for order, h in zip(orders, heads) if h < len(order)]
            raise ValueError(f"schedule deadlocks: every partition waits ({stuck})")
    return out


def calls(steps: Sequence[Step], links: Links, micro_batches: int, deferred: bool = True) -> list[Call]:
    """Group ``steps`` (in submission order) into actor calls, keeping that order (module docs).
    A weight step needs only its own partition's earlier steps (other replicas' dL/dw are summed
    into it by a later call of the engine's, see :func:`reduction_children`). Without ``deferred``
    weight work (the backwards computed dL/dw as they went) a weight step only hands over the sums:
    it joins any call, delaying nobody."""
    out: list[Call] = []
    # partition -> its latest call, what that call waits for, whether others read its results
    open_call: dict[int, tuple[Call, set[Step], bool]] = {}
    for step in steps:
        needs = _needs(step, links, micro_batches)
        current = open_call.get(step.partition)
        free = step.phase == WEIGHTS and not deferred  # costs nothing: delays nobody
        if current is not None and (free or not current[2]) and needs <= current[1]:
            call, call_needs, read = current
            call.steps.append(step)
            open_call[step.partition] = (call, call_needs | needs, read or _read_by_others(step, links))
            continue
        call = Call(step.partition, [step])
        out.append(call)
        open_call[step.partition] = (call, needs, _read_by_others(step, links))
    return out


def reduction_children(replica: int, replicas: int) -> list[int]:
    """The replicas whose dL/dw ``replica`` adds to its own: a binomial tree, so R replicas'
    gradients meet in log2(R) rounds on the workers and the driver fetches one sum (or a few,
    when R is not a power of two) instead of R."""
    out, level = [], 1
    while level < replicas:
        if (replica + 1) % (2 * level) == 0:
            out.append(replica - level)
        elif (replica + 1) % (2 * level) == level:  # this one sends to replica + level: done
            break
        level *= 2
    return out


def reduction_parent(replica: int, replicas: int) -> int | None:
    """The replica that adds ``replica``'s dL/dw to its own; None for a root."""
    return next((r for r in range(replica + 1, replicas) if replica in reduction_children(r, replicas)), None)
