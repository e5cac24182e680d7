"""Measuring what a call, a byte and a FLOP cost on this cluster, for ``auto``'s predictions
(:mod:`gradserve.server.planning.timing`). Taken when the engine first has a worker, and again
every ``REFRESH_SECONDS`` (the cluster's load and its nodes change)."""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any

import numpy as np
import ray

from gradserve.server.planning.timing import Costs

log = logging.getLogger(__name__)

REFRESH_SECONDS = 600.0
_CALLS = 7  # round trips timed (median)
_PROBE_BYTES = 8 << 20  # one put into the object store
_PRODUCT = 384  # a float32 product of this size on one core (~3-6 ms): the FLOP rate of BLAS-bound work


def measure(actor: Any | None) -> Costs:
    """Costs measured now: the median round trip of a no-op call to ``actor`` (a pool actor; the
    default when there is none yet), a put of 8 MiB into the object store, and one core's FLOP
    rate on a matrix product (threads limited to one)."""
    default = Costs()
    call = default.call_seconds
    if actor is not None:
        ray.get(actor.job_count.remote())  # the first call may pay for a connection
        times = []
        for _ in range(_CALLS):
            t = time.perf_counter()
            ray.get(actor.job_count.remote())
            times.append(time.perf_counter() - t)
        call = statistics.median(times)
    probe = np.ones(_PROBE_BYTES // 8)
    t = time.perf_counter()
    ref = ray.put(probe)
    put = max(time.perf_counter() - t, 1e-6)
    del ref
    from threadpoolctl import threadpool_limits

    a = np.ones((_PRODUCT, _PRODUCT), np.float32)
    with threadpool_limits(1):
        a @ a  # warm
        best = min(_timed(lambda: a @ a) for _ in range(3))
    costs = Costs(call_seconds=call, byte_seconds=put / _PROBE_BYTES, flop_seconds=best / (2 * _PRODUCT**3))
    log.info("cluster costs measured: %s", costs.describe())
    return costs


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t
