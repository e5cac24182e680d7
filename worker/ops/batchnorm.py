"""BatchNormalization (training and inference mode), and its fusion with the ReLU and MaxPool that
read it (``gradserve.BatchNormReluMaxPool``, made only by :mod:`gradserve.worker.rewrite`).

Training-mode BatchNormalization of float32/float64 data (the CNN hot path) runs compiled kernels
(:mod:`gradserve.worker.kernels`): per channel, the statistics (float64 sums) and the normalisation
in one read of X from memory, saving X itself; its VJP likewise. The fused node never writes the
normalised activation. Without numba, the numpy path serves: the statistics helpers of
:mod:`.norm`, saving the centred input.

Separate from the other normalisations (:mod:`.norm`) because of the compiled kernels, the running
statistics and the fusion, which none of those have.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np

from gradserve.worker import kernels
from gradserve.worker.ops.batch import PER_SAMPLE_SAME_SHAPE, BatchRule, never, per_sample, refuse
from gradserve.worker.ops.norm import normalize, normalize_grad
from gradserve.worker.ops.pool import _Pool
from gradserve.worker.ops.registry import OpContext, OpError, family, per_element

# Normalisations within each sample (ONNX infers no output shape for some: it is the input's).
defop = family(batch=PER_SAMPLE_SAME_SHAPE, flops=per_element)
_WHOLE_BATCH = "in training mode normalises with statistics of the whole batch"


def _batchnorm_batch(view, node, tags):
    """In inference mode the statistics are parameters: per sample; in training mode they are the batch's."""
    if node.attrs.get("training_mode", 0):
        raise refuse(node, _WHOLE_BATCH)
    return per_sample(view, node, tags)


# -- BatchNormalization -------------------------------------------------------------------------------
def _bn_view(x: np.ndarray) -> np.ndarray:
    """(N, C, rest) view; ONNX allows a 1-D input of size N, meaning C = 1."""
    if x.ndim == 1:
        return x.reshape(-1, 1, 1)
    return x.reshape(x.shape[0], x.shape[1], -1)


def _kernels() -> ModuleType:
    """The compiled kernels, where their availability was checked (:func:`_kernel_dtype`)."""
    k = kernels.get()
    assert k is not None
    return k


def _kernel_dtype(x: np.ndarray) -> bool:
    """Whether the compiled BatchNormalization kernels take ``x`` (float32/float64, numba present)."""
    return x.dtype in (np.float32, np.float64) and x.size > 0 and kernels.available()


def _batchnorm_kernel(c, x3: np.ndarray, scale, bias, eps: float, relu: bool = False):
    """Training-mode BatchNormalization (then ReLU if ``relu``) by the compiled kernel: per channel,
    the statistics and the normalisation in one read of x from memory. Saves x itself."""
    x3 = np.ascontiguousarray(x3)
    y3 = np.empty(x3.shape, x3.dtype)
    stats = np.empty((3, x3.shape[1]))
    _kernels().bn_forward(x3, scale, bias, eps, relu, y3, stats, np.empty((3, x3.shape[1]), x3.dtype))
    c.save(x3=x3, stats=stats, relu_y=y3 if relu else None)
    return y3, stats[0], stats[1]


def _batchnorm_kernel_vjp(c, gy, need_x: bool):
    """dL/dx (if ``need_x``), dL/dscale, dL/dB of :func:`_batchnorm_kernel` (reads x and the
    error once)."""
    x3, stats, relu_y = c.saved["x3"], c.saved["stats"], c.saved["relu_y"]
    g3 = np.ascontiguousarray(gy, dtype=x3.dtype).reshape(x3.shape)
    dx3 = np.empty(x3.shape if need_x else (0, 0, 0), x3.dtype)
    dscale, dbias = np.empty(x3.shape[1]), np.empty(x3.shape[1])
    relu = relu_y is not None
    _kernels().bn_backward(x3, g3, relu_y if relu else g3, c.inputs[1], stats, relu, dx3, dscale, dbias,
                              np.empty((4, x3.shape[1]), x3.dtype))
    return (dx3 if need_x else None), dscale, dbias


