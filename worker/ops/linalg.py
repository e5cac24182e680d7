"""Matrix products: MatMul (numpy ``matmul`` semantics), Gemm, their fusions with a bias or an
activation, and Det (Einsum is in :mod:`.einsum`).

These are the hot path of an MLP, so the VJPs are plain BLAS calls on 2-D operands: transposes are
passed as views (numpy hands BLAS the transpose flag instead of copying), an input error that no one
needs (``c.needs``) is never computed, and a batched activation times a 2-D weight gets its weight
error from one folded ``(batch*m, k)^T @ (batch*m, n)`` product rather than a batched product summed
afterwards.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from gradserve.worker.ops import blas
from gradserve.worker.ops.activations import FAST_ACTIVATIONS
from gradserve.worker.graph import Node
from gradserve.worker.ops.batch import BatchRule, BatchView, Rows, batched_at, refuse
from gradserve.worker.ops.registry import REGISTRY, OpContext, OpError, family, numel, per_element, unbroadcast

defop = family(flops=per_element)


def _t(a: np.ndarray) -> np.ndarray:
    """Swap the last two axes (a view)."""
    return a.T if a.ndim == 2 else np.swapaxes(a, -1, -2)


def _matmul_vjp(c, g):
    a, b = c.inputs
    if a.ndim == 1 and b.ndim == 1:  # a dot product: g is a scalar
        return (g * b if c.needs[0] else None), (g * a if c.needs[1] else None)
    # Promote 1-D operands to matrices as matmul does (a row for a, a column for b) and give g the
    # axes matmul dropped, so the rest is the matrix case.
    a2 = a if a.ndim > 1 else a[None, :]
    b2 = b if b.ndim > 1 else b[:, None]
    g2 = g if a.ndim > 1 else np.expand_dims(g, -2)
    g2 = g2 if b.ndim > 1 else g2[..., None]
    da = db = None
    if c.needs[0]:
        da = unbroadcast(blas.matmul(g2, _t(b2)), a2.shape).reshape(a.shape)
    if c.needs[1]:
        if b2.ndim == 2 and a2.ndim > 2:
            # Weight shared across the batch: fold the batch into the rows, one BLAS call.
            k, n = a2.shape[-1], g2.shape[-1]
            db = blas.matmul(a2.reshape(-1, k).T, g2.reshape(-1, n)).reshape(b.shape)
        else:
            db = unbroadcast(blas.matmul(_t(a2), g2), b2.shape).reshape(b.shape)
    return da, db


def _stack_rows(entries, arg: int, axis: int):
    """One context for several micro-batches' deferred VJPs of a product whose weight error sums
    over rows: input ``arg`` (the activation) and the output error stacked along their row axes.
    Then dW = sum_i A_i^T G_i is one product with all rows (as the unsplit batch computes it),
    instead of one thin product per micro-batch plus a pass over dW to add each."""
    ctx = entries[0][0]
    if any(g[0] is None for _, g in entries) or ctx.needs[arg]:
        return None
    inputs = list(ctx.inputs)
    inputs[arg] = np.concatenate([c.inputs[arg] for c, _ in entries], axis=axis)
    merged = dataclasses.replace(ctx, inputs=inputs)
    return merged, [np.concatenate([g[0] for _, g in entries], axis=0)]


def _matmul_merge(entries):
    a, b = entries[0][0].inputs[:2]
    if a.ndim < 2 or b.ndim != 2 or any(g[0] is None for _, g in entries):
        return None  # a batched weight gets a per-batch error: nothing to fold
    # dB sums over every leading axis of A, so fold them all into rows first: micro-batches split
    # along any of them (batch-first or sequence-first) then stack
    flat = [
        (dataclasses.replace(c, inputs=[c.inputs[0].reshape(-1, a.shape[-1]), c.inputs[1]]), [g[0].reshape(-1, b.shape[-1])])
        for c, g in entries
    ]
    return _stack_rows(flat, 0, 0)


def _matmul_batch(view: BatchView, node: Node, tags: list) -> Rows:
    """The batch along A's rows, A's stacked matrices times one B (or the converse), or both
    operands' stacks: exact unless the product contracts over it."""
    rows = batched_at(tags)
    ra, rb, ro = view.rank(node.inputs[0]), view.rank(node.inputs[1]), view.rank(node.outputs[0])
    if ra is None or rb is None or ro is None:
        raise refuse(node, "has inputs of unknown shape")
    a = tags[rows[0]].axis
    if rows == [0] and ra == ro and (a == ra - 2 or (a < ra - 2 and rb <= 2)):
        return view.rows(a)
    if rows == [1] and rb == ro and a < rb - 2 and ra <= 2:
        return view.rows(a)
    if rows == [0, 1] and ra == rb == ro and a == tags[1].axis and a < ro - 2:
        return view.rows(a)  # batched product: sample i's matrices times sample i's matrices
    raise refuse(node, "contracts over the batch axis")


