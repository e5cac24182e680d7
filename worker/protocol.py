"""What the engine asks of a stage actor, typed from the schedule to the actor and back.

One actor call (:class:`StageCall`) runs consecutive steps of one job on one stage. Each step is an
action -- :class:`Forward`, :class:`Backward`, :class:`Weights` or :class:`Reduce`, in training
sessions :class:`Norm` and :class:`Update`, and in a tiny job's nested calls :class:`Relay` -- that
reads the next ``reads`` of the call's values and gives results in a fixed order; :class:`Output`
says what each result is and who reads it. No Ray here: the protocol is plain data, so the engine, the actor
and their tests share it without a cluster.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any, Union

import numpy as np

BY_REF = None  # in StageCall.values: "the next ObjectRef argument of the call"
FROM_PEER = "\x00peer"  # in StageCall.values: "the next error a Relay brought back" (no value is a bare str)
FEED_GROUP = (
    "\x00feeds"  # in StageCall.names: a value holding several feeds, {name: array} (no graph value has this name)
)


@dataclass(frozen=True, slots=True)
class Forward:
    """Forward of ``micro_batch`` on the next ``reads`` values (feeds and boundary inputs, labelled
    by the call's names); results: the partition's outputs, in order."""

    micro_batch: int
    reads: int


@dataclass(frozen=True, slots=True)
class Backward:
    """Backward of ``micro_batch``: the errors at the partition's outputs are the next ``reads``
    values (a name repeats when several partitions sent one: they are summed). ``defer``: leave
    dL/dw to the weight step (zero-bubble). Results: the errors at the boundary inputs, in order."""

    micro_batch: int
    reads: int
    defer: bool


@dataclass(frozen=True, slots=True)
class Weights:
    """dL/dw of the job on this stage and its compute seconds, for ``replica``: one result, or,
    with ``keep``, none (they stay on the actor for a later :class:`Reduce`). Ends the job's
    computing on this stage."""

    replica: int
    keep: bool

    @property
    def reads(self) -> int:
        return 0


@dataclass(frozen=True, slots=True)
class Reduce:
    """One result: the kept dL/dw of ``replica`` with the next ``reads`` values (other replicas'
    weight results for this stage) summed in: a reduction tree instead of every replica's dL/dw
    travelling to the driver. A call of its own, so waiting for other replicas never holds up
    this replica's own weight step."""

    replica: int
    reads: int


@dataclass(frozen=True, slots=True)
class Norm:
    """A training step's first half when clipping by global norm: dL/dw of this stage -- the kept
    one, or, with ``reads``, those values (replicas' and sharing partitions' weight results) summed
    in order and kept -- and one result, its share of the squared norm."""

    reads: int


@dataclass(frozen=True, slots=True)
class Update:
    """The optimizer's step on this stage's parameters (a training session's stage, see
    :mod:`gradserve.worker.training`): with dL/dw the kept one, or, with ``reads``, those values
    summed in order (every replica sums the same parts in the same order, so all stay equal),
    times ``scale`` (global-norm clipping), at learning rate ``lr`` (None: the optimizer's) as
    step ``step``. One result: (dL/dw if ``grads`` else nothing, compute seconds by replica)."""

    replica: int
    reads: int
    step: int
    lr: float | None
    scale: float
    grads: bool


@dataclass(frozen=True, slots=True)
class Relay:
    """The next stage's whole call, made from this one and waited for (a tiny job's nested calls,
    see :mod:`gradserve.server.ray_engine.nested`): ``call`` (in wire form) runs on the pool actor
    named ``peer``, its :data:`BY_REF` values being this call's results at ``sends`` (which then
    leave this call's results). It answers with its ``gives`` results in one tuple: those at
    ``errors`` fill this call's :data:`FROM_PEER` values, in order (what the Backward after it
    reads), the others are this step's results (the loss, the peer's dL/dw, passed on up).

    The caller waits inside its own call, so a peer must come later in one order of the actors
    that every relay follows: then no two calls can wait for each other."""

    peer: str
    call: tuple
    sends: tuple[int, ...]
    errors: tuple[int, ...]
    gives: int

    @property
    def reads(self) -> int:
        return 0


Action = Union[Forward, Backward, Weights, Reduce, Norm, Update, Relay]


@dataclass(frozen=True, slots=True)
class StageCall:
    """What one actor call runs: consecutive ``steps`` of one job on the stage ``key``. Everything
    but the ObjectRefs travels in this one argument (Ray serialises every argument on its own).

    ``values``: one per name, in order: a value carried here (small feeds, loss seeds),
    :data:`BY_REF` or :data:`FROM_PEER`. ``threads``: BLAS threads for (forward/backward steps, the
    weight step). ``results``: how many results the steps give, those a :class:`Relay` sends
    included (placeholders stand in for a skipped call); ``to_driver``: positions of the results
    only the caller reads, returned together (the others, but those sent, are objects of their own).
    """

    key: str
    job_id: str
    threads: tuple[int, int]
    steps: tuple[Action, ...]
    names: tuple[str, ...]
    values: tuple
    results: int
    to_driver: tuple[int, ...] = ()

    @property
    def sent(self) -> set[int]:
        """Positions of the results that this call's relays hand to their peers (not returned)."""
        return {i for step in self.steps if isinstance(step, Relay) for i in step.sends}

    def to_wire(self) -> tuple:
        """This call as msgpack-native data (tuples, strings, numbers, bytes), which is what the
        engine sends: Ray packs such an argument with msgpack, while a dataclass or an array goes
        through its pickler, which cost ~0.1 ms more per call here, about a tiny job's arithmetic.
        Arrays of plain dtypes carried here travel as (dtype, shape, bytes); others stay arrays."""
        steps = tuple((type(s).__name__, *(getattr(s, f.name) for f in dataclasses.fields(s))) for s in self.steps)
        values = tuple(_array_to_wire(v) for v in self.values)
        return (self.key, self.job_id, self.threads, steps, self.names, values, self.results, self.to_driver)

    @classmethod
    def from_wire(cls, wire: Any) -> "StageCall":
        """The call :meth:`to_wire` packed (msgpack may hand tuples back as lists)."""
        key, job_id, threads, steps, names, values, results, to_driver = wire
        return cls(
            key,
            job_id,
            tuple(threads),
            tuple(_ACTIONS[name](*(_tuple(f) for f in fields)) for name, *fields in steps),
            tuple(names),
            tuple(_array_from_wire(v) for v in values),
            results,
            tuple(to_driver),
        )


_ACTIONS: dict[str, type] = {cls.__name__: cls for cls in (Forward, Backward, Weights, Reduce, Norm, Update, Relay)}


def _tuple(field: Any) -> Any:
    """An action's field as sent: msgpack hands tuples back as lists (a relayed call's nested
    fields stay as they came: only the peer reads them, with :meth:`StageCall.from_wire`)."""
    return tuple(field) if isinstance(field, list) else field


def _array_to_wire(value: Any) -> Any:
    # Plain dtypes only: a dtype string loses a structured dtype's fields, and bytes cannot hold objects.
    if isinstance(value, np.ndarray) and value.dtype.kind in "biufcSU":
        return (value.dtype.str, value.shape, value.tobytes())
    return value


def _array_from_wire(value: Any) -> Any:
    if isinstance(value, (tuple, list)):  # (dtype, shape, bytes): read-only, like an object-store array
        dtype, shape, data = value
        return np.frombuffer(data, dtype=np.dtype(dtype)).reshape(shape)
    return value


class Kind(enum.Enum):
    """What a step's result is."""

    ACTIVATION = "activation"  # a partition's output (the loss included)
    ERROR = "error"  # dL/d(boundary input), sent back to the partition that produced it
    WEIGHTS = "weights"  # (dL/dw, compute seconds by replica)


@dataclass(frozen=True, slots=True)
class Output:
    """One result of a call as the engine books it: its ``kind``, the micro-batch (``chunk``, -1
    for weights) and value name it belongs to, and whether only the driver reads it (then it
    travels in the call's first, packed result)."""

    kind: Kind
    chunk: int
    value: str
    to_driver: bool
