"""The partitioner: split a prepared job's graph into K partitions for K workers.

Partitions are contiguous runs of a topological order, so every boundary edge points from a lower
partition to a higher one and the partitions form a DAG that pipelines. The cut points are chosen by
dynamic programming to minimise the slowest partition's estimated cost, where a partition's cost is
its compute plus the bytes it must receive (a transfer is priced at ``flops_per_byte`` FLOPs).
Skip connections, values consumed by several partitions and parameters used in several partitions
are all allowed: a parameter is placed in every partition that reads it and its gradient is the sum.

Given the cluster's nodes, the plan also respects memory (:mod:`gradserve.server.planning.memory`):
a cut is only allowed where both sides fit the largest node, the partitions (times the replicas)
must pack onto the nodes, and ``grow=True`` (``partitions="auto"``) adds partitions until they do.
A job that cannot fit raises :class:`~gradserve.server.planning.memory.ResourceExhausted` here,
before anything runs, naming what it needs and what the largest node has.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from gradserve.server.planning.cost import node_flops
from gradserve.server.planning.memory import (
    ACTOR_BASE_BYTES,
    MemoryModel,
    NodeInfo,
    PartitionMemory,
    ResourceExhausted,
    describe_nodes,
    fmt_bytes,
    largest,
    pack,
)
from gradserve.server.planning.prepare import PreparedJob, prepare
from gradserve.worker.graph import GraphError, Model, Node
from gradserve.worker.validate import ValueInfo

# Roughly how many FLOPs one byte of boundary transfer is worth on one machine (memory/IPC bound).
FLOPS_PER_BYTE = 4.0
# Beyond this many nodes, cuts are chosen among this many evenly spaced positions.
MAX_CANDIDATES = 160
# The most partitions memory may make the planner split a job into (the server's per-job bound on
# worker actors is 64 too).
MAX_PARTITIONS = 64


@dataclass
class Boundary:
    """A value produced in one partition and read in others."""

    name: str
    producer: int
    consumers: list[int]
    shape: tuple[int, ...]
    dtype: str
    nbytes: int


@dataclass
class Partition:
    """What one worker runs: its nodes (topologically sorted) and what it needs and hands on."""

    index: int
    nodes: list[Node]
    params: list[str]
    constants: list[str]
    feeds: list[str]
    inputs: list[str]  # boundary values it receives
    outputs: list[str]  # boundary values it hands on (and the loss, in the loss partition)
    flops: int

    def node_names(self) -> list[str]:
        return [n.name for n in self.nodes]


@dataclass
class Plan:
    """How a job's graph is split: partitions in topological order, the tensors crossing between
    them, where the loss is computed, and which partitions read each parameter."""

    partitions: list[Partition]
    boundaries: dict[str, Boundary]
    loss: str
    loss_partition: int
    param_partitions: dict[str, list[int]] = field(default_factory=dict)
    rewrites: tuple[str, ...] = ()  # exact rewrites applied before planning (see worker/rewrite.py)
    # Estimated memory per partition (the engine requests ``memory[p].total`` bytes for its actor).
    memory: list[PartitionMemory] = field(default_factory=list)

    def describe(self) -> str:
        """A human-readable account of the plan (what ``gradserve plan`` prints)."""
        total = sum(p.flops for p in self.partitions) or 1
        lines = [f"plan: {len(self.partitions)} partitions, loss '{self.loss}' in partition {self.loss_partition}"]
        for p in self.partitions:
            lines.append(
                f"partition {p.index}: {len(p.nodes)} nodes, {fmt_flops(p.flops)} FLOPs "
                f"({100 * p.flops / total:.0f}%), {len(p.params)} parameters"
            )
            if self.memory:
                lines.append(f"  memory: {self.memory[p.index].describe()}")
            lines.append(f"  nodes: {_list(p.node_names())}")
            if p.params:
                lines.append(f"  parameters: {_list(p.params)}")
            if p.feeds:
                lines.append(f"  feeds: {_list(p.feeds)}")
        if self.boundaries:
            lines.append("boundary tensors:")
            for b in self.boundaries.values():
                lines.append(
                    f"  {b.name}: partition {b.producer} -> {', '.join(map(str, b.consumers))}, "
                    f"{b.dtype}{list(b.shape)}, {fmt_bytes(b.nbytes)}"
                )
        else:
            lines.append("boundary tensors: none")
        shared = {p: parts for p, parts in self.param_partitions.items() if len(parts) > 1}
        for name, parts in shared.items():
            lines.append(f"shared parameter {name}: partitions {', '.join(map(str, parts))} (gradients summed)")
        lines += [f"rewritten: {note}" for note in self.rewrites]
        return "\n".join(lines)


def plan_job(
    job: PreparedJob,
    model: Model,
    partitions: int,
    split_at: Sequence[str] | None = None,
    *,
    cluster: Sequence[NodeInfo] | None = None,
    micro_batches: int = 1,
    replicas: int = 1,
    grow: bool = False,
) -> Plan:
    """Split ``job`` into ``partitions`` parts (or at the nodes ``split_at`` names); GraphError when
    its graph cannot be cut into that many (:func:`check_partitions`). With ``grow=True``,
    ``partitions`` is where growing starts.

    ``job`` holds one micro-batch's shapes and ``micro_batches`` says how many are in flight; the
    plan's ``memory`` estimates each partition. With ``cluster`` (the nodes partitions may run on),
    cuts keep every partition within the largest node and the ``replicas`` x partitions must pack
    onto the nodes; ``grow=True`` adds partitions until they do (never more than MAX_PARTITIONS).
    Raises ResourceExhausted when they cannot."""
    nodes = list(job.nodes)
    if partitions < 1:
        raise GraphError(f"partitions must be at least 1, got {partitions}")
    if not nodes:
        raise GraphError("the loss does not depend on any node; nothing to partition")
    mm = MemoryModel(job, model, micro_batches)
    if split_at:
        return _checked(_build(nodes, _manual_cuts(nodes, split_at), job, model, mm), cluster, replicas)
    if not grow:
        check_partitions(job, partitions)
    if not cluster:
        return _build(nodes, _unlimited_cuts(nodes, job.shapes, partitions), job, model, mm)
    limit = largest(cluster).memory_bytes
    _check_feasible(mm, cluster, replicas)
    k = min(partitions, len(nodes))
    if grow:  # start at the fewest partitions the memory allows, not at 1 (each try is a full DP)
        k = max(k, mm.fewest_ranges(_candidates(len(nodes), k), limit) or k)
    last = min(len(nodes), MAX_PARTITIONS) if grow else k
    attempt: Plan | None = None
    for k in range(k, max(k, last) + 1):
        cuts = _best_cuts(nodes, job.shapes, k, mm, limit)
        if cuts is None:
            continue
        attempt = _build(nodes, cuts, job, model, mm)
        if pack([m.total for m in attempt.memory] * replicas, cluster) is not None:
            return attempt
    if attempt is None:  # no cut into k partitions keeps each within the largest node
        attempt = _build(nodes, _unlimited_cuts(nodes, job.shapes, k), job, model, mm)
    return _checked(attempt, cluster, replicas)


def max_partitions(job: PreparedJob) -> int:
    """The most partitions ``job``'s graph can be cut into: one node each (partitions are runs of
    the nodes that reach the loss, none empty)."""
    return len(job.nodes)


def check_partitions(job: PreparedJob, partitions: int | str) -> None:
    """GraphError when an explicit partition count is more than ``job``'s graph can give (``auto``
    always passes): a job asking for 9 does not silently run 4."""
    most = max_partitions(job)
    if partitions != "auto" and int(partitions) > most:
        raise GraphError(
            f"{partitions} partitions asked for, but the graph can be cut into at most {most} partition"
            f"{'s' if most != 1 else ''} (one per node that reaches the loss)"
        )


def _checked(plan: Plan, cluster: Sequence[NodeInfo] | None, replicas: int) -> Plan:
    """``plan`` if its partitions (times the replicas) fit the cluster, else ResourceExhausted."""
    if not cluster:
        return plan
    needs = [m.total for m in plan.memory]
    if pack(needs * replicas, cluster) is not None:
        return plan
    big = max(range(len(needs)), key=lambda i: needs[i])
    top = largest(cluster).memory_bytes
    k = len(needs)
    if needs[big] > top:
        what = f"partition {big} of {k} needs {fmt_bytes(needs[big])} of memory ({plan.memory[big].parts()})"
    else:
        what = f"{k} partitions x {replicas} replicas need {fmt_bytes(sum(needs) * replicas)} of memory together"
    raise ResourceExhausted(
        f"{what}, but the largest node has {fmt_bytes(top)} ({describe_nodes(cluster)}): "
        "use more partitions (partitions auto splits until each fits), fewer replicas, or larger nodes"
    )


def _check_feasible(mm: MemoryModel, cluster: Sequence[NodeInfo], replicas: int) -> None:
    """Refuse a job no plan can fit: one node too big for the largest worker, or the whole job
    (the need of one partition holding everything) beyond the cluster's memory."""
    top = largest(cluster).memory_bytes
    n = len(mm.nodes)
    single = [mm.range(i, i + 1).total for i in range(n)]
    j = max(range(n), key=lambda i: single[i])
    if single[j] > top:
        raise ResourceExhausted(
            f"node '{mm.nodes[j].name}' ({mm.nodes[j].op_type}) alone needs {fmt_bytes(single[j])} of memory, "
            f"but the largest node has {fmt_bytes(top)} ({describe_nodes(cluster)}): no partitioning fits it"
        )
    # Tensors only: every worker process also takes ACTOR_BASE_BYTES, whichever partition it runs.
    tensors = (mm.range(0, n).total - ACTOR_BASE_BYTES) * replicas
    capacity = sum(max(0, node.memory_bytes - ACTOR_BASE_BYTES) for node in cluster)
    if tensors > capacity:
        raise ResourceExhausted(
            f"the job needs about {fmt_bytes(tensors)} of memory for its parameters, gradients and activations"
            f"{f' ({replicas} replicas)' if replicas > 1 else ''}, more than the whole cluster's "
            f"{fmt_bytes(capacity)} ({describe_nodes(cluster)}, less {fmt_bytes(ACTOR_BASE_BYTES)} per worker "
            f"process; the largest node has {fmt_bytes(top)})"
        )