def _matmul_flops(node: Node, shapes) -> int | None:
    """2 x multiply-adds: each output element sums over A's last axis."""
    first = shapes.get(node.inputs[0])
    if first is None or not first.shape:
        return None
    return 2 * numel(shapes.get(node.outputs[0])) * first.shape[-1]


defop("MatMul", lambda c, a, b: blas.matmul(a, b), _matmul_vjp, keep="x", merge=_matmul_merge,
      batch=BatchRule(_matmul_batch), flops=_matmul_flops)


def _gemm_args(c):
    return (float(c.attr("alpha", 1.0)), float(c.attr("beta", 1.0)),
            bool(c.attr("transA", 0)), bool(c.attr("transB", 0)))


def _blas_ready(a: np.ndarray, b: np.ndarray, cin: np.ndarray) -> bool:
    """Whether A and B can go to :func:`blas.gemm` as they are (one float dtype, C-contiguous),
    with a C of that dtype."""
    return (a.dtype == b.dtype == cin.dtype and a.flags.c_contiguous and b.flags.c_contiguous
            and a.size > 0 and b.size > 0 and blas.available(a.dtype))


def _gemm(c, a, b, cin=None):
    alpha, beta, ta, tb = _gemm_args(c)
    if a.ndim != 2 or b.ndim != 2:
        raise OpError(f"Gemm needs 2-D A and B, got shapes {a.shape} and {b.shape}")
    if cin is not None and alpha == beta == 1.0 and _blas_ready(a, b, cin):
        # C first, then BLAS adds the product into it (beta = 1): one pass over Y fewer than adding
        # C afterwards. The copy also enforces ONNX's unidirectional broadcast of C to (M, N).
        y = np.empty((a.shape[1] if ta else a.shape[0], b.shape[0] if tb else b.shape[1]), a.dtype)
        np.copyto(y, cin)
        blas.gemm(a, b, y, accumulate=True, trans_a=ta, trans_b=tb)
        return y
    y = blas.matmul(a.T if ta else a, b.T if tb else b)
    if alpha != 1.0:
        y *= alpha  # y is ours: scale in place
    if cin is not None and beta != 0.0:
        # In-place add also enforces ONNX's unidirectional broadcast of C to (M, N).
        y += cin if beta == 1.0 else cin * beta
    return y


def _gemm_vjp(c, g):
    alpha, beta, ta, tb = _gemm_args(c)
    a, b = c.inputs[0], c.inputs[1]
    cin = c.inputs[2] if len(c.inputs) > 2 else None
    da = db = dc = None
    # With A' = op(A), B' = op(B): dA' = g B'^T, dB' = A'^T g; transposing back where op transposed.
    if c.needs[0]:
        if not ta:
            da = blas.matmul(g, b if tb else b.T)
        else:
            da = blas.matmul(b.T if tb else b, g.T)
        if alpha != 1.0:
            da *= alpha
    if c.needs[1]:
        if not tb:
            db = blas.matmul(a if ta else a.T, g)
        else:
            db = blas.matmul(g.T, a.T if ta else a)
        if alpha != 1.0:
            db *= alpha
    if cin is not None and len(c.needs) > 2 and c.needs[2]:
        dc = unbroadcast(g, cin.shape)
        if beta != 1.0:
            dc = dc * beta
    return da, db, dc