def _batchnorm(c, x, scale, bias, mean, var):
    eps = float(c.attr("epsilon", 1e-5))
    training = bool(c.attr("training_mode", 0))
    n_out = c.n_outputs
    if not training and n_out > 1:
        raise OpError("BatchNormalization outputs running_mean/running_var only with training_mode=1")
    x3 = _bn_view(x)
    channels = x3.shape[1]
    for name, t in (("scale", scale), ("B", bias), ("input_mean", mean), ("input_var", var)):
        if t.shape != (channels,):
            raise OpError(f"{name} must have shape ({channels},), got {t.shape}")
    if training and _kernel_dtype(x):
        y, mu, v = _batchnorm_kernel(c, x3, scale, bias, eps)
    else:
        # keep x - mean (not xhat): y = (x - mean) * (scale * inv) + B is then two passes
        xc, mu, v, inv = normalize(x3, eps, None if training else mean, None if training else var, scaled=False)
        y = np.multiply(xc, (scale * inv).astype(xc.dtype)[:, None], dtype=x.dtype)
        y += bias.astype(x.dtype)[:, None]
        c.save(xc=xc, mu=mu, v=v, inv=inv)
    y = y.reshape(x.shape)
    if not training or n_out == 1:
        return y
    mom = float(c.attr("momentum", 0.9))
    running_mean = (mean * mom + mu * (1 - mom)).astype(mean.dtype)
    running_var = (var * mom + v * (1 - mom)).astype(var.dtype)
    return (y, running_mean, running_var)[:n_out]


def _batchnorm_vjp(c, gy, g_rm=None, g_rv=None):
    x, scale = c.inputs[0], c.inputs[1]
    if "x3" in c.saved:  # the kernel's forward
        needs = list(c.needs) + [False] * (3 - len(c.needs))
        if g_rm is None and g_rv is None:
            if gy is None:
                return None, None, None, None, None
            dx, dscale, dbias = _batchnorm_kernel_vjp(c, gy, needs[0])
            return (None if dx is None else dx.reshape(x.shape), dscale.astype(scale.dtype) if needs[1] else None,
                    dbias.astype(c.inputs[2].dtype) if needs[2] else None, None, None)
        stats = c.saved["stats"]  # errors at the running statistics too: the general path below
        c.saved.update(xc=np.subtract(c.saved["x3"], stats[0][:, None]).astype(x.dtype), inv=stats[2].astype(x.dtype))
    xc, inv = c.saved["xc"], c.saved["inv"]
    training = bool(c.attr("training_mode", 0))
    needs = list(c.needs) + [False] * (5 - len(c.needs))
    count = xc.shape[0] * xc.shape[2]
    dx = dscale = dbias = dmean = dvar = None
    if gy is not None:
        g3 = _bn_view(gy)
        if training and needs[0]:
            dx, sum_g, sum_gx = normalize_grad(g3, xc, inv, scale.astype(xc.dtype), centred=True)
        else:
            sum_g = g3.sum(axis=2, dtype=xc.dtype).sum(axis=0)
            sum_gx = np.einsum("agb,agb->g", g3, xc) * inv  # sum of g * xhat
        if not training:
            dx = g3 * (scale * inv)[:, None] if needs[0] else None
            dmean = -sum_g * scale * inv if needs[3] else None
            dvar = -0.5 * scale * inv * inv * sum_gx if needs[4] else None
        dscale = sum_gx if needs[1] else None
        dbias = sum_g if needs[2] else None
    if training and (g_rm is not None or g_rv is not None):
        # running stats = momentum * input stats + (1 - momentum) * batch statistics
        mom = float(c.attr("momentum", 0.9))
        if g_rm is not None:
            dmean = mom * g_rm
        if g_rv is not None:
            dvar = mom * g_rv
        if needs[0]:
            # d mean/dx = 1/count; d var/dx = 2 (x - mean)/count
            extra = np.zeros(xc.shape, xc.dtype) if dx is None else dx
            if g_rm is not None:
                extra += ((1 - mom) / count * g_rm)[:, None]
            if g_rv is not None:
                extra += xc * ((1 - mom) * 2.0 / count * g_rv)[:, None]
            dx = extra
    if dx is not None:
        dx = dx.reshape(x.shape)
    return dx, dscale, dbias, dmean, dvar


