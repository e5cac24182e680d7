"""The inline engine: the whole model, forward and reverse, in this process."""

from __future__ import annotations

import threading
import time
from typing import Iterable, Mapping

import numpy as np

from gradserve.server.events import Progress, ProgressEvent, check_cancelled
from gradserve.server.planning.prepare import PreparedJob, prepare
from gradserve.server.result import Result
from gradserve.server.session import Checkpoint, Session
from gradserve.worker import kernels
from gradserve.worker.ops import blas
from gradserve.worker.autodiff import backward, compile_program, forward
from gradserve.worker.graph import GraphError, Model
from gradserve.worker.memory import keep_freed_memory
from gradserve.worker.optim import clip_scale, local_sq_norm


class InlineEngine:
    """Computes the loss and dL/dw in the calling process. No Ray, no server: the reference every
    other engine is checked against."""

    name = "inline"
    splits = False  # the whole graph in one process: no partitions, micro-batches or replicas (engines.Engine)

    def __init__(self, warm_up: bool = False) -> None:
        """``warm_up``: load every compiled kernel now (0.6 s from the cache; compiled once per
        machine), as a long-lived process (the server) wants so that no job pays it. Otherwise
        each kernel loads the first time an op calls it (~20 ms), and small jobs, whose ops take
        numpy's paths, never import numba: what a one-job process (the CLI) wants."""
        keep_freed_memory()  # activations are reused step after step; see gradserve.worker.memory
        if warm_up:  # kernels use gradserve.worker.kernels' default thread budget
            kernels.warm_up()
        blas.backend()  # the BLAS library chosen and loaded, also before the first job

    def gradients(
        self,
        model: Model,
        feeds: Mapping[str, np.ndarray],
        *,
        input_grads: Iterable[str] = (),
        progress: Progress = None,
        cancelled: threading.Event | None = None,
        prepared: PreparedJob | None = None,
    ) -> Result:
        """Loss and dL/dw for every parameter of ``model`` on ``feeds``; ``input_grads`` names
        inputs whose dL/dx is returned too. ``progress`` is called with a ProgressEvent per phase;
        setting ``cancelled`` stops the job with JobCancelled at the next phase boundary.
        ``prepared``: the job as the caller already prepared it for these ``model``, ``feeds``
        and ``input_grads`` (the server does, to refuse bad input before queueing)."""
        report = progress or (lambda event: None)
        t0 = time.perf_counter()
        job = prepared or prepare(model, feeds, input_grads)
        sources = [*feeds, *model.params, *model.constants]
        program = compile_program(list(job.nodes), sources, [job.loss], job.wrt)
        t1 = time.perf_counter()
        check_cancelled(cancelled)
        report(ProgressEvent("forward", 0, done=False, total=2))
        tape = forward(program, {**model.constants, **model.params, **feeds})
        loss = tape.outputs[job.loss]
        if loss.size != 1:
            raise GraphError(f"loss '{job.loss}' must be a scalar, but has shape {loss.shape}")
        t2 = time.perf_counter()
        report(ProgressEvent("forward", 0, total=2))
        check_cancelled(cancelled)
        report(ProgressEvent("backward", 0, done=False, total=2))
        errors = backward(program, tape, {job.loss: np.ones_like(loss)})
        t3 = time.perf_counter()
        report(ProgressEvent("backward", 0, total=2))
        grads = {p: errors[p] if p in errors else np.zeros_like(model.params[p]) for p in job.params}
        inputs = {x: errors[x] if x in errors else np.zeros_like(feeds[x]) for x in job.input_grads}
        info = {
            "engine": self.name,
            "seconds": {"prepare": t1 - t0, "forward": t2 - t1, "backward": t3 - t2},
            "unreached": [p for p in job.params if p not in errors],
        }
        return Result(float(loss.reshape(())), grads, inputs, info)

    def session(self, model: Model, optimizer, **options) -> "InlineSession":
        """A training session whose weights and optimizer state live in this process (see
        :class:`gradserve.server.session.Session` for ``optimizer`` and ``options``)."""
        return InlineSession(self, model, optimizer, **options)

    def close(self) -> None:
        """Nothing to release; present so every engine can be used the same way."""

    def __enter__(self) -> "InlineEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class InlineSession(Session):
    """A training session in this process: the reference the Ray engine's sessions are checked against."""

    def __init__(
        self, engine: InlineEngine, model: Model, optimizer, *, start: "Checkpoint | None" = None, **options
    ) -> None:
        """``start``: a checkpoint to go on from (a server restarting its sessions)."""
        super().__init__(model, optimizer, **options)
        self._engine = engine
        self._states = self.groups.init_state(self.model.params)
        if start is not None:
            self.steps = start.step
            self._set_weights(start.weights)
            for name, state in start.states.items():
                for key, value in state.items():
                    np.copyto(self._states[name][key], value)

    def _step(self, feeds, number, lr, return_grads, progress):
        result = self._engine.gradients(self.model, feeds, progress=progress)
        scale = 1.0
        if self.max_norm is not None:
            scale = clip_scale(local_sq_norm(result.grads.values()), self.max_norm)
        # A parameter the loss does not reach is left alone (no decay, no momentum), as torch.optim
        # leaves one whose .grad is None, and as the Ray engine's trainers do.
        unreached = set(result.info["unreached"])
        grads = {name: g for name, g in result.grads.items() if name not in unreached}
        params = {name: self.model.params[name] for name in grads}
        self.groups.step(params, grads, self._states, number, lr, scale)
        return result.loss, result.grads, result.info

    def _gradients(self, feeds) -> Result:
        return self._engine.gradients(self.model, feeds)

    def _set_weights(self, values) -> None:
        for name, value in values.items():
            np.copyto(self.model.params[name], value)

    def _weights(self, names):
        return {name: self.model.params[name].copy() for name in names}

    def _take_checkpoint(self):
        return (
            self._weights(list(self.model.params)),
            {name: {k: v.copy() for k, v in state.items()} for name, state in self._states.items()},
        )
