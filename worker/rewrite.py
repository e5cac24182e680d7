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
- **Training-mode BatchNormalization, and the MaxPool and/or Relu that are its only readers, run as
  one node** (``gradserve.BatchNormReluMaxPool``, see :mod:`gradserve.worker.ops.batchnorm`), when the
  compiled kernels are available: the statistics and the normalisation in one read of the
  activation, the ReLU and the pool applied as the values are made, the normalised activation never
  written. Exact up to float rounding (the statistics are summed in float64 in another order), not
  bit for bit; the pool picks the same window maximum, the ReLU passes the same errors.
- **GELU written out with Erf becomes one Gelu node**: ``x / sqrt(2)`` (or ``x * (1 / sqrt(2))``),
  ``Erf``, ``+ 1``, ``* x`` and ``* 0.5`` in either order -- what torch's exporters write for
  ``nn.GELU()`` below opset 20 -- with the constants equal to those numbers to the data dtype's rounding.
  One pass each way with the compiled kernels instead of five ops. Exact up to float rounding.
- **A Gemm and the activation (Relu, Tanh, Sigmoid) that is its only reader run as one node**
  (``gradserve.GemmActivation``, see :mod:`gradserve.worker.ops.linalg`), when the compiled kernels
  are on: the activation's VJP in one compiled pass (numpy's formula on small arrays), and the
  product's output never kept. Exact up to float rounding.
- **A MatMul by a 2-D weight and the Add of a bias along its last axis run as one node**
  (``gradserve.MatMulAdd``, see :mod:`gradserve.worker.ops.linalg`): torch's nn.Linear on inputs of
  more than two dims. A Gemm of the rows, the product added into the bias by BLAS. Exact up to
  float rounding.
