"""What one worker computes for one partition: forward, backward, weight gradients.

A :class:`Stage` holds a partition's compiled program, its parameters and constants, and per-job
state (tapes per micro-batch, accumulated weight gradients) keyed by job id. It knows nothing of
Ray, plans or gRPC: the Ray actor in :mod:`gradserve.worker.actor` wraps it, and tests drive it
directly. Backward is split as in zero-bubble pipelining: :meth:`backward` returns the errors other
stages wait for; :meth:`weight_grads` computes dL/dw afterwards.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from gradserve.worker.autodiff import Program, Tape, backward, backward_deferred, compile_program, forward
from gradserve.worker.graph import Node


@dataclass
class StageSpec:
    """The static description of a partition, as the planner hands it to a worker."""

    nodes: list[Node]
    feeds: list[str]
    inputs: list[str]  # boundary values received
    outputs: list[str]  # boundary values handed on (and the loss)
    params: list[str]
    constants: list[str]
    wrt_inputs: list[str]  # boundary inputs and feeds whose error is sent back


@dataclass
class _JobState:
    tapes: dict[int, Tape] = field(default_factory=dict)  # micro-batch -> tape awaiting backward
    deferred: list[Tape] = field(default_factory=list)  # tapes holding deferred weight-gradient work
    grads: dict[str, np.ndarray] = field(default_factory=dict)  # weight gradients summed so far
    seconds: dict[str, float] = field(default_factory=lambda: {"forward": 0.0, "backward": 0.0, "weights": 0.0})


class Stage:
    """One partition, ready to run many jobs (each keyed by ``job_id``, micro-batches by ``mb``)."""

    def __init__(self, spec: StageSpec, params: Mapping[str, np.ndarray], constants: Mapping[str, np.ndarray]):
        self.spec = spec
        self.params = {p: params[p] for p in spec.params}
        self.constants = {c: constants[c] for c in spec.constants}
        sources = [*spec.feeds, *spec.inputs, *spec.params, *spec.constants]
        self.program: Program = compile_program(spec.nodes, sources, spec.outputs, [*spec.params, *spec.wrt_inputs])
        self.jobs: dict[str, _JobState] = {}

    def forward(self, job_id: str, mb: int, values: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run the partition on feeds + boundary inputs; return the outputs in ``spec.outputs`` order."""
        t = time.perf_counter()
        env = {**self.constants, **self.params, **values}
        tape = forward(self.program, env)
        state = self.jobs.setdefault(job_id, _JobState())
        state.tapes[mb] = tape
        state.seconds["forward"] += time.perf_counter() - t
        return [tape.outputs[o] for o in self.spec.outputs]

    def backward(
        self, job_id: str, mb: int, errors: Sequence[tuple[str, np.ndarray | None]], defer: bool = True
    ) -> list[np.ndarray | None]:
        """Errors at this partition's outputs in, as (value, error) pairs -- a value read by several
        partitions gets one pair from each, and they are summed here, where it was produced. Errors
        at ``spec.wrt_inputs`` out (``None`` where none reaches an input).

        With ``defer`` the weight gradients wait for :meth:`weight_grads`, so the errors another
        stage waits for leave first (the zero-bubble split); without it they are computed now, which
        is cheaper when nothing could run meanwhile (one micro-batch, stages sharing the cores).
        """
        t = time.perf_counter()
        state = self.jobs[job_id]
        tape = state.tapes.pop(mb)
        given: dict[str, np.ndarray] = {}
        for name, err in errors:
            if err is not None:
                out = tape.outputs.get(name)
                if out is not None and (err.shape != out.shape or err.dtype != out.dtype):
                    err = np.broadcast_to(err, out.shape).astype(out.dtype)  # the loss seed: a bare weight
                given[name] = given[name] + err if name in given else err
        errs = backward(self.program, tape, given, defer=self.spec.params if defer else ())
        if defer:
            state.deferred.append(tape)
        else:
            _add_into(state.grads, {p: errs[p] for p in self.spec.params if p in errs})
        state.seconds["backward"] += time.perf_counter() - t
        return [errs.get(v) for v in self.spec.wrt_inputs]

    def weight_grads(self, job_id: str) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """dL/dw for this partition's parameters, summed over the job's micro-batches, and the
        seconds this stage computed (forward, backward, weights); ends the job."""
        t = time.perf_counter()
        state = self.jobs.pop(job_id, None)
        if state is None:
            return {}, {}
        _add_into(state.grads, backward_deferred(self.program, state.deferred))
        state.seconds["weights"] = time.perf_counter() - t
        return state.grads, state.seconds

    def end_job(self, job_id: str) -> None:
        """Drop everything held for ``job_id`` (after success, failure or cancel)."""
        self.jobs.pop(job_id, None)

    def job_count(self) -> int:
        return len(self.jobs)


def _add_into(total: dict[str, np.ndarray], more: Mapping[str, np.ndarray]) -> None:
    for name, g in more.items():
        total[name] = total[name] + g if name in total else g
