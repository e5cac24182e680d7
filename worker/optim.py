"""Optimizers as torch.optim defines them, in numpy, for the workers that hold the weights.

An optimizer is a small frozen description -- :class:`SGD`, :class:`Adam`, :class:`AdamW`, with
torch's argument names, defaults, checks and arithmetic -- that updates one parameter at a time:
``init_state(param)`` makes that parameter's state (a dict of arrays shaped like it) and
``step(param, grad, state, step, lr)`` updates the parameter and its state in place. No parameter's
update reads another's, so each partition updates its own parameters alone. The two things that do
span partitions are split in halves:

- clipping by global norm: each partition computes :func:`local_sq_norm` of its gradients, the
  driver sums them into :func:`clip_scale` (torch's ``clip_grad_norm_`` formula) and every partition
  multiplies its gradients by that scale (``ParamGroups.step(..., grad_scale=)``);
- the learning-rate schedule: :func:`lr_at` runs where the driver is (a schedule may be any Python
  callable) and the step's learning rate travels with the step.

:class:`ParamGroups` adds torch's param groups: per-parameter overrides of any hyper-parameter, by
name. Descriptions travel as plain JSON-able dicts (``to_dict``/``from_dict``), never pickles.

Steps are numbered from 1 (the first update is step 1), the count torch keeps in ``state["step"]``.
torch counts per parameter and skips a parameter whose ``.grad`` is None; here every parameter is
updated every step, with the step number the driver sends.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Iterator, Mapping, Sequence, Union

import numpy as np

State = dict[str, np.ndarray]
Schedule = Union[Sequence[Sequence[float]], Callable[[int], float]]

CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_ divides by (total_norm + 1e-6)
_NORM_CHUNK = 1 << 20  # elements widened to float64 at a time by local_sq_norm
# A big parameter is updated a chunk of this many bytes (per array) at a time: an update takes
# several numpy passes with temporaries, which on chunks this size stay in a core's L2 cache and
# reuse the same small allocations (no page faults). AdamW on 8M float32 weights, on a busy 2-core
# EPYC: 36-104 ms a step, against 116-228 ms as whole arrays (and torch's own 230-380 ms).
_STEP_CHUNK_BYTES = 1 << 16


def _number(name: str, value: Any) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, not {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, not {value!r}")
    return float(value)


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, not {value!r}")
    return bool(value)


def _at_least_zero(message: str, value: float) -> None:
    if value < 0.0:
        raise ValueError(f"{message}: {value}")  # torch's own wording, e.g. "Invalid learning rate: -1.0"


class Optimizer:
    """What SGD, Adam and AdamW share: a frozen dataclass of hyper-parameters that updates one
    parameter at a time. Subclasses define ``state_names`` and ``_update``, and may refine
    ``_convert`` (a hyper-parameter's type) and ``_check`` (its range)."""

    lr: float

    def __post_init__(self) -> None:
        # Normalise to plain Python types, so equal descriptions compare and serialise equal.
        for f in dataclasses.fields(self):  # type: ignore[arg-type]  # the subclasses are dataclasses
            value = getattr(self, f.name)
            value = _flag(f.name, value) if f.type in ("bool", bool) else self._convert(f.name, value)
            object.__setattr__(self, f.name, value)
        _at_least_zero("Invalid learning rate", self.lr)
        self._check()

    def _convert(self, name: str, value: Any) -> Any:
        return _number(name, value)

    def _check(self) -> None:
        """Refuse hyper-parameters torch refuses."""

    @property
    def state_names(self) -> tuple[str, ...]:
        """The arrays of a parameter's state, torch's names for them."""
        raise NotImplementedError

    @property
    def state_copies(self) -> int:
        """How many arrays the size of each parameter its state holds (memory planning)."""
        return len(self.state_names)

    def init_state(self, param: np.ndarray) -> State:
        """The state of a parameter before its first step: zeros shaped and typed like it."""
        return {name: np.zeros_like(param) for name in self.state_names}

    def step(self, param: np.ndarray, grad: np.ndarray, state: State, step: int, lr: float | None = None) -> None:
        """Update ``param`` and ``state`` in place from ``grad`` (left unchanged), as torch's step
        number ``step`` (from 1) would, at learning rate ``lr`` (None: this optimizer's ``lr``)."""
        step, lr = self._checked(param, grad, state, step, lr)
        for part in _chunks(param, grad, state):
            self._update(*part, step, lr)

    def _checked(self, param: np.ndarray, grad: np.ndarray, state: State, step: Any, lr: Any) -> tuple[int, float]:
        if param.shape != grad.shape:
            raise ValueError(f"gradient of shape {grad.shape} for a parameter of shape {param.shape}")
        if set(state) != set(self.state_names):
            raise ValueError(f"{type(self).__name__} state holds {sorted(self.state_names)}, not {sorted(state)}")
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 1:
            raise ValueError(f"step must be an integer from 1, not {step!r}")
        lr = self.lr if lr is None else _number("lr", lr)
        _at_least_zero("Invalid learning rate", lr)
        return int(step), lr

    def _update(self, param: np.ndarray, grad: np.ndarray, state: State, step: int, lr: float) -> None:
        raise NotImplementedError

    def with_overrides(self, overrides: Mapping[str, Any]) -> Optimizer:
        """This optimizer with some hyper-parameters replaced (a param group's), checked as new."""
        names = {f.name for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        unknown = sorted(set(overrides) - names)
        if unknown:
            known = ", ".join(sorted(names))
            raise ValueError(f"{type(self).__name__} has no hyper-parameter {unknown[0]!r} (it has {known})")
        return dataclasses.replace(self, **overrides) if overrides else self  # type: ignore[type-var]

    def to_dict(self) -> dict[str, Any]:
        """A plain JSON-able description: ``{"type": "Adam", "lr": 0.001, "betas": [0.9, 0.999], ...}``."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        return {"type": type(self).__name__, **{k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}}

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> Optimizer:
        """The optimizer ``to_dict`` described; refuses an unknown type or hyper-parameter."""
        data = dict(data)
        kind = data.pop("type", None)
        if kind not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer type {kind!r} (known: {', '.join(OPTIMIZERS)})")
        base = OPTIMIZERS[kind]()
        return base.with_overrides(data)


def _chunks(param: np.ndarray, grad: np.ndarray, state: State) -> Iterator[tuple[np.ndarray, np.ndarray, State]]:
    """A parameter, its gradient and its state in chunks of ``_STEP_CHUNK_BYTES``: views of flat
    views, so updating a chunk updates the parameter. One whole chunk when the parameter or its
    state is not contiguous (no flat view to update in place); a non-contiguous gradient is only
    read, and flattening copies it."""
    if not (param.flags.c_contiguous and all(v.flags.c_contiguous for v in state.values())):
        yield param, grad, state
        return
    param, grad, state = param.reshape(-1), grad.reshape(-1), {k: v.reshape(-1) for k, v in state.items()}
    size = max(1, _STEP_CHUNK_BYTES // param.itemsize)
    for start in range(0, param.size, size):
        part = slice(start, start + size)
        yield param[part], grad[part], {k: v[part] for k, v in state.items()}


def _directed(param: np.ndarray, grad: np.ndarray, maximize: bool, weight_decay: float) -> np.ndarray:
    """The gradient to descend: negated to maximise, plus L2 weight decay (torch's
    ``grad.add(param, alpha=weight_decay)``). A new array only when it differs from ``grad``."""
    g = -grad if maximize else grad
    if weight_decay != 0:
        g = g + weight_decay * param
    return g


@dataclass(frozen=True)
class SGD(Optimizer):
    """torch.optim.SGD: momentum (heavy-ball or Nesterov), dampening and L2 weight decay."""

    lr: float = 1e-3
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    maximize: bool = False

    def _check(self) -> None:
        _at_least_zero("Invalid momentum value", self.momentum)
        _at_least_zero("Invalid weight_decay value", self.weight_decay)
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")

    @property
    def state_names(self) -> tuple[str, ...]:
        return ("momentum_buffer",) if self.momentum != 0 else ()

    def _update(self, param: np.ndarray, grad: np.ndarray, state: State, step: int, lr: float) -> None:
        g = _directed(param, grad, self.maximize, self.weight_decay)
        if self.momentum != 0:
            buf = state["momentum_buffer"]
            if step == 1:
                np.copyto(buf, g)  # torch's buffer starts as the first gradient itself, undamped
            else:
                buf *= self.momentum
                buf += (1 - self.dampening) * g
            g = g + self.momentum * buf if self.nesterov else buf
        param -= lr * g


def _lerp_(start: np.ndarray, end: np.ndarray, weight: float) -> None:
    """``start.lerp_(end, weight)`` in torch's arithmetic (which of two forms depends on the weight)."""
    if abs(weight) < 0.5:
        start += weight * (end - start)
    else:
        np.subtract(end, (end - start) * (1 - weight), out=start)


@dataclass(frozen=True)
class Adam(Optimizer):
    """torch.optim.Adam: L2 weight decay added to the gradient, AMSGrad on request."""

    decoupled: ClassVar[bool] = False  # AdamW decays the weights themselves, outside the moments

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    amsgrad: bool = False
    maximize: bool = False

    def _convert(self, name: str, value: Any) -> Any:
        if name != "betas":
            return _number(name, value)
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
            raise ValueError(f"betas must be a pair of numbers, not {value!r}")
        return (_number("betas[0]", value[0]), _number("betas[1]", value[1]))

    def _check(self) -> None:
        _at_least_zero("Invalid epsilon value", self.eps)
        for i, beta in enumerate(self.betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
        _at_least_zero("Invalid weight_decay value", self.weight_decay)

    @property
    def state_names(self) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if self.amsgrad else ())

    def _update(self, param: np.ndarray, grad: np.ndarray, state: State, step: int, lr: float) -> None:
        beta1, beta2 = self.betas
        if self.decoupled and self.weight_decay != 0:
            param *= 1 - lr * self.weight_decay
        g = _directed(param, grad, self.maximize, 0.0 if self.decoupled else self.weight_decay)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        _lerp_(exp_avg, g, 1 - beta1)
        exp_avg_sq *= beta2
        exp_avg_sq += (1 - beta2) * g * g
        if self.amsgrad:
            np.maximum(state["max_exp_avg_sq"], exp_avg_sq, out=state["max_exp_avg_sq"])
            exp_avg_sq = state["max_exp_avg_sq"]  # the running maximum normalises the step
        step_size = lr / (1 - beta1**step)
        denom = np.sqrt(exp_avg_sq)
        denom /= (1 - beta2**step) ** 0.5
        denom += self.eps
        update = -step_size * exp_avg  # torch's addcdiv_: param + (value * exp_avg) / denom
        update /= denom
        param += update


@dataclass(frozen=True)
class AdamW(Adam):
    """torch.optim.AdamW: Adam whose weight decay shrinks the weights (by ``lr * weight_decay``)
    instead of entering the gradient's moments; torch's default decay is 1e-2."""

    decoupled: ClassVar[bool] = True

    weight_decay: float = 1e-2


OPTIMIZERS: dict[str, type[Optimizer]] = {"SGD": SGD, "Adam": Adam, "AdamW": AdamW}


class ParamGroups:
    """An optimizer plus torch's param groups: per-parameter overrides of its hyper-parameters.

    ``overrides`` maps a parameter's name to the hyper-parameters that differ for it (``{"lr": 0.01,
    "weight_decay": 0.0}``); other parameters use ``optimizer``. A partition holding some of the
    parameters updates those it is given and ignores overrides for the rest.
    """

    def __init__(self, optimizer: Optimizer, overrides: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self.optimizer = optimizer
        self.overrides: dict[str, dict[str, Any]] = {}
        self._per_param: dict[str, Optimizer] = {}
        for name, given in (overrides or {}).items():
            if not given:
                continue
            try:
                self._per_param[name] = optimizer.with_overrides(given)
            except ValueError as e:
                raise ValueError(f"parameter {name!r}: {e}") from None
            # normalised as the optimizer holds them (betas a tuple even from JSON's list)
            self.overrides[name] = {k: getattr(self._per_param[name], k) for k in given}

    @classmethod
    def of(
        cls,
        optimizer: "Optimizer | ParamGroups",
        overrides: Mapping[str, Mapping[str, Any]] | None = None,
        max_norm: float | None = None,
    ) -> "ParamGroups":
        """The groups a session is opened with: ``optimizer`` (or groups, whose overrides
        ``overrides`` replaces when given); TypeError for anything else, ValueError for a
        ``max_norm`` (checked here too, as every opener takes it) that is not positive."""
        if max_norm is not None and not max_norm > 0:
            raise ValueError(f"max_norm must be positive, not {max_norm!r}")
        if isinstance(optimizer, ParamGroups):
            return optimizer if overrides is None else cls(optimizer.optimizer, overrides)
        if isinstance(optimizer, Optimizer):
            return cls(optimizer, overrides)
        raise TypeError(f"optimizer must be a gradserve.optim optimizer (SGD, Adam, AdamW), not {optimizer!r}")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ParamGroups) and (self.optimizer, self.overrides) == (other.optimizer, other.overrides)

    def __repr__(self) -> str:
        return f"ParamGroups({self.optimizer!r}, {self.overrides!r})"

    def for_param(self, name: str) -> Optimizer:
        """The optimizer that updates parameter ``name``."""
        return self._per_param.get(name, self.optimizer)

    def lr_for(self, name: str, lr: float | None) -> float | None:
        """Parameter ``name``'s learning rate when the schedule gives the base optimizer ``lr``
        (None: no schedule). As torch's schedulers scale every group's lr by the same factor, a
        parameter with its own lr keeps its ratio to the base lr."""
        own = self.for_param(name).lr
        if lr is None or own == self.optimizer.lr:
            return lr
        if self.optimizer.lr == 0:
            raise ValueError(f"cannot schedule parameter {name!r}'s own lr {own}: the base lr is 0, no ratio to keep")
        return lr * (own / self.optimizer.lr)

    def state_bytes(self, params: Mapping[str, np.ndarray]) -> int:
        """The bytes the state of these parameters takes (Adam: two more copies of the weights)."""
        return sum(self.for_param(name).state_copies * p.nbytes for name, p in params.items())

    def init_state(self, params: Mapping[str, np.ndarray]) -> dict[str, State]:
        """Each parameter's state before the first step."""
        return {name: self.for_param(name).init_state(p) for name, p in params.items()}

    def step(
        self,
        params: Mapping[str, np.ndarray],
        grads: Mapping[str, np.ndarray],
        states: Mapping[str, State],
        step: int,
        lr: float | None = None,
        grad_scale: float = 1.0,
    ) -> None:
        """Update every parameter in ``params`` in place: gradients multiplied by ``grad_scale``
        (:func:`clip_scale`'s), at the scheduled base ``lr`` (None: the optimizers' own)."""
        missing = sorted(set(params) - set(grads))
        if missing:
            raise ValueError(f"no gradient for parameter {missing[0]!r}")
        for name, param in params.items():
            grad = grads[name] if grad_scale == 1.0 else grads[name] * grad_scale  # grads may be read-only
            self.for_param(name).step(param, grad, states[name], step, self.lr_for(name, lr))

    def to_dict(self) -> dict[str, Any]:
        """``{"optimizer": {...}, "overrides": {name: {...}}}``, plain JSON-able."""
        overrides = {}
        for name, given in self.overrides.items():  # the overridden hyper-parameters, normalised
            overrides[name] = {k: v for k, v in self._per_param[name].to_dict().items() if k in given}
        return {"optimizer": self.optimizer.to_dict(), "overrides": overrides}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ParamGroups:
        """The groups ``to_dict`` described."""
        unknown = sorted(set(data) - {"optimizer", "overrides"})
        if unknown or "optimizer" not in data:
            raise ValueError(f"param groups need 'optimizer' and optionally 'overrides', got {sorted(data)}")
        return cls(Optimizer.from_dict(data["optimizer"]), data.get("overrides") or {})


def check_schedule(schedule: Sequence[Sequence[float]]) -> tuple[tuple[int, float], ...]:
    """A (step, lr) schedule checked and normalised: pairs in increasing step order, the first at
    step 1; each lr holds from its step until the next pair's."""
    if isinstance(schedule, (str, bytes)) or not isinstance(schedule, Sequence) or not schedule:
        raise ValueError(f"a schedule is a non-empty list of (step, lr) pairs or a callable, not {schedule!r}")
    pairs: list[tuple[int, float]] = []
    for item in schedule:
        if isinstance(item, (str, bytes)) or not isinstance(item, Sequence) or len(item) != 2:
            raise ValueError(f"schedule entry {item!r} is not a (step, lr) pair")
        step, lr = item
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 1:
            raise ValueError(f"schedule entry {item!r}: the step must be an integer from 1")
        if pairs and step <= pairs[-1][0]:
            raise ValueError(f"schedule entry {item!r}: steps must increase (after step {pairs[-1][0]})")
        lr = _number(f"schedule lr at step {step}", lr)
        _at_least_zero("Invalid learning rate", lr)
        pairs.append((int(step), lr))
    if pairs[0][0] != 1:
        raise ValueError(f"a schedule must start at step 1, not {pairs[0][0]} (which lr would steps before it use?)")
    return tuple(pairs)


def lr_at(schedule: Schedule, step: int) -> float:
    """The learning rate ``schedule`` gives step ``step`` (from 1): a list of (step, lr) pairs (the
    last pair at or before ``step``) or a callable ``step -> lr``. To replay a torch scheduler:
    its lr after ``k`` scheduler steps is the lr of step ``k + 1``."""
    if callable(schedule):
        lr = _number(f"the schedule's lr for step {step}", schedule(step))
        _at_least_zero(f"Invalid learning rate for step {step}", lr)
        return lr
    pairs = check_schedule(schedule)
    return pairs[bisect.bisect_right([s for s, _ in pairs], step) - 1][1]


def local_sq_norm(grads: Iterable[np.ndarray]) -> float:
    """The sum of squares of one partition's gradients, in float64; the driver adds the partitions'
    and passes the total to :func:`clip_scale`."""
    total = 0.0
    for g in grads:
        flat = np.ravel(g)
        for start in range(0, flat.size, _NORM_CHUNK):  # widen a chunk at a time, not a whole copy
            chunk = flat[start : start + _NORM_CHUNK].astype(np.float64, copy=False)
            total += float(np.dot(chunk, chunk))
    return total


def clip_scale(total_sq_norm: float, max_norm: float) -> float:
    """The factor torch's ``clip_grad_norm_(params, max_norm)`` multiplies every gradient by:
    ``min(max_norm / (total_norm + 1e-6), 1)``. Like torch, a non-finite norm gives a non-finite or
    zero scale rather than an error."""
    max_norm = _number("max_norm", max_norm)
    if max_norm <= 0:
        raise ValueError(f"max_norm must be positive, not {max_norm}")
    return min(max_norm / (math.sqrt(total_sq_norm) + CLIP_EPS), 1.0)