- **A mean squared error runs as one node** (``gradserve.MeanSquaredError``, see
  :mod:`gradserve.worker.ops.loss`), when the compiled kernels are on: ``Sub``, then ``Mul``
  of the difference by itself (or ``Pow`` with the constant 2), then ``ReduceMean`` over every
  axis, each the only reader of the value before it, the two inputs of one shape -- what
  ``F.mse_loss`` exports to. The difference and the sum of its squares in one pass (summed in
  float64), the VJP in one (numpy's passes on small arrays). Exact up to float rounding.

"The kernels are on" is :func:`gradserve.worker.kernels.enabled`: numba installed and not turned
off, asked without importing it. Of these nodes only the BatchNormalization one has no numpy path,
so only a model that has one makes planning import numba; the others call a kernel only for arrays
large enough to pay for it, so a process running small jobs never loads numba at all.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Iterable, Mapping

import numpy as np

from gradserve.worker import kernels
from gradserve.worker.graph import Node
from gradserve.worker.ops.activations import FAST_ACTIVATIONS
from gradserve.worker.ops.linalg import FUSED_GEMM, FUSED_LINEAR
from gradserve.worker.ops.loss import FUSED_MSE
from gradserve.worker.ops.batchnorm import FUSED_BATCHNORM, POOL_PREFIX
from gradserve.worker.validate import ValueInfo


def optimize(
    nodes: list[Node],
    shapes: Mapping[str, ValueInfo],
    keep: Iterable[str],
    constants: Mapping[str, np.ndarray] | None = None,
) -> tuple[list[Node], dict[str, ValueInfo], list[str]]:
    """The rewritten nodes (still in topological order), the shapes of their values, and one line
    per rewrite saying what changed (``gradserve plan`` shows them). ``keep`` names values whose
    meaning must not change (the loss, feeds, parameters); ``constants`` are the model's constant
    values (a rewrite may depend on them; parameters never count as constants)."""
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
        notes.append(
            f"{relu} runs after {node}, on the pooled values (exact: the max of rectified values is the rectified max)"
        )
    nodes = _fuse_gelu(nodes, shapes, keep, constants or {}, notes)
    nodes = _fuse_linear(nodes, shapes, keep, notes)
    if kernels.enabled():  # (without importing numba: see the module docs)
        nodes = _fuse_batchnorm(nodes, shapes, keep, notes)
        nodes = _fuse_gemm_activation(nodes, shapes, keep, notes)
        nodes = _fuse_squared_error(nodes, shapes, keep, constants or {}, notes)
    return nodes, shapes, notes


def _uses(nodes: list[Node]) -> tuple[Counter, dict[str, int]]:
    """How many nodes read each value, and a node that reads it: its only reader where the count is 1."""
    readers = Counter(i for node in nodes for i in node.inputs if i)
    return readers, {i: k for k, node in enumerate(nodes) for i in node.inputs if i}


def _replaced(nodes: list[Node], fused: dict[int, Node], gone: set[int]) -> list[Node]:
    """``nodes`` with the ``fused`` nodes in the places they are keyed by, and the ``gone`` ones dropped."""
    return [fused.get(k, node) for k, node in enumerate(nodes) if k not in gone]


def _fuse_gelu(
    nodes: list[Node],
    shapes: dict[str, ValueInfo],
    keep: set[str],
    constants: Mapping[str, np.ndarray],
    notes: list[str],
) -> list[Node]:
    """Each ``0.5 * x * (1 + erf(x / sqrt(2)))`` written out in ops (see the module docs) becomes
    one Gelu node with the Erf's name, in the place of the last of them."""
    readers, reader = _uses(nodes)
    producer = {o: k for k, node in enumerate(nodes) for o in node.outputs if o}

    def only_reader(value: str, op_type: str) -> int | None:
        """The node that is ``value``'s only reader, if it is a two-input ``op_type`` and the
        value is the job's own (not kept)."""
        k = reader.get(value)
        if k is None or readers[value] != 1 or value in keep:
            return None
        return k if nodes[k].op_type == op_type and len(nodes[k].inputs) == 2 else None

    def other(node: Node, value: str) -> str:
        a, b = node.inputs
        return b if a == value else a

    fused: dict[int, Node] = {}
    gone: set[int] = set()
    for k, erf in enumerate(nodes):
        info = shapes.get(erf.outputs[0]) if erf.op_type == "Erf" and erf.outputs else None
        if (
            info is None
            or info.dtype not in (np.float32, np.float64)
            or erf.inputs[0] in keep
            or readers[erf.inputs[0]] != 1
        ):
            continue

        def const(name: str, value: float) -> bool:
            """A constant scalar equal to ``value`` up to the data dtype's rounding (2 ulp)."""
            c = constants.get(name)
            if c is None or c.size != 1 or c.dtype.kind != "f":
                return False
            return abs(float(c.reshape(())) - value) <= 2 * float(np.finfo(info.dtype).eps) * abs(value)

        j = producer.get(erf.inputs[0])
        if j is None or len(nodes[j].inputs) != 2:
            continue
        scale = nodes[j]
        if scale.op_type == "Div" and const(scale.inputs[1], math.sqrt(2.0)):
            x = scale.inputs[0]
        elif scale.op_type == "Mul" and const(scale.inputs[1], math.sqrt(0.5)):
            x = scale.inputs[0]
        elif scale.op_type == "Mul" and const(scale.inputs[0], math.sqrt(0.5)):
            x = scale.inputs[1]
        else:
            continue
        plus = only_reader(erf.outputs[0], "Add")
        if plus is None or not const(other(nodes[plus], erf.outputs[0]), 1.0):
            continue
        first = only_reader(nodes[plus].outputs[0], "Mul")
        if first is None:
            continue
        factor = other(nodes[first], nodes[plus].outputs[0])  # x, then * 0.5; or 0.5, then * x
        last = only_reader(nodes[first].outputs[0], "Mul")
        if last is None or not (
            factor == x
            and const(other(nodes[last], nodes[first].outputs[0]), 0.5)
            or const(factor, 0.5)
            and other(nodes[last], nodes[first].outputs[0]) == x
        ):
            continue
        y = nodes[last].outputs[0]
        if shapes.get(y) != shapes.get(x):  # a constant of higher rank would have broadcast x
            continue
        fused[last] = Node(erf.name, "Gelu", [x], [y], {})
        gone.update((j, k, plus, first))
        for i in (j, k, plus, first):
            shapes.pop(nodes[i].outputs[0], None)
        notes.append(f"{erf} and the four ops around it run as one Gelu (exact up to float rounding)")
    return _replaced(nodes, fused, gone)


def _fuse_gemm_activation(
    nodes: list[Node], shapes: dict[str, ValueInfo], keep: set[str], notes: list[str]
) -> list[Node]:
    """Each float32/float64 Gemm whose output is read only by a Relu, Tanh or Sigmoid becomes one
    node with the Gemm's name, in the Gemm's place, writing the activation's output."""
    readers, reader = _uses(nodes)
    fused: dict[int, Node] = {}
    gone: set[int] = set()
    for k, gemm in enumerate(nodes):
        out = gemm.outputs[0] if gemm.op_type == "Gemm" and len(gemm.outputs) == 1 else ""
        info = shapes.get(out)
        if not out or out in keep or readers[out] != 1 or info is None or info.dtype not in (np.float32, np.float64):
            continue
        act = nodes[reader[out]]
        if act.op_type not in FAST_ACTIVATIONS or act.inputs != [out] or len(act.outputs) != 1:
            continue
        fused[k] = Node(
            gemm.name, FUSED_GEMM, list(gemm.inputs), list(act.outputs), {**gemm.attrs, "activation": act.op_type}
        )
        gone.add(reader[out])
        shapes.pop(out, None)
        notes.append(f"{gemm} runs as one node with {act} (exact up to float rounding)")
    return _replaced(nodes, fused, gone)


def _fuse_batchnorm(nodes: list[Node], shapes: dict[str, ValueInfo], keep: set[str], notes: list[str]) -> list[Node]:
    """Each training-mode BatchNormalization (float32/float64, running statistics unread) followed
    by a MaxPool (2 spatial dims, no Indices) and/or a Relu, each the only reader of the value
    before it, becomes one node with the BatchNormalization's name, in its place."""
    readers, reader = _uses(nodes)
    fused: dict[int, Node] = {}
    gone: set[int] = set()
    for k, bn in enumerate(nodes):
        info = shapes.get(bn.inputs[0]) if bn.inputs else None
        if (
            bn.op_type != "BatchNormalization"
            or not int(bn.attrs.get("training_mode", 0))
            or len(bn.inputs) < 3
            or info is None
            or info.dtype not in (np.float32, np.float64)
            or any(o and (readers[o] or o in keep) for o in bn.outputs[1:])
        ):
            continue
        chain, value, pooled = [], bn.outputs[0], False
        attrs = {"epsilon": bn.attrs.get("epsilon", 1e-5), "relu": 0}
        while value not in keep and readers[value] == 1:
            j = reader[value]
            nxt = nodes[j]
            single = nxt.inputs[:1] == [value] and len([o for o in nxt.outputs if o]) == 1 and nxt.outputs[0]
            if not single:
                break
            if nxt.op_type == "Relu" and not attrs["relu"]:
                attrs["relu"] = 1
            elif nxt.op_type == "MaxPool" and len(info.shape) == 4 and len(nxt.inputs) == 1 and not pooled:
                attrs.update({POOL_PREFIX + a: v for a, v in nxt.attrs.items() if a != "storage_order"})
                pooled = True
            else:
                break
            chain.append(j)
            value = nxt.outputs[0]
        # the fused node has no numpy path: numba must import (asked only of a model that has one)
        if not chain or not kernels.available():
            continue
        fused[k] = Node(bn.name, FUSED_BATCHNORM, list(bn.inputs[:3]), [value], attrs)
        gone.update(chain)
        for o in [*bn.outputs, *(nodes[j].outputs[0] for j in chain[:-1])]:
            shapes.pop(o, None)
        notes.append(
            f"{bn} runs as one kernel with {' and '.join(str(nodes[j]) for j in chain)} "
            "(exact up to float rounding: statistics summed in float64)"
        )
    return _replaced(nodes, fused, gone)


def _fuse_squared_error(
    nodes: list[Node],
    shapes: dict[str, ValueInfo],
    keep: set[str],
    constants: Mapping[str, np.ndarray],
    notes: list[str],
) -> list[Node]:
    """Each mean of squared differences written out in ops (see the module docs) becomes one node
    with the ReduceMean's name, in its place."""
    readers, reader = _uses(nodes)
    producer = {o: k for k, node in enumerate(nodes) for o in node.outputs if o}
    fused: dict[int, Node] = {}
    gone: set[int] = set()
    for k, mean in enumerate(nodes):
        if mean.op_type != "ReduceMean" or len(mean.outputs) != 1 or not mean.inputs:
            continue
        square = mean.inputs[0]
        j = producer.get(square)
        if (
            j is None
            or square in keep
            or readers[square] != 1
            or not _over_every_axis(mean, shapes.get(square), constants)
        ):
            continue
        sq = nodes[j]
        diff = sq.inputs[0] if sq.inputs else ""
        if sq.op_type == "Mul" and sq.inputs == [diff, diff]:
            uses = 2
        elif sq.op_type == "Pow" and len(sq.inputs) == 2 and _is_two(constants.get(sq.inputs[1])):
            uses = 1
        else:
            continue
        i = producer.get(diff)
        if i is None or diff in keep or readers[diff] != uses or nodes[i].op_type != "Sub" or len(nodes[i].inputs) != 2:
            continue
        sub = nodes[i]
        a, b = (shapes.get(v) for v in sub.inputs)
        if (
            a is None
            or b is None
            or a != b
            or a.dtype not in (np.float32, np.float64)
            or not all(isinstance(n, int) for n in a.shape)
        ):
            continue
        fused[k] = Node(
            mean.name, FUSED_MSE, list(sub.inputs), list(mean.outputs), {"keepdims": int(mean.attrs.get("keepdims", 1))}
        )
        gone.update((i, j))
        shapes.pop(diff, None)
        shapes.pop(square, None)
        notes.append(f"{sub}, {sq} and {mean} run as one mean squared error (exact up to float rounding)")
    return _replaced(nodes, fused, gone)


def _over_every_axis(mean: Node, info: ValueInfo | None, constants: Mapping[str, np.ndarray]) -> bool:
    """Whether a ReduceMean averages its input over every axis (axes omitted, or all of them)."""
    if "axes" in mean.attrs:  # opsets before 18
        axes = [int(a) for a in mean.attrs["axes"]]
    elif len(mean.inputs) > 1 and mean.inputs[1]:
        if mean.inputs[1] not in constants:
            return False
        axes = [int(a) for a in np.ravel(constants[mean.inputs[1]])]
    else:
        axes = []
    if not axes:
        return not mean.attrs.get("noop_with_empty_axes", 0)
    return info is not None and sorted(a % max(len(info.shape), 1) for a in axes) == list(range(len(info.shape)))


def _is_two(value: np.ndarray | None) -> bool:
    return value is not None and value.size == 1 and float(np.ravel(value)[0]) == 2.0


def _fuse_linear(nodes: list[Node], shapes: dict[str, ValueInfo], keep: set[str], notes: list[str]) -> list[Node]:
    """Each float32/float64 MatMul of X (rank >= 2) by a 2-D W whose product is read only by an Add
    of a bias of W's columns (shape (N,) or (1, ..., N)) becomes one node with the MatMul's name,
    in the Add's place (the bias may be made after the product)."""
    readers, reader = _uses(nodes)
    fused: dict[int, Node] = {}
    gone: set[int] = set()
    for k, mm in enumerate(nodes):
        out = mm.outputs[0] if mm.op_type == "MatMul" and len(mm.outputs) == 1 and len(mm.inputs) == 2 else ""
        if not out or out in keep or readers[out] != 1:
            continue
        x, w, y = shapes.get(mm.inputs[0]), shapes.get(mm.inputs[1]), shapes.get(out)
        if x is None or w is None or y is None or len(x.shape) < 2 or len(w.shape) != 2:
            continue
        j = reader[out]
        add = nodes[j]
        if add.op_type != "Add" or len(add.inputs) != 2 or add.inputs[0] == add.inputs[1] or len(add.outputs) != 1:
            continue
        bias = add.inputs[1] if add.inputs[0] == out else add.inputs[0]
        b = shapes.get(bias)
        n = w.shape[1]
        if (
            b is None
            or not {x.dtype, w.dtype, b.dtype} <= {y.dtype}
            or y.dtype not in (np.float32, np.float64)
            or shapes.get(add.outputs[0]) != y
            or len(b.shape) > len(y.shape)
            or not b.shape
            or b.shape[-1] != n
            or any(d != 1 for d in b.shape[:-1])
        ):
            continue
        fused[j] = Node(mm.name, FUSED_LINEAR, [mm.inputs[0], mm.inputs[1], bias], list(add.outputs), {})
        gone.add(k)
        shapes.pop(out, None)
        notes.append(f"{mm} and {add} run as one node (exact up to float rounding)")
    return _replaced(nodes, fused, gone)
