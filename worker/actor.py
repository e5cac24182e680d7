"""The Ray actor that hosts partitions (:class:`~gradserve.worker.stage.Stage`) for the engine.

A worker process costs about a second to start, so actors are pooled and each can host the stages
of several models, keyed by a stage key. Tensors move between actors as ObjectRefs passed as
top-level arguments, so Ray resolves them worker to worker through the object store (zero-copy and
read-only on one node); the driver passes references and never touches the tensors. Outputs are
returned as separate objects (``num_returns``) so each consumer fetches only the values it reads.

Steps run one at a time in submission order. :meth:`StageHost.cancel` runs in a separate
concurrency group, so it takes effect at once: the job's queued steps then return placeholders
instead of computing (Ray's own task cancellation would break the actor's in-order queue).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import ray
from threadpoolctl import ThreadpoolController

from gradserve.worker.memory import keep_freed_memory
from gradserve.worker.stage import Stage, StageSpec


class StageHost:
    """Actor body: loads stages (parameters come from the object store) and runs their steps."""

    def __init__(self) -> None:
        self.stages: dict[str, Stage] = {}
        self.cancelled: set[str] = set()
        self.blas = ThreadpoolController()  # BLAS threads are set per step by the engine
        keep_freed_memory()

    def load(self, key: str, spec: StageSpec, constants: dict[str, np.ndarray], names: Sequence[str], *params: np.ndarray) -> None:
        """Host a partition under ``key``; ``params`` arrive as object-store refs Ray resolved."""
        self.stages[key] = Stage(spec, dict(zip(names, params)), constants)

    def unload(self, key: str) -> None:
        """Drop a partition (its model was evicted or its weights changed)."""
        self.stages.pop(key, None)

    def forward(self, key: str, job_id: str, mb: int, threads: int, names: Sequence[str], *values: np.ndarray) -> Any:
        """Forward of micro-batch ``mb`` on feeds and boundary inputs (``names`` label ``values``);
        returns the partition's outputs as separate objects."""
        stage = self.stages[key]
        if job_id in self.cancelled:
            return _placeholders(len(stage.spec.outputs))
        with self.blas.limit(limits=threads, user_api="blas"):
            return _returns(stage.forward(job_id, mb, dict(zip(names, values))))

    def backward(
        self, key: str, job_id: str, mb: int, threads: int, defer: bool, names: Sequence[str], *errors: np.ndarray | None
    ) -> Any:
        """Backward of micro-batch ``mb``: errors at the outputs in (``names`` label them, repeated
        when several partitions sent one), errors at the boundary inputs out."""
        stage = self.stages[key]
        if job_id in self.cancelled:
            return _placeholders(max(1, len(stage.spec.wrt_inputs)))
        with self.blas.limit(limits=threads, user_api="blas"):
            errs = stage.backward(job_id, mb, list(zip(names, errors)), defer)
        return _returns(errs) if errs else None  # one placeholder return, so the step can be awaited

    def weight_grads(self, key: str, job_id: str, threads: int, *after: Any) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """dL/dw of the stage and its compute seconds. ``after``: the job's backward results on this
        stage, passed only so Ray runs this once they exist, and fails it if one of them failed."""
        if job_id in self.cancelled:
            return {}, {}
        with self.blas.limit(limits=threads, user_api="blas"):
            return self.stages[key].weight_grads(job_id)

    @ray.method(concurrency_group="control")
    def cancel(self, job_id: str) -> None:
        """From now on, skip the job's queued steps (runs at once, beside any running step)."""
        self.cancelled.add(job_id)

    def end_job(self, job_id: str) -> None:
        """Free whatever any stage holds for ``job_id``. Queued after the job's steps, so it runs
        once they are done or skipped."""
        for stage in self.stages.values():
            stage.end_job(job_id)
        self.cancelled.discard(job_id)

    @ray.method(concurrency_group="control")
    def job_count(self) -> int:
        """Jobs with state on this actor (0 when idle: nothing leaks)."""
        return sum(stage.job_count() for stage in list(self.stages.values()))  # runs beside load/unload

    @ray.method(concurrency_group="control")
    def where(self) -> dict[str, Any]:
        """The cluster node and process this actor runs in."""
        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "pid": os.getpid(), "ip": ray.util.get_node_ip_address()}


def _returns(values: list) -> Any:
    return values[0] if len(values) == 1 else tuple(values)


def _placeholders(n: int) -> Any:
    return None if n == 1 else (None,) * n


StageActor = ray.remote(concurrency_groups={"control": 1})(StageHost)