def _gemm_merge(entries):
    # Only with B's error among the deferred: dB = op(A)^T G sums over the rows of op(A) and G,
    # whatever A is. (A bias alone proves nothing: in Y = W X^T + C the batch runs along columns.)
    if not entries[0][0].needs[1]:
        return None
    # the rows of op(A) are A's columns when transA
    return _stack_rows(entries, 0, 1 if _gemm_args(entries[0][0])[2] else 0)


def _gemm_batch(view: BatchView, node: Node, tags: list) -> Rows:
    """The batch along A's rows (A's columns when transposed); C a row vector or a scalar. The fused
    node's activation keeps the rows where they are."""
    if batched_at(tags) == [0] and tags[0].axis == (1 if node.attrs.get("transA", 0) else 0):
        c = view.shape(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] else None
        if c is not None and len(c) == 2 and c[0] != 1:
            raise view.mixing(node, 2, 0)
        return view.rows(0)
    raise refuse(node, "contracts over the batch axis")


def _gemm_flops(node: Node, shapes) -> int | None:
    """2 x multiply-adds over A's inner axis (its rows when transposed)."""
    first = shapes.get(node.inputs[0])
    if first is None or len(first.shape) != 2:
        return None
    k = first.shape[0] if node.attrs.get("transA", 0) else first.shape[1]
    return 2 * numel(shapes.get(node.outputs[0])) * k


_GEMM = dict(batch=BatchRule(_gemm_batch), flops=_gemm_flops)

# C is only read for its shape; A and B each feed the other's error.
defop("Gemm", _gemm, _gemm_vjp, keep=("x0", "x1"), merge=_gemm_merge, **_GEMM)


# -- Gemm followed by its activation, as one node ------------------------------------------------------
# Made by the rewrite (gradserve.worker.rewrite) where a Gemm's only reader is one of these
# activations: the VJP then gets the error before the activation from the activation's own VJP --
# one compiled pass over the error and the output on large arrays, numpy's formula on small ones
# (see activations.activation_vjp) -- and the product's output (the activation's input) is never
# kept. Exact up to float rounding.
FUSED_GEMM = "gradserve.GemmActivation"


def _gemm_activation(c, a, b, cin=None):
    act = str(c.attr("activation"))
    if act not in FAST_ACTIVATIONS:
        raise OpError(f"{FUSED_GEMM}: unknown activation '{act}'")
    y = _gemm(c, a, b, cin)
    return REGISTRY[act].forward(OpContext({}, node=c.node), y)


def _gemm_activation_vjp(c, g):
    act = REGISTRY[str(c.attr("activation"))]
    assert act.vjp is not None  # every one of FAST_ACTIVATIONS has a VJP
    return _gemm_vjp(c, act.vjp(OpContext({}, outputs=[c.outputs[0]], needs=(True,), node=c.node), g))


def _gemm_activation_merge(entries):
    merged = _gemm_merge(entries)
    if merged is None:
        return None
    ctx, errors = merged  # A and the errors stacked by row; the outputs stack the same way
    return dataclasses.replace(ctx, outputs=[np.concatenate([c.outputs[0] for c, _ in entries], axis=0)]), errors


defop(FUSED_GEMM, _gemm_activation, _gemm_activation_vjp, keep=("x0", "x1", "y"), merge=_gemm_activation_merge,
      **_GEMM)


# -- a product and the bias added to it, as one node --------------------------------------------------
# Made by the rewrite (gradserve.worker.rewrite) where a MatMul of activations (rank >= 2) by a 2-D
# weight is read only by an Add of a bias along its last axis: what torch exports nn.Linear to for
# inputs of more than two dims. It is a Gemm of the activations' rows, which writes the bias first
# and has BLAS add the product into it (beta = 1): one pass over the output fewer, and the VJP sums
# the bias's error in the same place. Exact up to float rounding.
FUSED_LINEAR = "gradserve.MatMulAdd"


