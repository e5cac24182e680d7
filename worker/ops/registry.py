"""The op registry: one table mapping an ONNX op type to its numpy forward and its VJP.

An op is registered with :func:`defop`::

    defop("Exp", lambda c, x: np.exp(x), lambda c, g: g * c.y, keep="y")

``forward(c, *inputs)`` returns an array or a tuple of arrays. ``vjp(c, *grads)`` receives the error
(dL/d output) at each output -- ``None`` where no error reaches that output -- and returns the error
at each input (a tuple, or a single array for one-input ops), ``None`` for inputs that get no gradient.
The VJP is ``J^T x error`` computed directly; no Jacobian is ever built.

``c`` is an :class:`OpContext`: the node's attributes, its inputs and outputs, whatever the forward
chose to ``c.save(...)``, and ``c.needs[i]`` -- whether input i wants an error at all, so expensive
input errors (dL/dX of the first layer) are skipped. ``keep`` says which values the VJP reads: the
runner keeps only those alive after the forward pass, and hands the VJP cheap zero-stride stand-ins
with the right shape and dtype for the rest.

A row also says what planning needs to know about the op, so there is one table: ``batch`` -- how
it moves the batch axis when a job is split into micro-batches (a
:class:`~gradserve.worker.ops.batch.BatchRule`, or ``never(reason)``), and ``flops`` -- its
estimated forward FLOPs from the shapes of its values. A module whose ops share a rule declares it
once with :func:`family`; tests/worker/test_op_table.py checks every row has both.
"""

from __future__ import annotations

import functools

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:
    from gradserve.worker.graph import Node
    from gradserve.worker.ops.batch import BatchRule


class OpError(ValueError):
    """An op applied to attributes or inputs it cannot handle."""


@dataclass
class OpContext:
    """What a VJP knows about one application of an op (the analogue of torch's ``ctx``)."""

    attrs: dict[str, Any]
    inputs: Sequence[np.ndarray] = ()
    outputs: Sequence[np.ndarray] = ()
    saved: dict[str, Any] = field(default_factory=dict)
    needs: Sequence[bool] = ()
    node: str = ""
    n_outputs: int = 1  # how many outputs the node declares (some ONNX outputs are optional)

    def save(self, **values: Any) -> None:
        """Stash intermediate results of the forward pass for the VJP."""
        self.saved.update(values)

    def attr(self, name: str, default: Any = None) -> Any:
        return self.attrs.get(name, default)

    def wants_error(self, i: int) -> bool:
        """Whether input ``i`` wants an error (False for an optional input the node leaves out)."""
        return i < len(self.needs) and self.needs[i]

    @property
    def x(self) -> np.ndarray:
        """The first input."""
        return self.inputs[0]

    @property
    def y(self) -> np.ndarray:
        """The first output."""
        return self.outputs[0]


Forward = Callable[..., "np.ndarray | tuple[np.ndarray, ...]"]
Vjp = Callable[..., "np.ndarray | tuple[np.ndarray | None, ...] | None"]
# [(context, errors at the outputs), ...] -> one (context, errors) whose VJP gives their sum, or None
Merge = Callable[[list], "tuple[OpContext, list] | None"]
# (node, the ValueInfo of each value of its job) -> estimated forward FLOPs; None when a shape it
# needs is unknown (then the per-element default counts)
FlopCount = Callable[["Node", Mapping[str, Any]], "int | None"]


@dataclass(frozen=True)
class OpDef:
    """One entry of the registry."""

    op_type: str
    forward: Forward
    vjp: Vjp | None
    keep_inputs: bool | tuple[int, ...]
    keep_outputs: bool
    differentiable: tuple[int, ...] | None  # input indices that can get an error; None = all
    # Optional: folds the deferred weight-error work of several micro-batches into one VJP call
    # (see :func:`gradserve.worker.autodiff.backward_deferred`); None where it cannot.
    merge: Merge | None = None
    # How the op moves the batch axis (see :mod:`gradserve.worker.ops.batch`); None: not stated.
    batch: BatchRule | None = None
    # Its estimated forward FLOPs (see :func:`per_element`); None: not stated.
    flops: FlopCount | None = None

    def keeps_input(self, i: int) -> bool:
        return self.keep_inputs is True or (isinstance(self.keep_inputs, tuple) and i in self.keep_inputs)

    def can_differentiate(self, i: int) -> bool:
        return self.vjp is not None and (self.differentiable is None or i in self.differentiable)


REGISTRY: dict[str, OpDef] = {}


