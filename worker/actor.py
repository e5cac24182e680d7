"""The Ray actor that hosts partitions (:class:`~gradserve.worker.stage.Stage`) for the engine.

A worker process costs about a second to start, so actors are pooled and each can host the stages
of several models, keyed by a stage key. Tensors move between actors as ObjectRefs passed as
top-level arguments, so Ray resolves them worker to worker through the object store (zero-copy and
read-only on one node); the driver passes references and never touches the tensors. Outputs are
returned as separate objects (``num_returns``) so each consumer fetches only the values it reads.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import ray

from gradserve.worker.stage import Stage, StageSpec


class StageHost:
    """Actor body: loads stages (parameters come from the object store) and runs their steps."""

    def __init__(self) -> None:
        self.stages: dict[str, Stage] = {}

    def load(self, key: str, spec: StageSpec, constants: dict[str, np.ndarray], names: Sequence[str], *params: np.ndarray) -> None:
        self.stages[key] = Stage(spec, dict(zip(names, params)), constants)

    def unload(self, key: str) -> None:
        self.stages.pop(key, None)

    def forward(self, key: str, job_id: str, mb: int, names: Sequence[str], *values: np.ndarray) -> Any:
        outs = self.stages[key].forward(job_id, mb, dict(zip(names, values)))
        return outs[0] if len(outs) == 1 else tuple(outs)

    def backward(self, key: str, job_id: str, mb: int, names: Sequence[str], *errors: np.ndarray | None) -> Any:
        errs = self.stages[key].backward(job_id, mb, list(zip(names, errors)))
        if not errs:
            return None  # one placeholder return, so the caller can still wait on the step
        return errs[0] if len(errs) == 1 else tuple(errs)

    def weight_grads(self, key: str, job_id: str, *after: Any) -> dict[str, np.ndarray]:
        """dL/dw of the stage. ``after``: the job's backward results on this stage, passed only so
        Ray runs this once they exist, and fails it if one of them failed."""
        return self.stages[key].weight_grads(job_id)

    def end_job(self, job_id: str) -> None:
        """Free whatever any stage holds for ``job_id``."""
        for stage in self.stages.values():
            stage.end_job(job_id)

    def job_count(self) -> int:
        """Jobs with state on this actor (0 when idle: nothing leaks)."""
        return sum(stage.job_count() for stage in self.stages.values())

    def where(self) -> dict[str, Any]:
        """The cluster node and process this actor runs in."""
        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "pid": os.getpid(), "ip": ray.util.get_node_ip_address()}


StageActor = ray.remote(StageHost)