def _rows_context(c, x: np.ndarray, w: np.ndarray, b: np.ndarray):
    """The Gemm this node is: X's rows (M, K) times W (K, N) plus the bias as one row (1, N)."""
    return dataclasses.replace(c, inputs=[x.reshape(-1, x.shape[-1]), w, b.reshape(1, -1)])


def _linear(c, x, w, b):
    if x.ndim < 2 or w.ndim != 2 or b.size != w.shape[1] or (b.ndim and b.shape[-1] != w.shape[1]):
        raise OpError(f"{FUSED_LINEAR} needs X (..., K), W (K, N) and a bias of N along the last axis, "
                      f"got {x.shape}, {w.shape} and {b.shape}")
    rows = _rows_context(c, x, w, b)
    return _gemm(rows, *rows.inputs).reshape(x.shape[:-1] + (w.shape[1],))


def _linear_vjp(c, g):
    x, w, b = c.inputs
    dx, dw, db = _gemm_vjp(_rows_context(c, x, w, b), g.reshape(-1, w.shape[1]))
    return (None if dx is None else dx.reshape(x.shape)), dw, (None if db is None else db.reshape(b.shape))


def _linear_merge(entries):
    # dW sums over every row of X, whatever the leading axes: fold them into rows, then stack
    flat = [(_rows_context(ctx, *ctx.inputs), [g[0].reshape(-1, ctx.inputs[1].shape[1])])
            for ctx, g in entries if g[0] is not None]
    merged = _gemm_merge(flat) if len(flat) == len(entries) else None
    if merged is None:
        return None
    ctx, errors = merged  # X's rows stacked; the bias as the node has it, so its error takes its shape
    return dataclasses.replace(ctx, inputs=[*ctx.inputs[:2], entries[0][0].inputs[2]]), errors


def _linear_batch(view: BatchView, node: Node, tags: list) -> Rows:
    """A MatMul, then a bias that must not depend on the sample."""
    if 2 in batched_at(tags):
        raise refuse(node, "adds a bias computed from the batch to every sample's product")
    return _matmul_batch(view, node, tags)


defop(FUSED_LINEAR, _linear, _linear_vjp, keep=("x0", "x1"), merge=_linear_merge,  # the bias: its shape only
      batch=BatchRule(_linear_batch), flops=_matmul_flops)


# -- Det ----------------------------------------------------------------------------------------------------
def _det(c, x):
    if x.ndim < 2 or x.shape[-1] != x.shape[-2]:
        raise OpError(f"{c.node}: Det needs square matrices in the last two axes, got shape {x.shape}")
    return np.linalg.det(x).astype(x.dtype, copy=False)


def _adjugate(x: np.ndarray) -> np.ndarray:
    """adj(X) for a stack of square matrices, singular ones included: with X = U S V^T,
    adj(X) = det(U) det(V) V diag(prod_{j != i} s_j) U^T (no inverse, no division by s_i)."""
    u, s, vt = np.linalg.svd(x)
    n = s.shape[-1]
    ones = np.ones(s.shape[:-1] + (1,), s.dtype)
    before = np.cumprod(np.concatenate([ones, s[..., :-1]], axis=-1), axis=-1)  # prod of s_j, j < i
    after = np.flip(np.cumprod(np.concatenate([ones, np.flip(s, -1)[..., :-1]], axis=-1), axis=-1), -1)  # j > i
    others = before * after if n else s
    sign = np.linalg.det(u) * np.linalg.det(vt)
    return sign[..., None, None] * np.matmul(np.swapaxes(vt, -1, -2) * others[..., None, :], np.swapaxes(u, -1, -2))


def _det_batch(view: BatchView, node: Node, tags: list) -> Rows:
    """One determinant per matrix of the last two axes: exact with the batch before them."""
    axis = tags[0].axis
    if axis >= (view.rank(node.inputs[0]) or 0) - 2:
        raise refuse(node, "takes determinants across the batch axis")
    return view.rows(axis)


# d det(X) / dX = adj(X)^T
defop("Det", _det,
      lambda c, g: (g[..., None, None] * np.swapaxes(_adjugate(c.x), -1, -2)).astype(c.x.dtype, copy=False), keep="x",
      batch=BatchRule(_det_batch))
