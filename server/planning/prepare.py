"""Turning (model, feeds) into a checked, pruned, shape-inferred job description, with the
exact rewrites of :mod:`gradserve.worker.rewrite` applied.

Checking costs a few milliseconds (ONNX shape inference), so the result is cached per model
structure and feed signature: repeated jobs on the same model and batch shape skip it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np

from gradserve.worker.graph import GraphError, Model, Node, feed_signature
from gradserve.worker.rewrite import optimize
from gradserve.worker.validate import ValueInfo, check_feeds, check_loss, check_structure, infer_shapes


@dataclass(frozen=True)
class PreparedJob:
    """A validated model ready for planning: the nodes that reach the loss in topological order,
    the shape and dtype of every value, and the values whose error the job returns."""

    nodes: tuple[Node, ...]
    shapes: Mapping[str, ValueInfo]
    params: tuple[str, ...]
    input_grads: tuple[str, ...]
    loss: str
    rewrites: tuple[str, ...] = ()  # what the exact rewrites changed, one line each
    structure: str = ""  # the model's structure fingerprint (Model.structure_fingerprint), a cache key

    @property
    def wrt(self) -> tuple[str, ...]:
        return self.params + self.input_grads


_CACHE: "OrderedDict[tuple, PreparedJob]" = OrderedDict()
_LOCK = threading.Lock()
_CACHE_SIZE = 64


def prepare(
    model: Model, feeds: Mapping[str, np.ndarray], input_grads: Iterable[str] = (), *, structure: str | None = None
) -> PreparedJob:
    """Validate ``model`` against ``feeds``; raise GraphError naming the culprit if anything is off.

    Prepared jobs are cached by the model's structure, the feeds' shapes and ``input_grads``.
    ``structure``: the model's :meth:`~gradserve.worker.graph.Model.structure_fingerprint` when
    the caller already has it (the server computes it once per stored model): it serializes the
    whole graph, which costs more than a small job's arithmetic."""
    input_grads = tuple(input_grads)
    check_feeds(model, feeds)
    for name in input_grads:
        spec = model.input_spec(name)
        if spec is None:
            raise GraphError(f"gradient requested for '{name}', which is not an input of the model")
        if spec.dtype.kind != "f":
            raise GraphError(f"gradient requested for input '{name}' of non-floating dtype {spec.dtype.name}")
    structure = structure or model.structure_fingerprint()
    key = (structure, feed_signature(feeds), input_grads)
    with _LOCK:
        hit = _CACHE.get(key)
        if hit is not None:
            _CACHE.move_to_end(key)
            return hit
    nodes = check_structure(model)
    shapes = infer_shapes(model, nodes, feeds)
    check_loss(model, shapes)
    nodes, shapes, rewrites = optimize(
        nodes, shapes, keep={model.loss, *model.params, *model.constants, *feeds}, constants=model.constants
    )
    params = tuple(p for p, v in model.params.items() if v.dtype.kind == "f")
    job = PreparedJob(tuple(nodes), shapes, params, input_grads, model.loss, tuple(rewrites), structure)
    with _LOCK:
        _CACHE[key] = job
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return job
