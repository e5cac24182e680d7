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
   again), then an existing actor before a new one (a worker process costs a second to start),
   and of those the smallest reservation that holds the stage (the bigger ones stay free for
   bigger stages).
5. Among new actors, the node with the fewest of the pool's actors -- after a lost worker, that
   is where it was if the node is still alive -- then pool order, so decisions are repeatable.

**Memory.** An actor hosts any stage its reservation holds, of any model. A new actor reserves its
stage's need rounded up to a coarse size (:func:`size_class`: a power of two, at least 256 MiB)
where its node's memory allows, so one actor serves every small stage and an idle actor is
retired only for a stage bigger than its size, when its node is short of memory or of room under
:func:`actor_cap`: a pool of varied models converges instead of replacing actors job after job.

Nothing here waits: when the cluster is busy, jobs share actors, whose in-order queues keep them
correct (see the engine's submission lock); the server's job registry is what makes jobs wait.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Hashable, Sequence

from gradserve.server.planning.memory import ACTOR_BASE_BYTES, NodeInfo

# The smallest reservation: a worker process and as much again for tensors, which every small
# stage fits (a 21 KB model's stage needs the process and 75 KB).
MIN_RESERVATION = 2 * ACTOR_BASE_BYTES


@dataclass(frozen=True)
class ActorInfo:
    """A pool actor as the scheduler sees it: where it runs, how many running job slots use it,
    and which stages (by stage key) it holds."""

    actor_id: Hashable
    node_id: str
    load: int = 0
    stages: frozenset[str] = field(default_factory=frozenset)
    memory: int = 0  # bytes it reserved from Ray when it started


@dataclass(frozen=True)
class NewActor:
    """A decision to start a new pool actor on ``node_id``, reserving ``memory`` bytes (its slot's
    need, rounded up as memory allows: :func:`size_class`), after retiring the idle actors
    ``retire`` (ids) whose smaller reservations hold the memory it needs."""

    node_id: str
    memory: int = 0
    retire: tuple = ()


def actor_cap(node: NodeInfo, slots: int, nodes: int) -> float:  # float: Ray counts fractional CPUs
    """How many pool actors ``node`` may hold: one per CPU, and at least this job's fair share of
    the cluster (``slots`` actors over ``nodes`` nodes) so any job can get distinct actors."""
    return max(node.cpus, math.ceil(slots / max(1, nodes)))


def size_class(need: int) -> int:
    """The coarse size an actor reserves for a stage needing ``need`` bytes: the next power of two,
    at least :data:`MIN_RESERVATION` (0 stays 0: nothing to reserve). Stages of one size share
    actors; above the minimum, a size is less than twice the need."""
    return max(MIN_RESERVATION, 1 << (need - 1).bit_length()) if need > 0 else 0


def choose(
    stages: Sequence[str], nodes: Sequence[NodeInfo], actors: Sequence[ActorInfo], needs: Sequence[int] | None = None
) -> list[ActorInfo | NewActor]:
    """One actor per entry of ``stages`` (the stage key each slot runs, replica-major), distinct
    within the job: an :class:`ActorInfo` to reuse or a :class:`NewActor` to start (module docs).

    ``needs``: the memory each slot's partition needs (the planner's estimate). An actor is reused
    only if it reserved that much; a new one reserves at least it, on a node whose memory not yet
    reserved by the pool's actors holds it, so Ray's scheduler enforces the plan; then, from what
    is still unreserved once this job's new actors have their needs, up to its :func:`size_class`
    (:func:`_round_up`). Nodes of unknown memory (0) are not checked, and get needs exactly. Actors
    on nodes not in ``nodes`` (gone, or without CPUs) are never chosen. With no node known at all
    (a cluster still starting), new actors go to ``""``: let Ray place them.
    """
    needs = list(needs) if needs is not None else [0] * len(stages)
    if not nodes:
        nodes = [NodeInfo("", 1)]
    alive = {n.node_id: n for n in nodes}
    usable = [a for a in actors if a.node_id in alive]
    cpus = {n: max(1, info.cpus) for n, info in alive.items()}
    node_load: Counter[str] = Counter()
    count: Counter[str] = Counter()
    reserved: Counter[str] = Counter()
    for a in usable:
        node_load[a.node_id] += a.load
        count[a.node_id] += 1
        reserved[a.node_id] += a.memory

    retired: set = set()

    def room(n: str, need: int) -> tuple | None:
        """Idle actors to retire so a new actor reserving ``need`` fits node n, in memory and under
        its actor cap (() when it fits as is); None when it cannot. Idle actors whose reservation
        is too small for this slot are what a pool of varied models leaves behind; retiring them
        keeps nodes from filling up with actors no job can use."""
        total = alive[n].memory_bytes
        short = need - (total - reserved[n]) if total and need else 0
        over = count[n] + 1 - caps[n]
        if short <= 0 and over <= 0:
            return ()
        idle = sorted(
            (
                a
                for a in usable
                if a.node_id == n
                and a.load == 0
                and need
                and a.memory < need
                and a.actor_id not in taken
                and a.actor_id not in retired
            ),
            key=lambda a: -a.memory,
        )
        out = []
        for a in idle:
            if short <= 0 and over <= 0:
                break
            out.append(a)
            short -= a.memory
            over -= 1
        return tuple(out) if short <= 0 and over <= 0 else None

    order = {a.actor_id: i for i, a in enumerate(usable)}
    caps = {n: actor_cap(info, len(stages), len(alive)) for n, info in alive.items()}
    mine: Counter[str] = Counter()  # this job's slots per node
    taken: set = set()
    picks: list[ActorInfo | NewActor] = []
    for stage, need in zip(stages, needs):
        best: ActorInfo | NewActor | None = None
        best_key: tuple | None = None
        for a in usable:
            if a.actor_id in taken or a.actor_id in retired or (need and a.memory and a.memory < need):
                continue
            n = a.node_id
            key = (mine[n], node_load[n] / cpus[n], a.load > 0, stage not in a.stages, 0, a.memory, order[a.actor_id])
            if best_key is None or key < best_key:
                best, best_key = a, key
        for n in alive:
            retire = room(n, need)
            if retire is None:
                continue
            key = (mine[n], node_load[n] / cpus[n], False, True, 1 + len(retire), count[n], len(order))
            if best_key is None or key < best_key:
                best, best_key = NewActor(n, need, tuple(a.actor_id for a in retire)), key
        if best is None:
            # Every actor taken or too small, every node full: share a big enough actor (its queue
            # keeps the job correct), else start one where most memory is left and let Ray queue it.
            big = [a for a in usable if a.actor_id not in retired and (not need or not a.memory or a.memory >= need)]
            if big:
                best = min(big, key=lambda a: (node_load[a.node_id] / cpus[a.node_id], order[a.actor_id]))
            else:
                best = NewActor(max(alive, key=lambda n: (alive[n].memory_bytes - reserved[n], -count[n])), need)
        picks.append(best)
        n = best.node_id
        mine[n] += 1
        node_load[n] += 1  # this job's own slots load the node for the slots after it
        if isinstance(best, ActorInfo):
            taken.add(best.actor_id)
        else:
            gone = [a for a in usable if a.actor_id in best.retire]
            retired.update(best.retire)
            count[n] += 1 - len(gone)
            reserved[n] += need - sum(a.memory for a in gone)
    return _round_up(picks, alive, reserved)


def _round_up(
    picks: list[ActorInfo | NewActor], alive: dict[str, NodeInfo], reserved: Counter[str]
) -> list[ActorInfo | NewActor]:
    """``picks`` with each new actor's reservation raised from its need towards its
    :func:`size_class`, out of its node's memory that nothing reserves once every pick has its need
    (``reserved``), so rounding never keeps this job from fitting; and at most to one CPU's share
    of the node, so a node can still hold an actor per CPU."""
    free = {n: info.memory_bytes - reserved[n] for n, info in alive.items()}
    out: list[ActorInfo | NewActor] = []
    for pick in picks:
        node = alive.get(pick.node_id)
        if isinstance(pick, NewActor) and pick.memory and node is not None and node.memory_bytes:
            share = int(node.memory_bytes / max(1.0, node.cpus))
            extra = max(0, min(size_class(pick.memory), max(share, pick.memory)) - pick.memory)
            extra = min(extra, max(0, free[pick.node_id]))
            free[pick.node_id] -= extra
            pick = dataclasses.replace(pick, memory=pick.memory + extra)
        out.append(pick)
    return out
