"""Pipeline schedules: in what order each partition runs forward and backward on micro-batches.

A schedule is a list of steps. The engine submits them in this order; each actor runs its own
steps in submission order, and a step starts once its inputs exist, so partitions work on different
micro-batches at once. Idle fraction of GPipe with S stages and M micro-batches: (S-1)/(M+S-1).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Step:
    """One step of a schedule: run ``phase`` of ``partition`` on ``micro_batch``."""

    phase: str  # "forward" or "backward"
    partition: int
    micro_batch: int


def gpipe(partitions: int, micro_batches: int) -> list[Step]:
    """GPipe: every micro-batch forward through all partitions, then every backward in reverse.

    Partitions are numbered in topological order (every boundary goes from a lower to a higher
    partition), so submitting forwards in increasing and backwards in decreasing partition order
    means no actor ever waits on a step queued behind it.
    """
    steps = [Step("forward", p, mb) for mb in range(micro_batches) for p in range(partitions)]
    steps += [Step("backward", p, mb) for mb in range(micro_batches) for p in reversed(range(partitions))]
    return steps
