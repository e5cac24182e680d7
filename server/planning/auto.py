"""``auto`` partitions, micro-batches and replicas: K, M and R chosen from the job and the cluster.

:func:`choose` decides, in this order:

- **K, partitions:** the fewest that fit in memory (:func:`~gradserve.server.planning.partition.plan_job`
  with ``grow=True``): one when the whole job fits a node, more only when it does not.
- **R, replicas:** data-parallel copies of the K-partition pipeline, only out of capacity nobody
  is waiting for: with other jobs running or queued (``others``), R = 1, since whole jobs side by
  side serve a queue faster than split ones. On an idle cluster, as many copies as the *free* nodes
  hold (free nodes // K, packed into their memory, the batch split exactly) where the timing model
  predicts them faster.
- **M, micro-batches:** only where the K partitions run on nodes of their own (stages sharing a
  node share its cores, so pipelining there only adds calls), as many as the timing model predicts
  fastest: GPipe idles (K-1)/(M+K-1) of the time, and every micro-batch costs 2 K more calls.

Predictions come from :mod:`.timing`, with the per-call, per-byte and per-FLOP costs the engine
measured on its cluster (``costs``): auto never picks a plan predicted slower than R = M = 1.

An explicit number always means exactly that number (memory is still checked; a partition count
the graph cannot give is refused, :func:`~gradserve.server.planning.partition.check_partitions`).
Each reason says where its count came from: ``as asked``, or ``auto: <why>``. Manual cuts
(``split_at``) fix the partitions and choose nothing. This is the one decision of the Ray engine,
the server and ``gradserve plan``. On the wire, 0 means ``auto`` (see ``proto/v1/service.proto``);
:func:`~gradserve.server.planning.counts.count_to_wire`/:func:`~gradserve.server.planning.counts.count_from_wire`
(in :mod:`.counts`, which clients import without the planner) are the one translation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from gradserve.server.planning.batching import Split, batched_inputs, split_batch

# the counts live in a module of their own, which clients import without the planner; the names
# stay importable from here
from gradserve.server.planning.counts import AUTO, Count, count_from_wire, count_to_wire, parse_count  # noqa: F401
from gradserve.server.planning.memory import NodeInfo, describe_nodes, fmt_bytes, largest, pack
from gradserve.server.planning.partition import Plan, plan_job
from gradserve.server.planning.prepare import PreparedJob
from gradserve.server.planning.timing import Costs, Shape, predict
from gradserve.worker.graph import GraphError, Model

# At most this x K micro-batches are considered: GPipe's idle fraction (K-1)/(M+K-1) is then
# under 20%, and more only add calls.
MICRO_BATCHES_PER_PARTITION = 4


@dataclass
class Choice:
    """What :func:`choose` picked: K partitions, M micro-batches, R replicas, why (one line each),
    the plan (one micro-batch's shapes, memory per partition) and the batch split it checked."""

    k: int
    m: int
    r: int
    reasons: list[str]
    plan: Plan
    split: Split

    def describe(self) -> str:
        # "auto:" heads the lines only when something was chosen (see the reasons)
        head = "auto" if any(", auto: " in reason for reason in self.reasons) else "as asked"
        return "\n".join([f"{head}: {self.k} partitions, {self.m} micro-batches, {self.r} replicas", *self.reasons])


def choose(
    job: PreparedJob,
    model: Model,
    feeds: Mapping[str, np.ndarray],
    nodes: Sequence[NodeInfo],
    partitions: Count = AUTO,
    micro_batches: Count = AUTO,
    replicas: Count = AUTO,
    free: Sequence[NodeInfo] | None = None,
    split_at: Sequence[str] | None = None,
    others: int = 0,
    costs: Costs | None = None,
) -> Choice:
    """Pick K, M and R for ``job`` (prepared on the whole batch ``feeds``) on a cluster of ``nodes``
    (memory, see :func:`~gradserve.server.planning.memory.cluster_nodes`), replicas going to the
    ``free`` ones (default: all); ``split_at``: cut at these nodes instead (:func:`_at_cuts`).
    ``others``: jobs running or waiting besides this one; ``costs``: the cluster's measured costs
    (default: :class:`~gradserve.server.planning.timing.Costs`'s).
    Raises ResourceExhausted when the job fits in no way, GraphError when explicit partitions are
    more than the graph has nodes or explicit micro-batches x replicas cannot split the batch."""
    partitions, micro_batches, replicas = (parse_count(v) for v in (partitions, micro_batches, replicas))
    if split_at:
        return _at_cuts(job, model, feeds, split_at, micro_batches, replicas)
    free = list(nodes if free is None else free)
    reasons: list[str] = []

    # K: the fewest partitions that fit (on the whole batch: the M micro-batches GPipe keeps in
    # flight hold about the whole batch's activations, whatever M).
    grow = partitions == AUTO
    plan = plan_job(job, model, 1 if grow else int(partitions), cluster=nodes or None, grow=grow)
    k = len(plan.partitions)
    needs = [m.total for m in plan.memory]
    flops = sum(p.flops for p in plan.partitions)
    if not grow:
        reasons.append(f"partitions: {k}, as asked")
    elif not nodes:
        reasons.append("partitions: 1, auto: no cluster described, memory not checked")
    elif k == 1:
        reasons.append(
            f"partitions: 1, auto: the whole job needs ~{fmt_bytes(needs[0])}, "
            f"which fits one node ({describe_nodes(nodes)})"
        )
    else:
        whole = plan_job(job, model, 1).memory[0].total
        reasons.append(
            f"partitions: {k}, auto: the whole job needs ~{fmt_bytes(whole)}, the largest node has "
            f"{fmt_bytes(largest(nodes).memory_bytes)}; {k} partitions need at most "
            f"{fmt_bytes(max(needs))} each"
        )

    batch = _batch_size(model, feeds)
    shape = Shape(
        flops,
        sum(b.nbytes for b in plan.boundaries.values()),
        sum(int(np.asarray(v).nbytes) for v in model.params.values()),
    )
    timing = _Timing(shape, costs or Costs(), min((n.cpus for n in nodes), default=1), len(nodes))
    r = _replicas(replicas, k, needs, batch, free, others, timing, model, job, feeds, reasons)
    m = _micro_batches(micro_batches, k, r, batch, timing, model, job, feeds, reasons)
    split = split_batch(model, job, feeds, m * r)
    final = plan_job(split.job, split.model, k, cluster=nodes or None, micro_batches=m, replicas=r)
    return Choice(k, m, r, reasons, final, split)


@dataclass(frozen=True)
class _Timing:
    """What predictions need beyond the counts: the job's shape, the cluster's costs, the cores of
    its smallest node and how many nodes it has."""

    shape: Shape
    costs: Costs
    cpus: float  # NodeInfo.cpus: Ray counts fractional CPUs
    nodes: int

    def seconds(self, k: int, m: int, r: int) -> float:
        """Predicted seconds of K x M x R: spread over nodes of their own where there are enough."""
        return predict(self.shape, k, m, r, self.cpus, self.nodes >= k * r, self.costs)

    def ms(self, k: int, m: int, r: int) -> str:
        return f"{self.seconds(k, m, r) * 1e3:.1f} ms"


def _replicas(
    asked: Count,
    k: int,
    needs: list[int],
    batch: int | None,
    free: Sequence[NodeInfo],
    others: int,
    timing: _Timing,
    model: Model,
    job: PreparedJob,
    feeds: Mapping[str, np.ndarray],
    reasons: list[str],
) -> int:
    if asked != AUTO:
        reasons.append(f"replicas: {asked}, as asked")
        return int(asked)
    if others > 0:
        reasons.append(
            f"replicas: 1, auto: {others} other job{'s' if others != 1 else ''} running or waiting: "
            f"whole jobs side by side serve a queue faster than split ones"
        )
        return 1
    spare = len(free) // k if free else 1
    fits = [r for r in range(2, min(spare, batch or 1) + 1) if pack(needs * r, free) is not None]
    best = min([1, *fits], key=lambda r: (timing.seconds(k, 1, r), r))
    if best == 1:
        if not fits:
            reasons.append(f"replicas: 1, auto: no spare node for a second copy ({len(free)} free, {k} per copy)")
        else:
            reasons.append(
                f"replicas: 1, auto: predicted {timing.ms(k, 1, 1)}, {fits[0]} copies "
                f"{timing.ms(k, 1, fits[0])} (the job is too small to share out; {timing.costs.describe()})"
            )
        return 1
    error = _split_error(model, job, feeds, best)
    if error is not None:
        reasons.append(f"replicas: 1, auto: the batch cannot be split ({error})")
        return 1
    reasons.append(
        f"replicas: {best}, auto: {len(free)} free node{'s' if len(free) != 1 else ''} hold {best} copies "
        f"of {k} partition{'s' if k != 1 else ''}, each on a slice of the batch of {batch}: predicted "
        f"{timing.ms(k, 1, best)}, one copy {timing.ms(k, 1, 1)}"
    )
    return best


def _micro_batches(
    asked: Count,
    k: int,
    r: int,
    batch: int | None,
    timing: _Timing,
    model: Model,
    job: PreparedJob,
    feeds: Mapping[str, np.ndarray],
    reasons: list[str],
) -> int:
    if asked != AUTO:
        reasons.append(f"micro-batches: {asked}, as asked")
        return int(asked)
    if k == 1:
        reasons.append("micro-batches: 1, auto: one partition, nothing to pipeline")
        return 1
    if timing.nodes < k * r:
        reasons.append(
            f"micro-batches: 1, auto: the {k * r} partitions share {timing.nodes} "
            f"node{'s' if timing.nodes != 1 else ''}, so pipelining would only add calls"
        )
        return 1
    per_replica = (batch or 1) // r
    candidates = range(1, max(1, min(MICRO_BATCHES_PER_PARTITION * k, per_replica)) + 1)
    fastest = min(timing.seconds(k, m, r) for m in candidates)
    # the fewest micro-batches within 2% of the fastest: fewer calls, and a gain that small is noise
    m = next(m for m in candidates if timing.seconds(k, m, r) <= 1.02 * fastest)
    if m == 1:
        reasons.append(
            f"micro-batches: 1, auto: too little work per step to pipeline (predicted "
            f"{timing.ms(k, 1, r)}, 2 micro-batches {timing.ms(k, 2, r)}; {timing.costs.describe()})"
        )
        return 1
    error = _split_error(model, job, feeds, m * r)
    if error is not None:
        reasons.append(f"micro-batches: 1, auto: the batch cannot be split ({error})")
        return 1
    idle = (k - 1) / (m + k - 1)
    reasons.append(
        f"micro-batches: {m}, auto: pipelining {k} partitions idles {100 * idle:.0f}% of the time "
        f"(1 micro-batch: {100 * (k - 1) / k:.0f}%): predicted {timing.ms(k, m, r)}, "
        f"1 micro-batch {timing.ms(k, 1, r)}"
    )
    return m


def _at_cuts(
    job: PreparedJob,
    model: Model,
    feeds: Mapping[str, np.ndarray],
    split_at: Sequence[str],
    micro_batches: Count,
    replicas: Count,
) -> Choice:
    """Manual cuts: the partitions are fixed by ``split_at`` and nothing is chosen (``auto``
    micro-batches and replicas are 1); memory is not checked against a cluster."""
    m, r = (1 if c == AUTO else int(c) for c in (micro_batches, replicas))
    split = split_batch(model, job, feeds, m * r)
    plan = plan_job(split.job, split.model, len(split_at) + 1, split_at, micro_batches=m)
    reasons = [f"partitions: {len(plan.partitions)}, cut at the nodes asked for"]
    for name, asked, value in (("micro-batches", micro_batches, m), ("replicas", replicas, r)):
        reasons.append(
            f"{name}: {value}, " + ("auto: nothing is chosen with manual cuts" if asked == AUTO else "as asked")
        )
    return Choice(len(plan.partitions), m, r, reasons, plan, split)


def _batch_size(model: Model, feeds: Mapping[str, np.ndarray]) -> int | None:
    try:
        return batched_inputs(model, feeds)[1]
    except GraphError:
        return None


def _split_error(model: Model, job: PreparedJob, feeds: Mapping[str, np.ndarray], parts: int) -> str | None:
    """Why the batch cannot be split into ``parts`` exact slices, or None when it can."""
    try:
        split_batch(model, job, feeds, parts)
    except GraphError as exc:
        return str(exc)
    return None