def plan_model(
    model: Model, feeds: Mapping[str, np.ndarray] | None, partitions: int, split_at: Sequence[str] | None = None
) -> Plan:
    """Plan ``model`` for the given feeds (or, without feeds, :func:`batch_of_one`)."""
    feeds = batch_of_one(model) if feeds is None else feeds
    return plan_job(prepare(model, feeds), model, partitions, split_at)


def batch_of_one(model: Model) -> dict[str, np.ndarray]:
    """Zero feeds of the inputs' declared shapes with every symbolic dimension 1 (a batch of one):
    what planning without feeds assumes."""
    return {s.name: np.zeros(tuple(d if isinstance(d, int) else 1 for d in s.shape), s.dtype) for s in model.inputs}


def _manual_cuts(nodes: list[Node], split_at: Sequence[str]) -> list[int]:
    index = {n.name: i for i, n in enumerate(nodes)}
    cuts = []
    for name in split_at:
        if name not in index:
            raise GraphError(f"split point '{name}' is not a node that reaches the loss")
        if index[name] > 0:
            cuts.append(index[name])
    return sorted(set(cuts))


def _candidates(n: int, k: int) -> list[int]:
    """Positions a cut may take: every one for graphs of up to MAX_CANDIDATES nodes, evenly spaced
    ones beyond (k partitions need at least k + 1 candidate positions)."""
    limit = max(MAX_CANDIDATES, k + 1)
    return list(range(n + 1)) if n <= limit else sorted({0, n, *np.linspace(0, n, limit).round().astype(int)})


