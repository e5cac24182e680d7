"""Training sessions: a model's weights and optimizer state stay with the engine between steps.

A job sends the whole model and returns all of dL/dw; a training loop built on jobs ships the
model every step. A session keeps it: ``session.step(feeds)`` runs forward, backward and the
optimizer's update where the weights live -- in this process for the inline engine, on each
partition's worker for the Ray engine -- and returns the loss. What every engine's session shares
is here: the step count, the learning-rate schedule (evaluated here, as a schedule may be any
callable), clipping's settings, checks of names and shapes, and the session's life. The engines
supply where the weights are (:meth:`Session._step` and friends).

    with gradserve.local("ray").session(model, optimizer=gradserve.optim.Adam(lr=1e-3),
                                        partitions=2) as session:
        for x, y in batches:
            print(session.step({"x": x, "y": y}).loss)
        weights = session.weights()
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from gradserve.server.events import Progress
from gradserve.server.result import Result
from gradserve.worker.graph import GraphError, Model
from gradserve.worker.optim import Optimizer, ParamGroups, Schedule, check_schedule, lr_at


MAX_RESTORES = 3  # times one step may find the session's workers lost and go back to a checkpoint


@dataclass
class StepResult:
    """One training step: its loss (before the update), its number (from 1), and dL/dw when the
    step was asked for them (``return_grads=True``), else None."""

    loss: float
    step: int
    grads: dict[str, np.ndarray] | None = None
    info: dict[str, Any] = field(default_factory=dict)


class SessionClosed(RuntimeError):
    """A step or query on a session that was closed."""


@dataclass
class Checkpoint:
    """What a session restarts from: the weights and optimizer state after ``step`` steps."""

    step: int
    weights: dict[str, np.ndarray]
    states: dict[str, dict[str, np.ndarray]]


class Restored(Exception):
    """Raised by an engine's step when it lost the session's state and restarted it from its last
    checkpoint (``step``); :meth:`Session.step` then runs the step again from there."""

    def __init__(self, step: int) -> None:
        super().__init__(f"restored from step {step}")
        self.step = step


class Session:
    """What every engine's session shares. Open one with an engine's ``session(...)``."""

    def __init__(
        self,
        model: Model,
        optimizer: Optimizer | ParamGroups,
        *,
        param_groups: Mapping[str, Mapping[str, Any]] | None = None,
        max_norm: float | None = None,
        schedule: Schedule | None = None,
        checkpoint_steps: int | None = None,
        checkpoint_seconds: float | None = None,
        on_checkpoint: Callable[["Checkpoint"], None] | None = None,
    ) -> None:
        """``optimizer``: how every parameter is updated (:mod:`gradserve.optim`); ``param_groups``:
        per-parameter overrides of its hyper-parameters, by parameter name. ``max_norm``: clip
        dL/dw by its global norm first, as ``torch.nn.utils.clip_grad_norm_``. ``schedule``: the
        learning rate per step, a list of (step, lr) or a callable step -> lr.

        Checkpoints -- the weights and optimizer state, taken every ``checkpoint_steps`` steps or
        ``checkpoint_seconds`` seconds, whichever comes first, and by :meth:`checkpoint` -- are
        what a session whose workers were lost restarts from; ``on_checkpoint`` gets each (the
        server writes them to its state directory). Without either setting none is taken by
        itself, and a lost worker restarts the session from its first step."""
        groups = ParamGroups.of(optimizer, param_groups, max_norm)
        unknown = sorted(set(groups.overrides) - set(model.params))
        if unknown:
            raise GraphError(f"param_groups name '{unknown[0]}', which is not a parameter of the model")
        self.groups = groups
        self.max_norm = None if max_norm is None else float(max_norm)
        self.schedule = schedule if schedule is None or callable(schedule) else check_schedule(schedule)
        # The session's own copy of the model: its weights are the session's from now on.
        self.model = dataclasses.replace(model, params={n: np.array(p, copy=True) for n, p in model.params.items()})
        self.steps = 0  # updates applied so far
        self.closed = False
        self.checkpoint_steps, self.checkpoint_seconds = checkpoint_steps, checkpoint_seconds
        self.on_checkpoint = on_checkpoint
        self.last_checkpoint: Checkpoint | None = None
        self._checkpointed_at = time.monotonic()

    # -- public --------------------------------------------------------------------------------------
    @property
    def placement(self) -> dict[str, Any]:
        """Where the session computes: partitions, micro_batches, replicas (and the Ray engine's
        nodes); empty until the first step places a session that is placed then."""
        return {"partitions": 1, "micro_batches": 1, "replicas": 1}

    def step(
        self,
        feeds: Mapping[str, np.ndarray],
        return_grads: bool = False,
        lr: float | None = None,
        progress: Progress = None,
    ) -> StepResult:
        """Forward, backward and one optimizer update at the current weights; the loss is the
        one before the update (as ``loss.backward(); opt.step()`` would report it). ``lr``: this
        step's learning rate, in place of the schedule's (or the optimizer's). ``progress`` is
        called with the engine's ProgressEvents, as for a job."""
        self._check_open()
        (loss, grads, info, number, lr_used), restored = self._restoring(
            lambda: self._numbered_step(feeds, lr, return_grads, progress)
        )
        if restored is not None:
            info["restored_from_step"] = restored
        self.steps = number
        if self._checkpoint_due():
            self.checkpoint()
        return StepResult(loss, number, grads if return_grads else None, {**info, "lr": lr_used})

    def _restoring(self, attempt: Callable[[], Any]) -> tuple[Any, int | None]:
        """``attempt()``, run again each time the engine lost the session's state and went back
        to a checkpoint (:class:`Restored`; at most MAX_RESTORES times); with the step restored from."""
        restored = None
        for tries in range(1, MAX_RESTORES + 2):
            try:
                return attempt(), restored
            except Restored as exc:
                restored, self.steps = exc.step, exc.step
                if tries > MAX_RESTORES:
                    from gradserve.server.errors import Unavailable  # grpc: not for every inline job's import

                    raise Unavailable(
                        f"the session lost workers on {tries} tries of one call; it is at step "
                        f"{exc.step} now, try again later"
                    ) from exc
        raise AssertionError("unreachable")

    def _numbered_step(self, feeds, lr: float | None, return_grads: bool, progress: Progress):
        number = self.steps + 1
        if lr is None and self.schedule is not None:
            lr = lr_at(self.schedule, number)
        loss, grads, info = self._step(feeds, number, lr, return_grads, progress)
        return loss, grads, dict(info), number, lr

    def checkpoint(self) -> Checkpoint:
        """Take a checkpoint now (the weights and optimizer state after :attr:`steps` steps)."""
        self._check_open()
        weights, states = self._take_checkpoint()
        self.last_checkpoint = Checkpoint(self.steps, weights, states)
        self._checkpointed_at = time.monotonic()
        if self.on_checkpoint is not None:
            self.on_checkpoint(self.last_checkpoint)
        return self.last_checkpoint

    def _checkpoint_due(self) -> bool:
        taken = self.last_checkpoint.step if self.last_checkpoint is not None else 0
        if self.checkpoint_steps is not None and self.steps - taken >= self.checkpoint_steps:
            return True
        return (
            self.checkpoint_seconds is not None and time.monotonic() - self._checkpointed_at >= self.checkpoint_seconds
        )

    def gradients(self, feeds: Mapping[str, np.ndarray]) -> Result:
        """The loss and dL/dw at the current weights, which stay as they are."""
        self._check_open()
        result, restored = self._restoring(lambda: self._gradients(feeds))
        if restored is not None:
            result.info["restored_from_step"] = restored
        return result

    def set_weights(self, values: Mapping[str, np.ndarray]) -> None:
        """Replace some weights (only those given travel); their optimizer state stays."""
        self._check_open()
        for name, value in values.items():
            current = self.model.params.get(name)
            if current is None:
                raise GraphError(f"set_weights: '{name}' is not a parameter of the session's model")
            if np.shape(value) != current.shape:
                raise GraphError(f"set_weights: parameter '{name}' has shape {current.shape}, not {np.shape(value)}")
        self._set_weights({n: np.asarray(v, dtype=self.model.params[n].dtype) for n, v in values.items()})

    def weights(self, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """The current weights (all, or those named)."""
        self._check_open()
        wanted = list(self.model.params) if names is None else list(names)
        unknown = [n for n in wanted if n not in self.model.params]
        if unknown:
            raise GraphError(f"weights: '{unknown[0]}' is not a parameter of the session's model")
        return self._weights(wanted)

    def close(self) -> None:
        """Free the session's weights and optimizer state wherever they are."""
        if not self.closed:
            self.closed = True
            self._close()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what each engine supplies -----------------------------------------------------------------
    def _step(
        self, feeds, number: int, lr: float | None, return_grads: bool, progress: Progress
    ) -> tuple[float, dict | None, dict]:
        raise NotImplementedError

    def _gradients(self, feeds) -> Result:
        raise NotImplementedError

    def _set_weights(self, values: dict[str, np.ndarray]) -> None:
        raise NotImplementedError

    def _weights(self, names: list[str]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _take_checkpoint(self) -> tuple[dict[str, np.ndarray], dict[str, dict[str, np.ndarray]]]:
        raise NotImplementedError

    def _close(self) -> None:
        """Nothing to free by default."""

    def _check_open(self) -> None:
        if self.closed:
            raise SessionClosed("the session is closed")
