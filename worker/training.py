"""A partition that trains: its stage's parameters, owned and updated in place by its optimizer.

A training session keeps each partition's weights and optimizer state on the worker that hosts
it, so a step moves only the batch (and, when asked, dL/dw). :class:`Trainer` wraps a
:class:`~gradserve.worker.stage.Stage`: it takes writable copies of the stage's parameters (they
arrived read-only from the object store), keeps each one's optimizer state, and applies updates.
No Ray here: the actor in :mod:`gradserve.worker.actor` holds one per session stage.

What spans workers is the caller's: summing dL/dw over replicas and over the partitions that
share a parameter (:func:`sum_parts`, every replica summing the same parts in the same order, so
replicas stay bit-identical), and clipping by global norm (each partition's :meth:`sq_norm`,
summed by the driver into one scale).
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np

from gradserve.worker.optim import ParamGroups, State, local_sq_norm
from gradserve.worker.stage import Stage


class Trainer:
    """The optimizer of one stage: its own parameters (``owned``: those whose norm it counts, a
    parameter shared by several partitions is counted by one) and their state."""

    def __init__(
        self, stage: Stage, groups: ParamGroups, owned: Sequence[str], states: Mapping[str, State] | None = None
    ) -> None:
        """``states``: the optimizer state to go on from (a checkpoint's), else a fresh one."""
        stage.params = {name: np.array(value, copy=True) for name, value in stage.params.items()}  # writable
        self.stage = stage
        self.groups = groups
        self.owned = tuple(owned)
        self.states: dict[str, State] = groups.init_state(stage.params)
        for name, state in (states or {}).items():
            if name in self.states:
                for key, value in state.items():
                    np.copyto(self.states[name][key], value)

    def sq_norm(self, grads: Mapping[str, np.ndarray]) -> float:
        """The sum of squares of the owned parameters' gradients (this stage's share of the norm)."""
        return local_sq_norm(grads[name] for name in self.owned if name in grads)

    def apply(self, grads: Mapping[str, np.ndarray], step: int, lr: float | None, scale: float) -> None:
        """One optimizer step on the stage's parameters that have a dL/dw in ``grads`` (times
        ``scale``); one the loss does not reach has none and is left alone, as torch leaves a
        parameter whose ``.grad`` is None."""
        params = {name: p for name, p in self.stage.params.items() if name in grads}
        self.groups.step(params, grads, self.states, step, lr, scale)

    def set_weights(self, values: Mapping[str, np.ndarray]) -> None:
        """Overwrite some parameters in place (their optimizer state stays, as torch's would)."""
        for name, value in values.items():
            if name in self.stage.params:
                target = self.stage.params[name]
                if np.shape(value) != target.shape:
                    raise ValueError(f"parameter {name!r} has shape {target.shape}, not {np.shape(value)}")
                np.copyto(target, value, casting="same_kind")

    def checkpoint(self) -> tuple[dict[str, np.ndarray], dict[str, State]]:
        """Copies of the owned parameters and their optimizer state: what a restart needs."""
        params = self.stage.params
        return (
            {name: params[name].copy() for name in self.owned},
            {name: {k: v.copy() for k, v in self.states[name].items()} for name in self.owned},
        )

    def weights(self, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Copies of the stage's parameters (all, or those of ``names`` it holds)."""
        params = self.stage.params
        wanted = params if names is None else [n for n in names if n in params]
        return {name: params[name].copy() for name in wanted}


def sum_parts(parts: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """dL/dw summed over ``parts`` (replicas' or partitions' results), by name, in the given order."""
    total: dict[str, np.ndarray] = {}
    for part in parts:
        for name, g in part.items():
            total[name] = total[name] + g if name in total else np.array(g, copy=True)
    return total