def _unlimited_cuts(nodes: list[Node], shapes: Mapping[str, ValueInfo], k: int) -> list[int]:
    """:func:`_best_cuts` without a memory limit, so there always are some."""
    cuts = _best_cuts(nodes, shapes, k)
    assert cuts is not None
    return cuts


def _best_cuts(
    nodes: list[Node], shapes: Mapping[str, ValueInfo], k: int, mm: MemoryModel | None = None, limit: float = 0
) -> list[int] | None:
    """Cut positions (start indices of partitions 1..k-1) minimising the slowest partition.

    Dynamic programming over candidate cut positions (:func:`_candidates`), so planning stays in
    milliseconds. With a memory model, partitions needing more than ``limit`` bytes are not
    allowed; None when no cut into k partitions avoids them.
    """
    n = len(nodes)
    if k <= 1:
        return [] if mm is None or mm.range(0, n).total <= limit else None
    cands = _candidates(n, k)
    fits = mm.needs(cands) <= limit if mm is not None else None
    flops = np.array([node_flops(nd, shapes) for nd in nodes], dtype=np.float64)
    prefix = np.concatenate([[0.0], np.cumsum(flops)])
    producer_pos = {o: i for i, nd in enumerate(nodes) for o in nd.outputs if o}
    size = {v: (shapes[v].nbytes if v in shapes else 0) for v in producer_pos}
    index = {pos: a for a, pos in enumerate(cands)}
    m = len(cands)
    # recv[a][b]: bytes the partition [cands[a], cands[b]) receives from earlier partitions (values
    # it reads that were produced before it starts), built incrementally per start.
    recv = np.zeros((m, m))
    for a, start in enumerate(cands[:-1]):
        seen: set[str] = set()
        total = 0.0
        for j in range(start, n):
            for v in nodes[j].inputs:
                if v in producer_pos and producer_pos[v] < start and v not in seen:
                    seen.add(v)
                    total += size[v]
            if j + 1 in index:
                recv[a][index[j + 1]] = total
    INF = float("inf")

    def cost(a: int, b: int) -> float:
        if fits is not None and not fits[a][b]:
            return INF
        return prefix[cands[b]] - prefix[cands[a]] + FLOPS_PER_BYTE * recv[a][b]

    best = np.full((k + 1, m), INF)
    choice = np.zeros((k + 1, m), dtype=np.int64)
    best[0][0] = 0.0
    for parts in range(1, k + 1):
        for b in range(parts, m):
            for a in range(parts - 1, b):
                if best[parts - 1][a] < INF:
                    c = max(best[parts - 1][a], cost(a, b))
                    if c < best[parts][b]:
                        best[parts][b], choice[parts][b] = c, a
    if best[k][m - 1] == INF:
        return None
    cuts, b = [], m - 1
    for parts in range(k, 0, -1):
        a = int(choice[parts][b])
        if parts > 1:
            cuts.append(cands[a])
        b = a
    return sorted(cuts)