def defop(
    op_type: str,
    forward: Forward,
    vjp: Vjp | None = None,
    *,
    keep: str | Iterable[str] = ("x", "y"),
    differentiable: Iterable[int] | None = None,
    merge: Merge | None = None,
    batch: BatchRule | None = None,
    flops: FlopCount | None = None,
) -> OpDef:
    """Register an op. ``keep`` names what the VJP reads: ``"x"`` (all inputs), ``"x0"``/``"x1"``...
    (single inputs), ``"y"`` (outputs), or ``()`` (shapes only). ``vjp=None`` marks an op whose
    inputs never get an error (shape ops, comparisons, Cast to int...). ``merge`` (optional) turns
    the deferred VJPs of several micro-batches into one call whose input errors are their sum.
    ``batch`` and ``flops`` are for planning (see the module docs)."""
    if op_type in REGISTRY:
        raise RuntimeError(f"op {op_type} registered twice")
    keeps = {keep} if isinstance(keep, str) else set(keep)
    keep_inputs: bool | tuple[int, ...] = True if "x" in keeps else tuple(
        sorted(int(k[1:]) for k in keeps if k.startswith("x") and k[1:].isdigit())
    )
    opdef = OpDef(
        op_type,
        forward,
        vjp,
        keep_inputs,
        "y" in keeps,
        None if differentiable is None else tuple(differentiable),
        merge,
        batch,
        flops,
    )
    REGISTRY[op_type] = opdef
    return opdef


def family(**fields: Any) -> Callable[..., OpDef]:
    """:func:`defop` with defaults for a module whose ops share them (``batch=``, ``flops=``); a
    row may still override each."""
    return functools.partial(defop, **fields)


def numel(info: Any) -> int:
    """The number of elements of a value from its ValueInfo; 0 when unknown (None)."""
    return int(np.prod(info.shape, dtype=np.int64)) if info is not None else 0


def per_element(node: Node, shapes: Mapping[str, Any]) -> int:
    """The default FLOP count: one per element of the output or of the inputs, whichever is more.
    Estimates, not measurements: ops whose cost is not about one per element (products,
    convolutions, recurrences) count their own."""
    out = numel(shapes.get(node.outputs[0])) if node.outputs else 0
    ins = sum(numel(shapes.get(i)) for i in node.inputs if i)
    return max(out, ins, 1)


def get_op(op_type: str) -> OpDef | None:
    """The registry entry for an ONNX op type, or None when gradserve does not implement it."""
    return REGISTRY.get(op_type)


def unbroadcast(g: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Undo numpy broadcasting: sum ``g`` over the axes along which an operand of ``shape`` was
    broadcast, so the error has the operand's shape."""
    if g.shape == tuple(shape):
        return g
    lead = g.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(i + lead for i, d in enumerate(shape) if d == 1 and g.shape[i + lead] != 1)
    if axes:
        g = g.sum(axis=axes, keepdims=True)
    return g.reshape(shape)


def split_ties(g: np.ndarray, y: np.ndarray, xs: Sequence[np.ndarray], axes: tuple[int, ...] = ()) -> list[np.ndarray]:
    """The VJP of an extreme (max or min), for Max/Min and ReduceMax/ReduceMin alike: the error at
    each output goes to the values attaining it, split evenly among ties, as torch does
    (torch.maximum gives each of two tied inputs half, torch.amax each of k tied elements 1/k), so
    the errors always sum to the incoming one. ``xs`` are the candidates (inputs, broadcast against
    ``y``); ``axes`` the axes they were reduced over, which ``y`` and ``g`` keep (size 1). Returns
    each candidate's error in its shape; a NaN extreme, attained by none, gives NaN errors."""
    hits = [x == y for x in xs]
    ties = sum(h.sum(axis=axes, keepdims=True) if axes else h for h in hits)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = (g / ties).astype(g.dtype, copy=False)
        return [unbroadcast(h * share, x.shape) for h, x in zip(hits, xs)]


def stand_in(array: np.ndarray) -> np.ndarray:
    """A zero-memory array with ``array``'s shape and dtype, for VJPs that only read shapes."""
    return _stand_in(array.dtype, array.shape)


@functools.lru_cache(maxsize=4096)
def _stand_in(dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    # read-only (broadcast_to's views are), so one per shape serves every step: making one costs
    # ~15 us, which a tiny job pays a dozen times per step
    return np.broadcast_to(np.zeros((), dtype=dtype), shape)


def normalize_axis(axis: int, ndim: int, node: str = "") -> int:
    if not -ndim <= axis < max(ndim, 1):
        raise OpError(f"{node}: axis {axis} out of range for rank {ndim}")
    return axis % max(ndim, 1)


def str_attr(value: Any, default: str) -> str:
    """A string attribute (ONNX stores them as bytes) as ``str``; ``default`` when absent."""
    if value is None:
        return default
    return value.decode() if isinstance(value, bytes) else str(value)
