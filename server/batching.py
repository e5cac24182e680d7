"""Splitting a batch into micro-batches (and replicas) so that the summed result is exact.

A micro-batch's loss enters the total with a weight: for a loss that is a *sum* over the batch the
weight is 1; for a *mean* it is the micro-batch's share of the batch (its share of the non-ignored
targets for a cross-entropy with ``ignore_index``). The backward pass is seeded with that weight, so
dL/dw summed over micro-batches equals the unsplit job's.

That is only exact when every sample's rows are computed independently of the other samples' until
one final reduction over the batch. :func:`loss_reduction` checks this by following the batch axis
through the graph with a whitelist of ops known to keep rows independent; anything else (a batch
mean below the loss, training-mode BatchNorm, a term that does not depend on the batch and would be
counted once per micro-batch, the batch size used as data...) is refused, naming the node.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from gradserve.server.prepare import PreparedJob
from gradserve.worker.graph import GraphError, Model, Node



@dataclass(frozen=True)
class Chunk:
    """One slice of the batch: its feeds and the weight of its loss in the total."""

    feeds: dict[str, np.ndarray]
    weight: float


def split_batch(model: Model, job: PreparedJob, feeds: Mapping[str, np.ndarray], parts: int) -> list[Chunk]:
    """Split ``feeds`` along the batch axis into ``parts`` chunks with their loss weights."""
    if parts == 1:
        return [Chunk(dict(feeds), 1.0)]
    batched = [s.name for s in model.inputs if s.shape and not isinstance(s.shape[0], int) and s.name in feeds]
    if not batched:
        raise GraphError(
            "micro-batches/replicas need an input whose first axis is a symbolic batch dimension "
            "(export the ONNX model with dynamic_axes, or declare the input with shape (None, ...))"
        )
    n = feeds[batched[0]].shape[0]
    for name in batched:
        if feeds[name].shape[0] != n:
            raise GraphError(f"feed '{name}' has batch size {feeds[name].shape[0]}, feed '{batched[0]}' has {n}")
    if n < parts:
        raise GraphError(f"a batch of {n} cannot be split into {parts} micro-batches x replicas")
    kind, detail = loss_reduction(model, job, set(batched))
    bounds = np.linspace(0, n, parts + 1).round().astype(int)
    if kind == "count":  # every chunk needs a target that is not ignored, or its mean is 0/0
        labels, ignore = detail
        if labels not in feeds:
            raise GraphError(f"cannot weight micro-batches: labels '{labels}' of the loss are not a feed")
        counted = np.flatnonzero((feeds[labels] != ignore).reshape(n, -1).any(axis=1))
        if len(counted) < parts:
            raise GraphError(
                f"only {len(counted)} samples have targets in '{labels}' that are not ignore_index {ignore}: "
                f"too few for {parts} micro-batches x replicas"
            )
        bounds = np.array([0, *counted[np.linspace(0, len(counted), parts + 1).round().astype(int)[1:-1]], n])
    chunks = []
    for a, b in zip(bounds, bounds[1:]):
        part = {k: (v[a:b] if k in batched else v) for k, v in feeds.items()}
        chunks.append(Chunk(part, 1.0))
    if kind == "sum":
        return chunks
    if kind == "mean":
        return [Chunk(c.feeds, (b - a) / n) for c, a, b in zip(chunks, bounds, bounds[1:])]
    # kind == "count": mean over the targets that are not ignored
    labels, ignore = detail
    total = int(np.count_nonzero(feeds[labels] != ignore))
    if total == 0:
        raise GraphError(f"every target in '{labels}' equals ignore_index {ignore}")
    return [Chunk(c.feeds, np.count_nonzero(c.feeds[labels] != ignore) / total) for c in chunks]


# -- following the batch axis ------------------------------------------------------------------------
# Tags of a value: not derived from the batch; derived only from its *shape* (Shape, and arithmetic
# on it: fine as a shape, wrong as data); batch on axis 0 with rows independent; or reduced over the
# batch (with the reduction's kind).
NONE, SHAPE, ROWS = "none", "shape", "rows"

_ELEMENTWISE = {
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where", "Neg", "Abs", "Exp", "Log",
    "Sqrt", "Reciprocal", "Tanh", "Sigmoid", "Relu", "LeakyRelu", "Softplus", "Erf", "Clip", "Cast",
    "Identity", "Dropout", "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Not", "And", "Or", "Xor",
}
_PER_SAMPLE = {"Conv", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "InstanceNormalization"}
_AXIS_OPS = {"Softmax": -1, "LogSoftmax": -1, "Hardmax": -1, "LayerNormalization": -1, "Flatten": 1, "Concat": None,
             "Split": 0}
_LINEAR_ON_REDUCED = {"Neg", "Identity", "Squeeze", "Unsqueeze", "Reshape", "Cast", "Flatten", "Transpose",
                      "ReduceSum", "ReduceMean", "Expand"}
_SHAPE_INPUTS = {"Reshape": (1,), "Expand": (1,), "Slice": (1, 2, 3, 4), "ConstantOfShape": (0,),
                 "Squeeze": (1,), "Unsqueeze": (1,), "ReduceSum": (1,), "Split": (1,)}


def loss_reduction(model: Model, job: PreparedJob, batched: set[str]) -> tuple[str, object]:
    """How the loss reduces over the batch: ("sum", None), ("mean", None) or ("count", (labels,
    ignore_index)). Raises GraphError, naming the node, when splitting the batch would not be exact."""
    tags: dict[str, object] = {name: ROWS for name in batched}
    for node in job.nodes:
        tag = _propagate(model, job, node, [tags.get(i, NONE) if i else NONE for i in node.inputs])
        for out in node.outputs:
            if out:
                tags[out] = tag
    final = tags.get(model.loss, NONE)
    if isinstance(final, tuple):
        return final
    raise GraphError(f"loss '{model.loss}' is not a sum or mean over the batch, so it cannot be split into "
                     "micro-batches or replicas")


def _propagate(model: Model, job: PreparedJob, node: Node, tags: list) -> object:
    op = node.op_type
    reduced = [t for t in tags if isinstance(t, tuple)]
    if op == "ConstantOfShape" and tags[0] == SHAPE:
        return ROWS  # one value everywhere, shaped like (a part of) the batch: mixes no samples
    if ROWS not in tags and not reduced:
        return SHAPE if SHAPE in tags else NONE
    shape_ok = set(_SHAPE_INPUTS.get(op, ()))
    if any(t == SHAPE and k not in shape_ok for k, t in enumerate(tags)):
        raise _refuse(node, "uses the batch size as data; each micro-batch would see its own size")
    if reduced:
        return _propagate_reduced(node, tags, reduced)
    if op in ("Shape", "Size"):
        return SHAPE
    rank = lambda k: len(job.shapes[node.inputs[k]].shape) if node.inputs[k] in job.shapes else None  # noqa: E731
    out_rank = len(job.shapes[node.outputs[0]].shape) if node.outputs[0] in job.shapes else None
    rows = [k for k, t in enumerate(tags) if t == ROWS]
    if op in _ELEMENTWISE:
        for k, t in enumerate(tags):
            if t == ROWS and rank(k) != out_rank:
                raise _refuse(node, "broadcasts a batched input against a larger one")
            if t == NONE and node.inputs[k] and rank(k) == out_rank and out_rank and job.shapes[node.inputs[k]].shape[0] != 1:
                raise _refuse(node, "mixes a batched value with an unbatched one along the batch axis")
        return ROWS
    if op == "MatMul":
        if rows == [0] and rank(0) == out_rank and (rank(1) or 0) <= 2:
            return ROWS
        if rows == [1] and rank(1) == out_rank and out_rank >= 3 and (rank(0) or 0) <= 2:
            return ROWS
        if rows == [0, 1] and rank(0) == rank(1) == out_rank and out_rank >= 3:
            return ROWS  # batched product: sample i's rows times sample i's rows
        raise _refuse(node, "contracts over the batch axis")
    if op == "Gemm":
        if rows == [0] and not node.attrs.get("transA", 0):
            return ROWS
        raise _refuse(node, "contracts over the batch axis")
    if op in _PER_SAMPLE or (op == "BatchNormalization" and not node.attrs.get("training_mode", 0)):
        if rows == [0]:
            return ROWS
        raise _refuse(node, "reads batched parameters")
    if op == "BatchNormalization":
        raise _refuse(node, "in training mode normalises with statistics of the whole batch")
    if op in _AXIS_OPS and rows:
        axis = int(node.attrs.get("axis", _AXIS_OPS[op] if _AXIS_OPS[op] is not None else 0))
        if axis % max(rank(rows[0]) or 1, 1) == 0:
            raise _refuse(node, f"works along the batch axis (axis {axis})")
        if op == "Concat" and NONE in [t for t, i in zip(tags, node.inputs) if i]:
            raise _refuse(node, "concatenates a batched value with an unbatched one")
        if op == "LayerNormalization" and rows != [0]:
            raise _refuse(node, "reads batched parameters")
        return ROWS
    if op == "Transpose":
        perm = node.attrs.get("perm")
        if rows == [0] and perm is not None and perm[0] == 0:
            return ROWS
        raise _refuse(node, "moves the batch axis")
    if op in ("Squeeze", "Unsqueeze", "Slice") and rows == [0]:
        axes = _axes_of(model, node)
        axes_rank = out_rank if op == "Unsqueeze" else rank(0)
        if axes is not None and axes_rank and 0 not in [a % axes_rank for a in axes]:
            return ROWS
        raise _refuse(node, "changes the batch axis")
    if op in ("Reshape", "Expand") and rows == [0]:
        src, dst = job.shapes.get(node.inputs[0]), job.shapes.get(node.outputs[0])
        if src is not None and dst is not None and src.shape and dst.shape and src.shape[0] == dst.shape[0]:
            return ROWS  # the batch axis stays first and keeps its size
        raise _refuse(node, "changes the batch axis")
    if op == "Gather":
        axis = int(node.attrs.get("axis", 0))
        if rows == [1] and axis == 0:
            return ROWS  # embedding lookup: sample i's indices pick rows of an unbatched table
        if rows == [0] and axis % max(rank(0) or 1, 1) != 0:
            return ROWS
        raise _refuse(node, "gathers along the batch axis")
    if op in ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
              "ReduceSumSquare", "ReduceLogSumExp") and rows == [0]:
        axes = _axes_of(model, node)
        if axes is not None and axes and 0 not in [a % max(rank(0) or 1, 1) for a in axes]:
            return ROWS  # a reduction within each sample
        if op == "ReduceMean":
            return ("mean", None)
        if op == "ReduceSum":
            return ("sum", None)
        raise _refuse(node, "reduces over the batch with something other than a sum or a mean")
    if op in ("SoftmaxCrossEntropyLoss", "NegativeLogLikelihoodLoss") and rows[:2] == [0, 1]:
        reduction = node.attrs.get("reduction", "mean")
        if len(node.inputs) > 2 and node.inputs[2] and reduction == "mean":
            raise _refuse(node, "is a class-weighted mean")
        if reduction == "none":
            return ROWS
        if reduction == "sum":
            return ("sum", None)
        if "ignore_index" in node.attrs:
            return ("count", (node.inputs[1], int(node.attrs["ignore_index"])))
        return ("mean", None)
    raise _refuse(node, "is not known to keep the samples of a batch independent")


def _propagate_reduced(node: Node, tags: list, reduced: list) -> object:
    op = node.op_type
    if ROWS in tags:
        raise _refuse(node, "combines a batch reduction with per-sample values")
    if op == "Mul" and len(reduced) == 1:
        return reduced[0]  # times a batch-independent factor: still linear in the reduction
    if op == "Div" and tags[0] in reduced and len(reduced) == 1:
        return reduced[0]
    if op in ("Add", "Sub"):
        if NONE in tags or SHAPE in tags:
            raise _refuse(node, "adds a term that does not depend on the batch; split into micro-batches it "
                                "would be counted once per micro-batch")
        if len(set(reduced)) == 1 and reduced[0][0] != "count":
            return reduced[0]
        raise _refuse(node, "adds batch reductions of different kinds (a sum and a mean, or cross-entropies)")
    if op in _LINEAR_ON_REDUCED and tags[0] in reduced and len(reduced) == 1:
        return reduced[0]
    raise _refuse(node, "is not linear in the batch reduction below it")


def _axes_of(model: Model, node: Node) -> list[int] | None:
    """The ``axes`` of a node, from its attribute or its constant input; None when unknown/all."""
    if "axes" in node.attrs:
        return [int(a) for a in node.attrs["axes"]]
    index = {"ReduceSum": 1, "Squeeze": 1, "Unsqueeze": 1, "Slice": 3}.get(node.op_type)
    if index is not None and len(node.inputs) > index and node.inputs[index] in model.constants:
        return [int(a) for a in np.ravel(model.constants[node.inputs[index]])]
    return None


def _refuse(node: Node, why: str) -> GraphError:
    return GraphError(f"cannot split the batch into micro-batches or replicas exactly: {node} {why}")