def _build(nodes: list[Node], cuts: list[int], job: PreparedJob, model: Model, mm: MemoryModel) -> Plan:
    bounds = [0, *sorted(set(cuts) - {0, len(nodes)}), len(nodes)]
    groups = [nodes[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]
    where: dict[str, int] = {}
    for p, group in enumerate(groups):
        for nd in group:
            for o in nd.outputs:
                if o:
                    where[o] = p
    feeds = {s.name for s in model.inputs}
    boundaries: dict[str, Boundary] = {}
    parts: list[Partition] = []
    param_parts: dict[str, list[int]] = {}
    for p, group in enumerate(groups):
        reads = [i for nd in group for i in nd.inputs if i]
        uniq = list(dict.fromkeys(reads))
        params = [v for v in uniq if v in model.params]
        for v in params:
            param_parts.setdefault(v, []).append(p)
        inputs = [v for v in uniq if v in where and where[v] != p]
        for v in inputs:
            info = job.shapes.get(v)
            b = boundaries.get(v)
            if b is None:
                b = boundaries[v] = Boundary(
                    v,
                    where[v],
                    [],
                    info.shape if info else (),
                    info.dtype.name if info else "?",
                    info.nbytes if info else 0,
                )
            b.consumers.append(p)
        parts.append(
            Partition(
                index=p,
                nodes=group,
                params=params,
                constants=[v for v in uniq if v in model.constants],
                feeds=[v for v in uniq if v in feeds],
                inputs=inputs,
                outputs=[],
                flops=int(sum(node_flops(nd, job.shapes) for nd in group)),
            )
        )
    for b in boundaries.values():
        parts[b.producer].outputs.append(b.name)
    loss_part = where.get(job.loss, 0)
    if job.loss not in parts[loss_part].outputs:
        parts[loss_part].outputs.append(job.loss)
    memory = [mm.range(a, b) for a, b in zip(bounds, bounds[1:])]
    return Plan(parts, boundaries, job.loss, loss_part, param_parts, job.rewrites, memory)


def fmt_flops(f: float) -> str:
    """``2.10M``, ``1.50G``... FLOPs for plans and messages."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if f >= scale:
            return f"{f / scale:.2f}{unit}"
    return str(int(f))


def _list(items: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
