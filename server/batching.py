"""Splitting a batch into micro-batches (and replicas) so that the summed result is exact.

A micro-batch's loss enters the total with a weight: for a loss that is a *sum* over the batch the
weight is 1; for a *mean* it is the micro-batch's share of the batch (its share of the non-ignored
targets for a cross-entropy with ``ignore_index``). The backward pass is seeded with that weight, so
dL/dw summed over micro-batches equals the unsplit job's. The reduction is read off the graph; a loss
that is neither a sum nor a mean over the batch (or a graph with training-mode BatchNormalization,
whose statistics depend on the whole batch) cannot be split exactly and is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from gradserve.worker.graph import GraphError, Model, Node

# Ops that pass a scalar through a constant factor: the reduction below them decides.
_SCALAR_PASS = {"Identity", "Neg", "Squeeze", "Unsqueeze", "Reshape", "Cast", "Flatten"}
_SCALE_BY_CONSTANT = {"Mul", "Div"}


@dataclass(frozen=True)
class Chunk:
    """One slice of the batch: its feeds and the weight of its loss in the total."""

    feeds: dict[str, np.ndarray]
    weight: float


def split_batch(model: Model, nodes: list[Node], feeds: Mapping[str, np.ndarray], parts: int) -> list[Chunk]:
    """Split ``feeds`` along the batch axis into ``parts`` chunks with their loss weights."""
    if parts == 1:
        return [Chunk(dict(feeds), 1.0)]
    for node in nodes:
        if node.op_type == "BatchNormalization" and node.attrs.get("training_mode", 0):
            raise GraphError(
                f"{node}: training-mode batch statistics depend on the whole batch, so it cannot be "
                "split into micro-batches or replicas exactly; use micro_batches=1 and replicas=1"
            )
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
    kind, detail = loss_reduction(model, nodes)
    bounds = np.linspace(0, n, parts + 1).round().astype(int)
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
    if labels not in feeds:
        raise GraphError(f"cannot weight micro-batches: labels '{labels}' of the loss are not a feed")
    total = int(np.count_nonzero(feeds[labels] != ignore))
    if total == 0:
        raise GraphError(f"every target in '{labels}' equals ignore_index {ignore}")
    return [Chunk(c.feeds, np.count_nonzero(c.feeds[labels] != ignore) / total) for c in chunks]


def loss_reduction(model: Model, nodes: list[Node]) -> tuple[str, object]:
    """How the loss reduces over the batch: ("sum", None), ("mean", None) or ("count", (labels,
    ignore_index)). Raises GraphError when it is none of them."""
    producer = {o: n for n in nodes for o in n.outputs if o}
    return _reduction(model, producer, model.loss)


def _reduction(model: Model, producer: dict[str, Node], value: str) -> tuple[str, object]:
    node = producer.get(value)
    while node is not None and (
        node.op_type in _SCALAR_PASS or (node.op_type in _SCALE_BY_CONSTANT and _constant_factor(model, node))
    ):
        value = _constant_factor(model, node) or node.inputs[0]
        node = producer.get(value)
    if node is None:
        raise GraphError(f"loss '{model.loss}' is not computed from the batch; nothing to split")
    op = node.op_type
    if op in ("Add", "Sub"):
        kinds = {_reduction(model, producer, i) for i in node.inputs}
        if len(kinds) == 1 and next(iter(kinds))[0] != "count":
            return kinds.pop()
    if op == "ReduceMean":
        return "mean", None
    if op == "ReduceSum":
        return "sum", None
    if op in ("SoftmaxCrossEntropyLoss", "NegativeLogLikelihoodLoss"):
        reduction = node.attrs.get("reduction", "mean")
        if reduction == "sum":
            return "sum", None
        if reduction == "mean":
            if len(node.inputs) > 2 and node.inputs[2]:
                raise GraphError(f"{node}: a class-weighted mean cannot be split into micro-batches exactly")
            if "ignore_index" in node.attrs:
                return "count", (node.inputs[1], int(node.attrs["ignore_index"]))
            return "mean", None
    raise GraphError(
        f"{node}: the loss must be a sum or mean over the batch (ReduceSum, ReduceMean or a "
        "cross-entropy, times constants, or a sum of such terms) to split it into micro-batches or replicas"
    )


def _constant_factor(model: Model, node: Node) -> str | None:
    """For Mul/Div by a constant, the other (varying) operand; else None."""
    if node.op_type not in _SCALE_BY_CONSTANT or len(node.inputs) != 2:
        return None
    a, b = node.inputs
    if b in model.constants:
        return a
    if node.op_type == "Mul" and a in model.constants:
        return b
    return None
