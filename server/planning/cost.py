"""Cost model for planning: estimated FLOPs of a node from the shapes of its values.

Estimates, not measurements: matrix products and convolutions dominate real models and are counted
exactly (2 x multiply-adds); everything else counts one FLOP per output element. The backward pass
costs about twice the forward for all of them, so the forward count ranks partitions fairly. A
planner that places by *measured* cost can replace :func:`node_flops` without touching the rest.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from gradserve.worker.graph import Node
from gradserve.worker.ops.linalg import FUSED_GEMM, FUSED_LINEAR
from gradserve.worker.validate import ValueInfo


def _numel(info: ValueInfo | None) -> int:
    return int(np.prod(info.shape, dtype=np.int64)) if info is not None else 0


def node_flops(node: Node, shapes: Mapping[str, ValueInfo]) -> int:
    """Estimated forward FLOPs of ``node``."""
    out = _numel(shapes.get(node.outputs[0])) if node.outputs else 0
    first = shapes.get(node.inputs[0]) if node.inputs and node.inputs[0] else None
    if node.op_type in ("MatMul", FUSED_LINEAR) and first is not None and first.shape:
        return 2 * out * first.shape[-1]
    if node.op_type in ("Gemm", FUSED_GEMM) and first is not None and len(first.shape) == 2:
        k = first.shape[0] if node.attrs.get("transA", 0) else first.shape[1]
        return 2 * out * k
    if node.op_type == "Conv" and len(node.inputs) > 1:
        w = shapes.get(node.inputs[1])
        if w is not None and len(w.shape) >= 3:
            return 2 * out * int(np.prod(w.shape[1:], dtype=np.int64))
    if node.op_type == "ConvTranspose" and len(node.inputs) > 1:
        w = shapes.get(node.inputs[1])  # (C_in, C_out / group, k...): each input element feeds a kernel's worth
        if w is not None and len(w.shape) >= 3:
            return 2 * _numel(first) * int(np.prod(w.shape[1:], dtype=np.int64))
    if node.op_type in ("RNN", "GRU", "LSTM") and len(node.inputs) > 2:
        w, r = shapes.get(node.inputs[1]), shapes.get(node.inputs[2])  # (D, G*H, I), (D, G*H, H)
        if w is not None and r is not None and first is not None and len(first.shape) == 3:
            steps_x_batch = first.shape[0] * first.shape[1]
            return 2 * steps_x_batch * (_numel(w) + _numel(r))
    ins = sum(_numel(shapes.get(i)) for i in node.inputs if i)
    return max(out, ins, 1)