# the VJP reads the saved x - mean, not X: the runner may free the activation
defop("BatchNormalization", _batchnorm, _batchnorm_vjp, keep=("x1", "x2", "x3", "x4"),
      batch=BatchRule(_batchnorm_batch))


# -- BatchNormalization fused with the ReLU and MaxPool after it ----------------------------------------
# Made only by the exact rewrite in gradserve.worker.rewrite (never sent by users): training-mode
# BatchNormalization whose only reader is a MaxPool and/or a Relu, as one node. Inputs X, scale, B;
# attributes: the BatchNormalization's epsilon, relu (0/1) and, if a MaxPool is fused, its
# attributes prefixed "pool_". The kernels read X from memory once per pass and never write the
# normalised activation: the forward writes the pooled output and where each window's maximum sits.
FUSED_BATCHNORM = "gradserve.BatchNormReluMaxPool"
POOL_PREFIX = "pool_"


def _fused_pool(c, x: np.ndarray):
    if not any(k.startswith(POOL_PREFIX) for k in c.attrs):
        return None
    attrs = {k[len(POOL_PREFIX):]: v for k, v in c.attrs.items() if k.startswith(POOL_PREFIX)}
    return _Pool(OpContext(attrs, node=c.node), x)


def _fused_batchnorm(c, x, scale, bias):
    if not kernels.available():
        raise OpError(f"{FUSED_BATCHNORM} needs the compiled kernels (numba)")
    eps, relu = float(c.attr("epsilon", 1e-5)), bool(c.attr("relu", 0))
    pool = _fused_pool(c, x)
    if pool is None:
        return _batchnorm_kernel(c, _bn_view(x), scale, bias, eps, relu)[0].reshape(x.shape)
    if x.ndim != 4 or x.dtype not in (np.float32, np.float64):
        raise OpError(f"{FUSED_BATCHNORM} pools (N, C, H, W) float32/float64 inputs, got {x.dtype} {x.shape}")
    x = np.ascontiguousarray(x)
    y = np.empty(x.shape[:2] + pool.out, x.dtype)
    where = np.empty(y.shape, np.int32)
    stats = np.empty((3, x.shape[1]))
    geometry = (*pool.kernel, *pool.strides, *pool.dilations, *pool.lo)
    _kernels().bn_pool_forward(x, scale, bias, eps, relu, geometry, y, where, stats, np.empty((3, x.shape[1]), x.dtype))
    c.save(x3=_bn_view(x), stats=stats, where=where)
    return y


def _fused_batchnorm_vjp(c, g):
    x, scale, bias = c.inputs[0], c.inputs[1], c.inputs[2]
    needs = list(c.needs) + [False] * (3 - len(c.needs))
    if "where" not in c.saved:
        dx, dscale, dbias = _batchnorm_kernel_vjp(c, g, needs[0])
    else:
        x3, where = c.saved["x3"], c.saved["where"]
        g3 = np.ascontiguousarray(g, dtype=x3.dtype).reshape(where.shape[0], where.shape[1], -1)
        dx = np.empty(x3.shape if needs[0] else (0, 0, 0), x3.dtype)
        dscale, dbias = np.empty(x3.shape[1]), np.empty(x3.shape[1])
        _kernels().bn_pool_backward(x3, g3, where.reshape(g3.shape), scale, c.saved["stats"], dx, dscale, dbias,
                                       np.empty((4, x3.shape[1]), x3.dtype))
        dx = dx if needs[0] else None
    return (None if dx is None else dx.reshape(x.shape), dscale.astype(scale.dtype) if needs[1] else None,
            dbias.astype(bias.dtype) if needs[2] else None)


# the VJP reads X, the scale and the saved statistics and positions
defop(FUSED_BATCHNORM, _fused_batchnorm, _fused_batchnorm_vjp, keep=("x0", "x1"), batch=never(_WHOLE_BATCH))
