"""Losses: SoftmaxCrossEntropyLoss and NegativeLogLikelihoodLoss (ONNX's), and the mean squared
error as one node (``gradserve.MeanSquaredError``, made by :mod:`gradserve.worker.rewrite`).

Both take class scores (N, C) or (N, C, d1, ...) and integer labels (N,) or (N, d1, ...), with
optional per-class weights and ignore_index. Per-element weights w = weights[label] (0 where the
label is ignored); reduction 'mean' divides by sum(w), which is the count of non-ignored targets
when no weights are given (ONNX spec). Labels and weights get no error.
"""

from __future__ import annotations

import numpy as np

from gradserve.worker import kernels
from gradserve.worker.graph import Node
from gradserve.worker.ops.batch import BatchRule, BatchView, Rows, Tag, batched_at, elementwise, refuse
from gradserve.worker.ops.registry import OpError, family, per_element, str_attr

defop = family(flops=per_element)


def _targets(c, x: np.ndarray, labels: np.ndarray, weights: np.ndarray | None):
    """(labels with ignored entries replaced by 0, per-element weight w, reduction)."""
    if x.ndim < 2:
        raise OpError(f"scores must be (N, C, ...), got shape {x.shape}")
    if labels.shape != (x.shape[0],) + x.shape[2:]:
        raise OpError(f"labels of shape {labels.shape} do not match scores of shape {x.shape}")
    if labels.dtype.kind not in "iu":
        raise OpError(f"labels must be integers, got {labels.dtype}")
    reduction = str_attr(c.attr("reduction"), "mean")
    if reduction not in ("mean", "sum", "none"):
        raise OpError(f"unknown reduction '{reduction}'")
    n_classes = x.shape[1]
    ignore = c.attr("ignore_index")
    valid = labels != int(ignore) if ignore is not None else np.ones(labels.shape, bool)
    safe = np.where(valid, labels, 0)
    if safe.size and (safe.min() < 0 or safe.max() >= n_classes):
        raise OpError(f"labels must lie in [0, {n_classes}) (or equal ignore_index), got values in [{labels.min()}, {labels.max()}]")
    if weights is not None:
        if weights.shape != (n_classes,):
            raise OpError(f"weights must have shape ({n_classes},), got {weights.shape}")
        w = np.where(valid, weights[safe], 0).astype(x.dtype)
    else:
        w = valid.astype(x.dtype)
    return safe.astype(np.intp), w, reduction


def _reduce(c, per: np.ndarray, w: np.ndarray, reduction: str, dtype) -> np.ndarray:
    if reduction == "none":
        return per.astype(dtype, copy=False)
    total = per.sum()
    if reduction == "sum":
        return np.asarray(total, dtype)
    denom = w.sum()
    c.save(denom=denom)
    with np.errstate(invalid="ignore", divide="ignore"):  # every target ignored: NaN, like torch and ONNX
        return np.asarray(total / denom, dtype)


def _coef(c, g: np.ndarray, w: np.ndarray, reduction: str) -> np.ndarray:
    """Error at each element's loss term, times its weight: dL/d(-picked log-probability)."""
    if reduction != "mean":
        return g * w
    with np.errstate(invalid="ignore", divide="ignore"):
        return w * (g / c.saved["denom"])


def _pick(a: np.ndarray, safe: np.ndarray) -> np.ndarray:
    return np.take_along_axis(a, safe[:, None], axis=1)[:, 0]


# -- SoftmaxCrossEntropyLoss --------------------------------------------------------------------------
def _sce(c, scores, labels, weights=None):
    safe, w, reduction = _targets(c, scores, labels, weights)
    work = np.promote_types(scores.dtype, np.float32)
    s = scores.astype(work, copy=False)
    shifted = s - s.max(axis=1, keepdims=True)
    log_prob = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    per = -_pick(log_prob, safe) * w
    loss = _reduce(c, per, w, reduction, scores.dtype)
    c.save(log_prob=log_prob, safe=safe, w=w, reduction=reduction)
    if c.n_outputs >= 2:
        return loss, log_prob.astype(scores.dtype, copy=False)
    return loss


def _sce_vjp(c, g_loss, g_logp=None):
    if not c.needs[0]:
        return None, None, None
    log_prob, safe, w = c.saved["log_prob"], c.saved["safe"], c.saved["w"]
    prob = np.exp(log_prob)
    if g_loss is None:
        dx = np.zeros_like(log_prob)
    else:
        coef = _coef(c, np.asarray(g_loss, log_prob.dtype), w, c.saved["reduction"])
        # d(-log p_t)/d scores = softmax - onehot(t)
        dx = prob * coef[:, None]
        np.put_along_axis(dx, safe[:, None], _pick(dx, safe)[:, None] - coef[:, None], axis=1)
    if g_logp is not None:
        dx += g_logp - prob * g_logp.sum(axis=1, keepdims=True)
    return dx.astype(c.inputs[0].dtype, copy=False), None, None


# ops that only rearrange labels within each sample: counting a feed's entries counts the loss's
_REARRANGING = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Cast", "Transpose")
# ops that pick or add targets within each sample (their own rules keep the batch axis whole)
_SELECTING = ("Slice", "Pad")


def _counted_labels(view: BatchView, node: Node, labels: Rows) -> str:
    """What to count a loss's targets in: the feed holding its labels, through ops that only
    rearrange them within samples; or the labels themselves when a Slice or Pad picks or adds
    targets in each sample (a decoder LM's shifted loss: transformers pads the labels with
    ignore_index and takes ``labels[..., 1:]``), which planning then computes from the feeds."""
    name, sliced = node.inputs[1], False
    while name not in view.batched:
        maker = view.producer(name)
        selects = maker is not None and maker.op_type in _SELECTING and labels.outer == 1
        if maker is None or (maker.op_type not in _REARRANGING and not selects):
            raise refuse(node, f"has labels '{name}' that are not a feed (or a reshape, slice or pad of one), so "
                               "micro-batches cannot be weighted by their targets")
        sliced |= selects
        name = maker.inputs[0]
    return node.inputs[1] if sliced else name


