"""``auto`` partitions, micro-batches and replicas: K, M and R chosen from the job and the cluster.

:func:`choose` decides, in this order:

- **K, partitions:** the fewest that fit in memory (:func:`~gradserve.server.planning.partition.plan_job`
  with ``grow=True``): one when the whole job fits a node, more only when it does not.
- **R, replicas:** data-parallel copies of the K-partition pipeline on the *free* nodes left
  (free nodes // K), as long as each replica's slice of the batch keeps ``MIN_SLICE_FLOPS`` of
  work (below that, Ray's per-call overhead costs more than the parallelism saves), the batch
  can be split exactly (:func:`~gradserve.server.planning.batching.split_batch`) and the copies
  pack into the nodes' memory.
- **M, micro-batches:** only where pipelining pays, i.e. K > 1: GPipe idles (K-1)/(M+K-1) of the
  time, so M = ``MICRO_BATCHES_PER_PARTITION`` x K (under 20% idle), capped by the batch and by
  ``MIN_STEP_FLOPS`` of work per step; M = 1 when the batch cannot be split.

An explicit number always means exactly that number (memory is still checked). On the wire, 0
means ``auto`` (see ``proto/v1/service.proto``); :func:`count_to_wire`/:func:`count_from_wire`
are the one translation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Mapping, Sequence, Union

import numpy as np

from gradserve.server.planning.batching import Split, _batched_inputs, split_batch
from gradserve.server.planning.memory import NodeInfo, describe_nodes, fmt_bytes, largest, pack
from gradserve.server.planning.partition import Plan, fmt_flops, plan_job
from gradserve.server.planning.prepare import PreparedJob
from gradserve.worker.graph import GraphError, Model

AUTO = "auto"
Count = Union[int, Literal["auto"]]

# A replica's slice of the batch must carry at least this many forward FLOPs (~10-30 ms on one
# core) to beat the cost of more actor calls and of summing another copy of the gradients.
MIN_SLICE_FLOPS = 1e8
# One (partition, micro-batch) step must carry at least this many forward FLOPs: an actor call
# through Ray costs about a millisecond.
MIN_STEP_FLOPS = 2e7
# M = this x K micro-batches: GPipe's idle fraction (K-1)/(M+K-1) stays under 20%.
MICRO_BATCHES_PER_PARTITION = 4


def parse_count(text: str | int) -> Count:
    """``"auto"`` or a whole number >= 1 (CLI values, Python arguments); ValueError otherwise."""
    if isinstance(text, str) and text.strip().lower() == AUTO:
        return AUTO
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise ValueError(f"expected 'auto' or a whole number >= 1, got {text!r}") from None
    if value < 1 or (isinstance(text, float) and text != value):
        raise ValueError(f"expected 'auto' or a whole number >= 1, got {text!r}")
    return value


def count_to_wire(value: Count) -> int:
    """The JobOptions field for ``value``: 0 for auto, else the number (checked >= 1)."""
    value = parse_count(value)
    return 0 if value == AUTO else int(value)


def count_from_wire(value: int) -> Count:
    """A JobOptions field as Python: 0 (the proto3 default, so unset) means auto."""
    return AUTO if value == 0 else int(value)


@dataclass
class Choice:
    """What :func:`choose` picked: K partitions, M micro-batches, R replicas, why (one line each),
    the plan (one micro-batch's shapes, memory per partition) and the batch split it checked."""

    k: int
    m: int
    r: int
    reasons: list[str] = field(default_factory=list)
    plan: Plan | None = None
    split: Split | None = None

    def describe(self) -> str:
        return "\n".join([f"auto: {self.k} partitions, {self.m} micro-batches, {self.r} replicas", *self.reasons])


def choose(
    job: PreparedJob,
    model: Model,
    feeds: Mapping[str, np.ndarray],
    nodes: Sequence[NodeInfo],
    partitions: Count = AUTO,
    micro_batches: Count = AUTO,
    replicas: Count = AUTO,
    free: Sequence[NodeInfo] | None = None,
) -> Choice:
    """Pick K, M and R for ``job`` (prepared on the whole batch ``feeds``) on a cluster of ``nodes``
    (memory, see :func:`~gradserve.server.planning.memory.cluster_nodes`), replicas going to the
    ``free`` ones (default: all). Raises ResourceExhausted when the job fits in no way, GraphError
    when explicit micro-batches x replicas cannot split the batch."""
    partitions, micro_batches, replicas = (parse_count(v) for v in (partitions, micro_batches, replicas))
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
        reasons.append("partitions: 1 (no cluster described: memory not checked)")
    elif k == 1:
        reasons.append(f"partitions: 1: the whole job needs ~{fmt_bytes(needs[0])}, "
                       f"which fits one node ({describe_nodes(nodes)})")
    else:
        whole = plan_job(job, model, 1).memory[0].total
        reasons.append(f"partitions: {k}: the whole job needs ~{fmt_bytes(whole)}, the largest node has "
                       f"{fmt_bytes(largest(nodes).memory_bytes)}; {k} partitions need at most "
                       f"{fmt_bytes(max(needs))} each")

    batch = _batch_size(model, feeds)
    r = _replicas(replicas, k, needs, flops, batch, nodes, free, model, job, feeds, reasons)
    m = _micro_batches(micro_batches, k, r, flops, batch, model, job, feeds, reasons)
    split = split_batch(model, job, feeds, m * r)
    final = plan_job(split.job, split.model, k, cluster=nodes or None, micro_batches=m, replicas=r)
    return Choice(k, m, r, reasons, final, split)


def _replicas(asked: Count, k: int, needs: list[int], flops: int, batch: int | None,
              nodes: Sequence[NodeInfo], free: Sequence[NodeInfo], model: Model, job: PreparedJob,
              feeds: Mapping[str, np.ndarray], reasons: list[str]) -> int:
    if asked != AUTO:
        reasons.append(f"replicas: {asked}, as asked")
        return int(asked)
    spare = len(free) // k if free else 1
    by_work = int(flops // MIN_SLICE_FLOPS)
    r = max(1, min(spare, by_work, batch or 1))
    while r > 1 and free and pack(needs * r, free) is None:
        r -= 1
    error = _split_error(model, job, feeds, r) if r > 1 else None
    if error is not None:
        reasons.append(f"replicas: 1: the batch cannot be split ({error})")
        return 1
    if r > 1:
        reasons.append(f"replicas: {r}: {len(free)} free node{'s' if len(free) != 1 else ''} hold {r} copies of "
                       f"{k} partition{'s' if k != 1 else ''}, each on a slice of the batch of {batch}")
    elif spare <= 1:
        reasons.append(f"replicas: 1: no spare node for a second copy ({len(free)} free, {k} per copy)")
    else:
        reasons.append(f"replicas: 1: the job ({fmt_flops(flops)} FLOPs forward) is too small to share out "
                       f"(a replica pays from {fmt_flops(MIN_SLICE_FLOPS)} each)")
    return r


def _micro_batches(asked: Count, k: int, r: int, flops: int, batch: int | None, model: Model,
                   job: PreparedJob, feeds: Mapping[str, np.ndarray], reasons: list[str]) -> int:
    if asked != AUTO:
        reasons.append(f"micro-batches: {asked}, as asked")
        return int(asked)
    if k == 1:
        reasons.append("micro-batches: 1: one partition, nothing to pipeline")
        return 1
    per_replica = (batch or 1) // r
    m = max(1, min(MICRO_BATCHES_PER_PARTITION * k, per_replica, int(flops // (r * k * MIN_STEP_FLOPS))))
    if m == 1:
        reasons.append(f"micro-batches: 1: too little work per step to pipeline ({fmt_flops(flops)} FLOPs, "
                       f"batch {batch})")
        return 1
    error = _split_error(model, job, feeds, m * r)
    if error is not None:
        reasons.append(f"micro-batches: 1: the batch cannot be split ({error})")
        return 1
    idle = (k - 1) / (m + k - 1)
    reasons.append(f"micro-batches: {m}: pipelining {k} partitions idles {100 * idle:.0f}% of the time "
                   f"(1 micro-batch: {100 * (k - 1) / k:.0f}%)")
    return m


def _batch_size(model: Model, feeds: Mapping[str, np.ndarray]) -> int | None:
    try:
        return _batched_inputs(model, feeds)[1]
    except GraphError:
        return None


def _split_error(model: Model, job: PreparedJob, feeds: Mapping[str, np.ndarray], parts: int) -> str | None:
    """Why the batch cannot be split into ``parts`` exact slices, or None when it can."""
    try:
        split_batch(model, job, feeds, parts)
    except GraphError as exc:
        return str(exc)
    return None
