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
        self.failed: dict[str, BaseException] = {}  # job id -> the error one of its steps raised here
        self.blas = ThreadpoolController()  # BLAS threads are set per step by the engine
        keep_freed_memory()

    def load(self, key: str, spec: StageSpec, constants: dict[str, np.ndarray], names: Sequence[str], *params: np.ndarray) -> None:
        """Host a partition under ``key``; ``params`` arrive as object-store refs Ray resolved."""
        self.stages[key] = Stage(spec, dict(zip(names, params)), constants)

    def unload(self, key: str) -> None:
        """Drop a partition (its model was evicted or its weights changed)."""
        self.stages.pop(key, None)

    def run(self, key: str, job_id: str, threads: Sequence[int], steps: Sequence[tuple], names: Sequence[str],
            *values: Any) -> Any:
        """Run consecutive steps of one job on the stage ``key``, in one call (see
        :func:`gradserve.server.planning.schedule.calls`). ``steps`` are tuples

        - ``("forward", mb, n)``: forward of micro-batch ``mb`` on the next ``n`` values (feeds and
          boundary inputs, labelled by ``names``); returns the partition's outputs;
        - ``("backward", mb, n, defer)``: errors at the outputs in (the next ``n`` values, repeated
          names when several partitions sent one), errors at the boundary inputs out;
        - ``("weights", replica, n)``: dL/dw of the job and this stage's compute seconds, plus the
          next ``n`` values: other replicas' results for this stage, summed in (a reduction tree
          instead of every replica's dL/dw travelling to the driver). Ends the job here.

        ``threads``: BLAS threads for (forward/backward steps, the weight step). Returns every
        step's results in order, each as its own object (``num_returns``; one ``None`` when there
        are none: a backward that sends no error returns nothing). A step after a failed
        step of the same job raises that failure again, so an error nobody else reads still
        reaches the driver through the job's weight step.
        """
        stage = self.stages[key]
        if job_id in self.failed:
            raise self.failed[job_id]
        out: list[Any] = []
        at = 0
        try:
            for step in steps:
                phase, n = step[0], step[2]
                args, labels = values[at:at + n], names[at:at + n]
                at += n
                cancelled = job_id in self.cancelled
                if phase == "forward":
                    if cancelled:
                        out += [None] * len(stage.spec.outputs)
                        continue
                    with self.blas.limit(limits=threads[0], user_api="blas"):
                        out += stage.forward(job_id, step[1], dict(zip(labels, args)))
                elif phase == "backward":
                    if cancelled:
                        out += [None] * len(stage.spec.wrt_inputs)
                        continue
                    with self.blas.limit(limits=threads[0], user_api="blas"):
                        out += stage.backward(job_id, step[1], list(zip(labels, args)), step[3])
                else:
                    if cancelled:
                        out.append(({}, {}))
                        continue
                    with self.blas.limit(limits=threads[1], user_api="blas"):
                        grads, seconds = stage.weight_grads(job_id)
                    by_replica = {step[1]: seconds}
                    for other_grads, other_seconds in args:  # other replicas' results: summed here
                        for name, g in other_grads.items():
                            grads[name] = grads[name] + g if name in grads else g
                        by_replica.update(other_seconds)
                    out.append((grads, by_replica))
        except BaseException as exc:
            self.failed[job_id] = exc
            raise
        if not out:  # a call that returns nothing still returns one object, to be awaited
            return None
        return out[0] if len(out) == 1 else tuple(out)

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
        self.failed.pop(job_id, None)

    @ray.method(concurrency_group="control")
    def job_count(self) -> int:
        """Jobs with state on this actor (0 when idle: nothing leaks)."""
        return sum(stage.job_count() for stage in list(self.stages.values()))  # runs beside load/unload

    @ray.method(concurrency_group="control")
    def where(self) -> dict[str, Any]:
        """The cluster node and process this actor runs in."""
        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "pid": os.getpid(), "ip": ray.util.get_node_ip_address()}



StageActor = ray.remote(concurrency_groups={"control": 1})(StageHost)
