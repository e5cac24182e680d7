"""How long a plan is predicted to take, from what a call, a byte and a FLOP cost on this cluster.

``auto`` (:mod:`.auto`) compares plans with :func:`predict` and never picks one predicted slower
than a whole job on one node. The model is deliberately small, so that ``gradserve plan`` and
``info["auto"]`` can say why a plan won:

- **compute**: forward + backward is ~3x the forward FLOPs, run at ``flop_seconds`` per FLOP on
  one core. Stages sharing a node share its cores: on one node no split computes faster than the
  whole job with all the node's cores. Stages on their own nodes run in parallel: a K-stage GPipe
  pipeline of M micro-batches takes (M + K - 1) / M of one stage's share per micro-batch, i.e.
  ``(M + K - 1) / (M K)`` of the job's work; R replicas each take 1/R of the batch.
- **calls**: every step on the critical path is one actor call through Ray (``call_seconds``,
  measured by the engine): 2 (M + K - 1) for the pipeline, plus a reduction tree of depth
  log2(R) for replicas.
- **bytes**: activations cross each boundary forward and their errors back (``byte_seconds``
  per byte), the replicas' dL/dw cross the reduction tree once per level.

The engine measures ``call_seconds`` and ``flop_seconds`` on the cluster when its pool starts and
refreshes them (:class:`Costs`); the defaults are what a 2-core VM measures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

FLOPS_PER_FORWARD_FLOP = 3.0  # forward + backward (two products per forward product)


@dataclass(frozen=True)
class Costs:
    """What one actor call (round trip), one byte moved between processes and one FLOP on one
    core cost, in seconds."""

    call_seconds: float = 1.5e-3
    byte_seconds: float = 1 / 2e9
    flop_seconds: float = 1 / 3e10

    def describe(self) -> str:
        return (
            f"a call {self.call_seconds * 1e3:.2f} ms, {1 / self.byte_seconds / 1e9:.1f} GB/s, "
            f"{1 / self.flop_seconds / 1e9:.0f} GFLOP/s per core"
        )


@dataclass(frozen=True)
class Shape:
    """What of a job the prediction needs: its forward FLOPs, the bytes crossing partition
    boundaries forward (the activations; their errors come back as many), and its parameters'
    bytes (the replicas' dL/dw)."""

    flops: float
    boundary_bytes: float = 0.0
    param_bytes: float = 0.0


def predict(job: Shape, k: int, m: int, r: int, cpus: float, spread: bool, costs: Costs) -> float:
    """Predicted seconds of one job split into ``k`` partitions x ``m`` micro-batches x ``r``
    replicas, on nodes of ``cpus`` cores each; ``spread``: every (replica, partition) gets a node
    of its own (else they all share one node)."""
    work = FLOPS_PER_FORWARD_FLOP * job.flops * costs.flop_seconds / max(1, cpus)  # the whole job, one node
    if spread:
        compute = work * (m + k - 1) / (m * k) / r
    else:
        compute = work  # stages and replicas on one node share its cores
    calls = 2 * (m + k - 1) + (math.ceil(math.log2(r)) if r > 1 else 0)
    moved = 2 * job.boundary_bytes / r + (job.param_bytes * math.ceil(math.log2(r)) if r > 1 else 0)
    return compute + calls * costs.call_seconds + moved * costs.byte_seconds


def baseline(job: Shape, cpus: float, costs: Costs) -> float:
    """Predicted seconds of the whole job as one partition on one node (K = M = R = 1)."""
    return predict(Shape(job.flops), 1, 1, 1, cpus, False, costs)
