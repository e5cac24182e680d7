"""How an op moves the batch axis: the vocabulary of the ``batch=`` field of an op's row.

Micro-batching (:mod:`gradserve.server.planning.batching`) follows the batch axis through a job's
graph, node by node, and asks each op's row how its outputs hold the batch given how its inputs do.
The answer is a *tag* per value:

- :class:`Rows` -- batched: the batch runs along ``axis``, each sample's entries consecutive there;
- :data:`NONE` -- not derived from the batch;
- :data:`SHAPE` -- derived only from the batch's *shape* (Shape, arithmetic on it): fine read as a
  shape, wrong read as data;
- a tuple ``(kind, detail)`` -- a value reduced over the batch: ``("sum", None)``, ``("mean", None)``,
  ``("count", (labels feed, ignore_index))``.

An op's :class:`BatchRule` is called only when one of its inputs is batched (a value with no batched
input is :data:`NONE`, or :data:`SHAPE` if it reads one); it returns the output's tag (or a list, one
per output) or raises the GraphError made by :func:`refuse`, naming the node and why splitting the
batch would not be exact. Rules read shapes and constants through a :class:`BatchView`. The rules
themselves live beside their ops; this module holds the ones many ops share.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Protocol, Union

import numpy as np

from gradserve.worker.graph import GraphError, Node

# Tags of values that are not batched (see the module docs).
NONE, SHAPE = "none", "shape"


@dataclass(frozen=True)
class Rows:
    """A batched value: the batch runs along ``axis``, each sample's entries consecutive there.

    ``outer`` > 1 when a reshape merged axes *before* the batch into that axis (multi-head
    attention's (T, B*H, E/H) -> (T*B*H, E/H) rows): the axis then holds ``outer`` blocks of the n
    samples, each sample's ``per`` entries consecutive in every block. Row-wise ops keep it exact."""

    axis: int = 0
    outer: int = 1


Tag = Union[Rows, str, tuple]


class BatchView(Protocol):
    """What a rule may read about the job whose batch it follows."""

    n: int  # the batch size
    batched: set[str]  # the feeds that carry the batch

    def shape(self, name: str) -> tuple[int, ...] | None:
        """The shape of a value with the full batch, None when unknown."""

    def rank(self, name: str) -> int | None:
        """The rank of a value, None when unknown."""

    def const(self, node: Node, k: int) -> np.ndarray | None:
        """Input ``k`` of ``node`` when it is a constant of the model, else None."""

    def axes(self, node: Node, k: int) -> list[int] | None:
        """The node's ``axes``: its attribute (older opsets), else its constant input ``k``; None
        when omitted or not a constant."""

    def rows(self, axis: int) -> Rows:
        """The batch on ``axis`` of the rule's output, laid out as in its batched inputs."""

    def producer(self, name: str) -> Node | None:
        """The node that computes ``name``, None for feeds and constants."""

    def mixing(self, node: Node, k: int, p: int) -> GraphError:
        """The refusal for an unbatched input ``k`` that is not size 1 along the batch axis (its axis ``p``)."""

    def rewrite(self, node: Node, k: int, value: np.ndarray) -> None:
        """Give the micro-batches' copy of the model ``value`` as the constant input ``k`` of ``node``."""

    def shape_value(self, name: str, b: int | None = None) -> np.ndarray | None:
        """A :data:`SHAPE` value for a batch of ``b`` samples (default ``n``); None when it cannot be
        computed from shapes and constants alone."""

    def at_sizes(self, node: Node, check: Callable[[int], str | None]) -> None:
        """Have planning call ``check(b)`` for each micro-batch size ``b``: a message there refuses
        ``node`` (values that shapes alone do not pin down, such as computed indices)."""


Rule = Callable[[BatchView, Node, list], "Tag | list[Tag]"]
# (node, tags of its inputs, the reduced ones among them) -> the output's tag
ReducedRule = Callable[[Node, list, list], Tag]


@dataclass(frozen=True)
class BatchRule:
    """How one op moves the batch axis (the ``batch=`` field of its :func:`defop` row).

    ``rule`` maps the input tags to the output tag(s); None marks an op that cannot be split, for
    the reason in ``refused``. ``shape_inputs`` are the inputs read as shapes, which may be
    :data:`SHAPE`. ``shaped_by``: the input whose :data:`SHAPE` value shapes the output when no
    other input is batched (ConstantOfShape, Expand, Tile): one value copied along the batch, so
    batched on the axis whose entry grows with the batch (an RNN's zero state (D, B, H): axis 1),
    axis 0 when planning cannot evaluate it. ``reduced`` (optional) handles inputs reduced over the batch: an op linear
    in them passes the reduction on. ``infer`` fills in an output shape ONNX inference leaves out:
    ``"same"`` as input 0, ``"broadcast"`` of the inputs. ``sized_by_constant``: the op's constant
    shape-like input may spell out the batch size of a fixed-batch export (named in refusals).
    """

    rule: Rule | None
    refused: str = ""
    shape_inputs: tuple[int, ...] = ()
    shaped_by: int | None = None
    reduced: ReducedRule | None = None
    infer: Literal["same", "broadcast"] | None = None
    sized_by_constant: bool = False


def never(why: str) -> BatchRule:
    """The rule of an op that micro-batching refuses, saying ``why``."""
    return BatchRule(None, refused=why)


def refuse(node: Node, why: str) -> GraphError:
    """The error for a node that would make a split batch inexact."""
    return GraphError(f"cannot split the batch into micro-batches or replicas exactly: {node} {why}")


def input_shape(view: BatchView, node: Node, k: int) -> tuple[int, ...]:
    """The shape of input ``k`` of ``node``; refused when planning does not know it."""
    shape = view.shape(node.inputs[k])
    if shape is None:
        raise refuse(node, "has an input of unknown shape")
    return shape


def batched_at(tags: list) -> list[int]:
    """The indices of the batched inputs."""
    return [k for k, t in enumerate(tags) if isinstance(t, Rows)]


def first_rows(tags: list) -> Rows:
    """The tag of the first batched input (a rule is called only when there is one)."""
    return next(t for t in tags if isinstance(t, Rows))


# -- rules many ops share ------------------------------------------------------------------------
def elementwise(view: BatchView, node: Node, tags: list) -> Rows:
    """Broadcasting aligns axes from the right: every batched input must put its batch on the
    same output axis, and every unbatched input must have size 1 there (a bias, a scalar)."""
    known = [view.rank(i) if i else 0 for i in node.inputs]
    out_rank = view.rank(node.outputs[0]) or max((r or 0 for r in known), default=0)  # broadcast rank
    ranks = [r for r in known if r is not None]
    if len(ranks) < len(known):
        raise refuse(node, "has inputs or outputs of unknown shape")
    axes = {t.axis + out_rank - ranks[k] for k, t in enumerate(tags) if isinstance(t, Rows)}
    if len(axes) != 1:
        raise refuse(node, "broadcasts batched inputs against each other along different axes")
    (out_axis,) = axes
    for k, t in enumerate(tags):
        p = out_axis - (out_rank - ranks[k])
        if not node.inputs[k] or isinstance(t, Rows) or p < 0:
            continue
        shape = view.shape(node.inputs[k])  # known, as its rank is
        if shape is not None and shape[p] != 1:
            raise view.mixing(node, k, p)
    return view.rows(out_axis)


def per_sample(view: BatchView, node: Node, tags: list) -> Rows:
    """Batch on axis 0 of input 0; the other inputs are parameters; nothing mixes samples."""
    if batched_at(tags) != [0] or tags[0].axis != 0:
        raise refuse(node, "reads batched parameters, or has the batch off axis 0")
    return view.rows(0)


def along_axis(view: BatchView, node: Node, tags: list, op_axis: int, *, params: bool = True,
               trailing: bool = False) -> Rows:
    """An op working along ``op_axis`` (and with ``trailing`` the axes after it too): exact when the
    batch is not there. With ``params`` its inputs but the first are parameters, never batched."""
    rows = batched_at(tags)
    rank = view.rank(node.inputs[rows[0]])
    axis = first_rows(tags).axis
    if rank is None:
        raise refuse(node, "has an input of unknown shape")
    op_axis %= rank
    if op_axis == axis or (trailing and op_axis < axis):
        raise refuse(node, f"works along the batch axis (axis {axis})")
    if params and rows != [0]:
        raise refuse(node, "reads batched parameters")
    return view.rows(axis)


def along_attr(default: int, *, params: bool = True, trailing: bool = False) -> Rule:
    """The rule of an op working along its ``axis`` attribute (``default`` when omitted)."""
    def rule(view: BatchView, node: Node, tags: list) -> Rows:
        return along_axis(view, node, tags, int(node.attrs.get("axis", default)), params=params, trailing=trailing)
    return rule


def each_output(rule: Rule) -> Rule:
    """``rule``'s tag for every output of the node (Split, TopK)."""
    def per_output(view: BatchView, node: Node, tags: list) -> list:
        return [rule(view, node, tags)] * len(node.outputs)
    return per_output


def linear(node: Node, tags: list, reduced: list) -> Tag:
    """The ``reduced`` rule of an op linear in its first input (a reshape, a cast, a sum...)."""
    if tags[0] in reduced and len(reduced) == 1:
        return reduced[0]
    raise refuse(node, "is not linear in the batch reduction below it")


ELEMENTWISE = BatchRule(elementwise, infer="broadcast")
ELEMENTWISE_LINEAR = BatchRule(elementwise, infer="broadcast", reduced=linear)
PER_SAMPLE = BatchRule(per_sample)
PER_SAMPLE_SAME_SHAPE = BatchRule(per_sample, infer="same")
