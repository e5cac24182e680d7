"""The values of the small side computations micro-batching has to look at, run with the worker's ops.

Two kinds (see :mod:`gradserve.server.planning.batching`):

- values computed from the batch's *shape* only (Shape, then arithmetic: the indices torch's
  exporter builds for ``as_strided``, the shape of an RNN's zero initial state), evaluated for a
  batch of any size: a Shape node's output is the shape its input's batch tag predicts for that
  size, which planning then checks against shape inference of every micro-batch size;
- a loss's labels computed from the feeds (``labels[:, 1:]``), evaluated on each micro-batch's own
  feeds to count its targets.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

from gradserve.worker.autodiff import compile_program, forward
from gradserve.worker.graph import Model, Node

# A value's source when it is not computed by a node of the subgraph: its array, or None when it
# cannot be known (then neither can the value).
Source = Callable[[str], "np.ndarray | None"]


def subgraph(
    target: str, producers: Mapping[str, Node], order: Sequence[Node], source: Callable[[str], bool]
) -> list[Node] | None:
    """The nodes computing ``target`` from the values ``source`` accepts (constants, feeds, shapes),
    in ``order``; None when some value on the way is neither computed nor a source."""
    needed: set[int] = set()
    stack, seen = [target], set()
    while stack:
        name = stack.pop()
        if not name or name in seen:
            continue
        seen.add(name)
        if source(name):
            continue
        maker = producers.get(name)
        if maker is None:
            return None
        needed.add(id(maker))
        stack.extend(maker.inputs)
    return [node for node in order if id(node) in needed]


def evaluate(model: Model, nodes: Sequence[Node], values: Mapping[str, np.ndarray], target: str) -> np.ndarray:
    """``target`` computed by ``nodes`` (topologically sorted) from ``values`` and the model's constants."""
    if not nodes:
        return np.asarray(values[target] if target in values else model.constants[target])
    sources = {**{k: np.asarray(v) for k, v in model.constants.items()}, **values}
    used = {i for node in nodes for i in node.inputs if i}
    sources = {k: v for k, v in sources.items() if k in used}
    program = compile_program(list(nodes), list(sources), [target], [])
    return forward(program, sources).outputs[target]


def shape_of(node: Node, shape: Sequence[int]) -> np.ndarray:
    """What a Shape (or Size) node outputs for an input of ``shape``."""
    if node.op_type == "Size":
        return np.array(int(np.prod(shape)), np.int64)
    start, end = node.attrs.get("start", 0), node.attrs.get("end")
    return np.array(list(shape)[start:end], np.int64)
