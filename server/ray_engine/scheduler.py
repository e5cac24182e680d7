"""Which worker actors a job runs on: pure decisions, no Ray (the engine feeds it snapshots).

The engine asks :func:`choose` for one actor per (replica, partition) of a job, given the cluster's
alive nodes, the pool's actors and the jobs currently running on each. The rules, in order:

1. **One job's partitions on distinct nodes** whenever the cluster has enough of them: a node
   already used by this job is taken again only when every node is.
2. **The least-loaded node**: load is the (job, partition) slots running on the node's actors per
   CPU of the node, so concurrent jobs spread over the cluster while it has free capacity.
3. **An idle actor before a busy one** on that node; a new actor when every one there is busy
   and the node may hold another (:func:`actor_cap`), so a multi-CPU node runs jobs side by side.
4. **An actor that already holds the stage** (its parameters are loaded: no weights are sent
   again), then an existing actor before a new one (a worker process costs a second to start).
5. Among new actors, the node with the fewest of the pool's actors -- after a lost worker, that
   is where it was if the node is still alive -- then pool order, so decisions are repeatable.

Nothing here waits: when the cluster is busy, jobs share actors, whose in-order queues keep them
correct (see the engine's submission lock); the server's job registry is what makes jobs wait.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Hashable, Sequence


@dataclass(frozen=True)
class NodeInfo:
    """An alive cluster node that can host actors."""

    node_id: str
    cpus: int


@dataclass(frozen=True)
class ActorInfo:
    """A pool actor as the scheduler sees it: where it runs, how many running job slots use it,
    and which stages (by stage key) it holds."""

    actor_id: Hashable
    node_id: str
    load: int = 0
    stages: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True)
class NewActor:
    """A decision to start a new pool actor on ``node_id``."""

    node_id: str


def actor_cap(node: NodeInfo, slots: int, nodes: int) -> int:
    """How many pool actors ``node`` may hold: one per CPU, and at least this job's fair share of
    the cluster (``slots`` actors over ``nodes`` nodes) so any job can get distinct actors."""
    return max(node.cpus, math.ceil(slots / max(1, nodes)))


def choose(stages: Sequence[str], nodes: Sequence[NodeInfo], actors: Sequence[ActorInfo]) -> list[ActorInfo | NewActor]:
    """One actor per entry of ``stages`` (the stage key each slot runs, replica-major), distinct
    within the job: an :class:`ActorInfo` to reuse or a :class:`NewActor` to start (module docs).

    Actors on nodes not in ``nodes`` (gone, or without CPUs) are never chosen. With no node
    known at all (a cluster still starting), new actors go to ``""``: let Ray place them.
    """
    if not nodes:
        nodes = [NodeInfo("", 1)]
    alive = {n.node_id: n for n in nodes}
    usable = [a for a in actors if a.node_id in alive]
    cpus = {n: max(1, info.cpus) for n, info in alive.items()}
    node_load: Counter[str] = Counter()
    count: Counter[str] = Counter()
    for a in usable:
        node_load[a.node_id] += a.load
        count[a.node_id] += 1
    order = {a.actor_id: i for i, a in enumerate(usable)}
    caps = {n: actor_cap(info, len(stages), len(alive)) for n, info in alive.items()}
    mine: Counter[str] = Counter()  # this job's slots per node
    taken: set = set()
    picks: list[ActorInfo | NewActor] = []
    for stage in stages:
        best, best_key = None, None
        for a in usable:
            if a.actor_id in taken:
                continue
            n = a.node_id
            key = (mine[n], node_load[n] / cpus[n], a.load > 0, stage not in a.stages, 0, 0, order[a.actor_id])
            if best_key is None or key < best_key:
                best, best_key = a, key
        for n in alive:
            if count[n] >= caps[n]:
                continue
            key = (mine[n], node_load[n] / cpus[n], False, True, 1, count[n], len(order))
            if best_key is None or key < best_key:
                best, best_key = NewActor(n), key
        if best is None:  # every actor taken and every node full: cannot happen with actor_cap, but be safe
            best = NewActor(min(alive, key=lambda n: (node_load[n] / cpus[n], count[n])))
        picks.append(best)
        n = best.node_id
        mine[n] += 1
        node_load[n] += 1  # this job's own slots load the node for the slots after it
        if isinstance(best, ActorInfo):
            taken.add(best.actor_id)
        else:
            count[n] += 1
    return picks
