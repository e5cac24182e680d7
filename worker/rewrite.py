"""Graph rewrites that make a job cheaper and leave every value the caller sees -- the loss, each
dL/dw, each requested dL/dx -- exactly as it was, bit for bit.

Applied to the checked, pruned nodes of a job (see :func:`gradserve.server.planning.prepare.prepare`), so
both engines and the partitioner see the same graph. Node names are kept: an error still names the
node the user wrote.

- **Relu before MaxPool runs after it.** ReLU is monotonic, so the max of rectified values is the
  rectified max: MaxPool(Relu(x)) = Relu(MaxPool(x)), and the ReLU then touches a quarter of the
  values (2x2 pools). The gradients are identical, ties included: where the window's max is
  positive both forms send the error to the first position holding it; where it is not, both send
  nothing (the rectified window is all zeros, and ReLU's derivative there is 0).
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Mapping

from gradserve.worker.graph import Node
from gradserve.worker.validate import ValueInfo


def optimize(
    nodes: list[Node], shapes: Mapping[str, ValueInfo], keep: Iterable[str]
) -> tuple[list[Node], dict[str, ValueInfo], list[str]]:
    """The rewritten nodes (still in topological order), the shapes of their values, and one line
    per rewrite saying what changed (``gradserve plan`` shows them). ``keep`` names values whose
    meaning must not change (the loss, feeds, parameters)."""
    keep = set(keep)
    notes = []
    readers = Counter(i for node in nodes for i in node.inputs if i)
    position = {o: k for k, node in enumerate(nodes) for o in node.outputs if o}
    nodes, shapes = list(nodes), dict(shapes)
    for k, node in enumerate(nodes):
        if node.op_type != "MaxPool" or len([o for o in node.outputs if o]) != 1 or not node.inputs:
            continue
        rectified = node.inputs[0]
        j = position.get(rectified)
        if j is None or rectified in keep or readers[rectified] != 1:
            continue
        relu = nodes[j]
        if relu.op_type != "Relu":
            continue
        pooled = node.outputs[0]
        # MaxPool now reads the ReLU's input and writes the value the ReLU wrote, which takes the
        # pooled shape; the ReLU reads that and writes what MaxPool wrote. Between the two
        # positions nothing reads the value (its only reader was the MaxPool), so order holds.
        nodes[j] = Node(node.name, node.op_type, [relu.inputs[0], *node.inputs[1:]], [rectified], node.attrs)
        nodes[k] = Node(relu.name, relu.op_type, [rectified], [pooled], relu.attrs)
        shapes[rectified] = shapes[pooled]
        notes.append(f"{relu} runs after {node}, on the pooled values (exact: the max of rectified values is the rectified max)")
    return nodes, shapes, notes