def _loss_batch(view: BatchView, node: Node, tags: list) -> Tag:
    """Scores and labels batched on axis 0: per-sample losses, their sum, their mean, or their mean
    over the targets that are not ignore_index (the micro-batches are weighted by their counts)."""
    if batched_at(tags)[:2] != [0, 1]:
        raise refuse(node, "is not known to keep the samples of a batch independent")
    if tags[0].axis != 0 or tags[1] != tags[0]:
        raise refuse(node, "has the batch off axis 0 of its scores or labels")
    reduction = node.attrs.get("reduction", "mean")
    if len(node.inputs) > 2 and node.inputs[2] and reduction == "mean":
        raise refuse(node, "is a class-weighted mean")
    if reduction == "none":
        return view.rows(0)
    if reduction == "sum":
        return ("sum", None)
    if "ignore_index" in node.attrs:
        return ("count", (_counted_labels(view, node, tags[1]), int(node.attrs["ignore_index"])))
    return ("mean", None)


defop("SoftmaxCrossEntropyLoss", _sce, _sce_vjp, keep=(), differentiable=(0,), batch=BatchRule(_loss_batch))


# -- NegativeLogLikelihoodLoss ------------------------------------------------------------------------
def _nll(c, x, target, weights=None):
    safe, w, reduction = _targets(c, x, target, weights)
    per = -_pick(x, safe) * w
    c.save(safe=safe, w=w, reduction=reduction)
    return _reduce(c, per, w, reduction, x.dtype)


def _nll_vjp(c, g):
    if not c.needs[0]:
        return None, None, None
    x = c.inputs[0]
    safe, w = c.saved["safe"], c.saved["w"]
    coef = _coef(c, np.asarray(g, x.dtype), w, c.saved["reduction"])
    dx = np.zeros(x.shape, x.dtype)
    np.put_along_axis(dx, safe[:, None], -coef[:, None].astype(x.dtype), axis=1)
    return dx, None, None


defop("NegativeLogLikelihoodLoss", _nll, _nll_vjp, keep=(), differentiable=(0,), batch=BatchRule(_loss_batch))


# -- mean squared error, as one node ---------------------------------------------------------------
# What ``F.mse_loss`` exports to: Sub, then Mul of the difference by itself (or Pow 2), then a
# ReduceMean over every axis. The rewrite makes it this node where the two inputs have one shape and
# the compiled kernels are on: forward one read of the inputs (the squares summed in float64),
# the VJP one pass writing the error, instead of five passes each way (numpy's passes on arrays too
# small for a kernel to pay, see gradserve.worker.kernels.MIN_SIZE). It keeps its inputs (one is
# the target, a feed kept anyway) rather than the difference, so the memory model counts what it
# holds. Equal to the unfused ops up to float rounding.
FUSED_MSE = "gradserve.MeanSquaredError"


def _flat_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if a.shape != b.shape or a.dtype != b.dtype or a.dtype not in (np.float32, np.float64):
        raise OpError(f"{FUSED_MSE} needs two float32 or float64 inputs of one shape, got {a.shape} {a.dtype} and {b.shape} {b.dtype}")
    return np.ascontiguousarray(a).reshape(-1), np.ascontiguousarray(b).reshape(-1)


def _kernels_for(a: np.ndarray):
    """The compiled kernels for ``a``, or None: too small to pay (numpy's paths then, and numba not
    imported for it), or the kernels cannot be loaded."""
    return kernels.get() if a.size >= kernels.MIN_SIZE else None


def _squared_difference(a: np.ndarray, b: np.ndarray) -> float:
    """The sum of (a - b)^2 over flat ``a`` and ``b``, in float64."""
    k = _kernels_for(a)
    if k is not None:
        return k.squared_difference(a, b)
    d = np.subtract(a, b, dtype=np.float64)
    return float(np.dot(d, d))


def _scaled_difference(a: np.ndarray, b: np.ndarray, scale: np.floating, out: np.ndarray) -> None:
    """``out = (a - b) * scale``, all flat."""
    k = _kernels_for(a)
    if k is not None:
        k.scaled_difference(a, b, scale, out)
    else:
        np.multiply(np.subtract(a, b), scale, out=out)


def _mse(c, a, b):
    total = _squared_difference(*_flat_pair(a, b))
    mean = total / a.size if a.size else np.nan  # (ReduceMean of nothing: NaN, as numpy's mean)
    return np.full((1,) * a.ndim if int(c.attr("keepdims", 1)) else (), mean, a.dtype)


def _mse_vjp(c, g):
    a, b = c.inputs
    # d loss / d a = 2 (a - b) / n times the loss's one error; d loss / d b is its negative
    scale = 2.0 * float(np.sum(g)) / max(a.size, 1)
    da = np.empty(a.shape, a.dtype)
    _scaled_difference(*_flat_pair(a, b), a.dtype.type(scale), da.reshape(-1))
    return (da if c.needs[0] else None), (np.negative(da) if c.needs[1] else None)


def _mse_batch(view: BatchView, node: Node, tags: list) -> Tag:
    """A difference (elementwise), then a mean over every axis, the batch's too."""
    elementwise(view, node, tags)
    return ("mean", None)


defop(FUSED_MSE, _mse, _mse_vjp, keep=("x0", "x1"), batch=BatchRule(_mse_batch))
