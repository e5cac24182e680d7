"""GEMM on strided numpy views that adds into its output: ``out (+)= op(a) @ op(b)``.

``np.matmul`` hands contiguous-enough views to BLAS without copying, but it always overwrites its
output. A direct convolution is a *sum* of GEMMs over shifted views of one padded input
(``Y = sum_k W_k @ X[:, shift_k:]``); with only ``np.matmul`` each shifted view must first be
copied into a column matrix (im2col) or each product summed in another pass, and those copies
cost as much as the products themselves. BLAS's own ``beta = 1`` does the sum for free, so this
module calls ``cblas_?gemm`` of the OpenBLAS that numpy itself loaded (found through
threadpoolctl, so the thread limits set there apply), through ctypes, which releases the GIL.

:func:`available` says whether that worked for a dtype: the library must be found, its integer
width known, and a small self-test against ``np.matmul`` must pass. Callers keep a numpy path for
when it is not (another BLAS, another platform), and ``GRADSERVE_STRIDED_BLAS=0`` forces that path.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from typing import Callable

import numpy as np

log = logging.getLogger(__name__)

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
# Symbol name stems as the OpenBLAS builds numpy ships with spell them: scipy-openblas (numpy >= 2
# wheels) prefixes "scipy_" and, being ILP64, suffixes "64_"; older numpy wheels only suffix.
_NAMINGS = (("scipy_", "64_"), ("", "64_"), ("", ""))


def available(dtype: np.dtype | type) -> bool:
    """Whether :func:`gemm` can run on arrays of ``dtype`` (float32 or float64)."""
    return _routine(np.dtype(dtype).char) is not None


def gemm(a: np.ndarray, b: np.ndarray, out: np.ndarray, *, accumulate: bool,
         trans_a: bool = False, trans_b: bool = False) -> None:
    """``out = op(a) @ op(b)``, or ``out += op(a) @ op(b)`` with ``accumulate``, where ``op``
    transposes when asked. All three are 2-D arrays of one float dtype whose rows may be strided
    (unit stride within a row, e.g. ``x[:, s:s + n]`` of a wider array); ``out`` must not overlap
    ``a`` or ``b``. Call only when :func:`available` says so."""
    fn = _routine(out.dtype.char)
    if fn is None:
        raise RuntimeError(f"no strided BLAS GEMM for {out.dtype}")
    _call(fn, a, b, out, accumulate, trans_a, trans_b)


def _call(fn: Callable, a: np.ndarray, b: np.ndarray, out: np.ndarray, accumulate: bool,
          trans_a: bool, trans_b: bool) -> None:
    lda, ldb, ldc = (_leading(x, out.dtype) for x in (a, b, out))  # checks 2-D, dtype, strides
    m, n = out.shape
    a_mk = a.shape[::-1] if trans_a else a.shape
    b_kn = b.shape[::-1] if trans_b else b.shape
    if a_mk[0] != m or b_kn[1] != n or a_mk[1] != b_kn[0]:
        raise ValueError(f"gemm shapes do not match: {a.shape}{'^T' if trans_a else ''} @ "
                         f"{b.shape}{'^T' if trans_b else ''} -> {out.shape}")
    if not out.flags.writeable:
        raise ValueError("gemm output is read-only")
    k = a_mk[1]
    if m == 0 or n == 0:
        return
    if k == 0:
        if not accumulate:
            out[...] = 0
        return
    fn(_ROW_MAJOR, _TRANS if trans_a else _NO_TRANS, _TRANS if trans_b else _NO_TRANS, m, n, k,
       1.0, a.ctypes.data, lda, b.ctypes.data, ldb, 1.0 if accumulate else 0.0, out.ctypes.data, ldc)


def _leading(x: np.ndarray, dtype: np.dtype) -> int:
    """The row stride of a row-major 2-D view, in elements (what BLAS calls lda)."""
    item = dtype.itemsize
    if x.ndim != 2 or x.dtype != dtype:
        raise ValueError(f"gemm needs 2-D {dtype} arrays, got {x.ndim}-D {x.dtype}")
    rows, cols = x.shape
    if cols > 1 and x.strides[1] != item:
        raise ValueError("gemm needs unit stride within rows")
    if rows <= 1:
        return max(1, cols)
    stride = x.strides[0]
    if stride % item or stride // item < max(1, cols):
        raise ValueError(f"gemm cannot use a row stride of {stride} bytes for rows of {cols}")
    return stride // item


@functools.lru_cache(maxsize=None)
def _routine(char: str) -> Callable | None:
    """The ctypes function for ``cblas_sgemm`` ('f') or ``cblas_dgemm`` ('d'), self-tested."""
    if char not in "fd" or os.environ.get("GRADSERVE_STRIDED_BLAS", "1") == "0":
        return None
    try:
        fn = _bind(char)
        if fn is not None and not _self_test(fn, np.dtype(char)):
            log.warning("strided BLAS GEMM (%s) failed its self-test; using numpy's matmul paths", char)
            fn = None
    except Exception as exc:  # any surprise here means: use the numpy paths
        log.warning("strided BLAS GEMM unavailable (%s); using numpy's matmul paths", exc)
        fn = None
    return fn


def _bind(char: str) -> Callable | None:
    from threadpoolctl import threadpool_info

    for lib in threadpool_info():
        if lib.get("internal_api") != "openblas":
            continue
        handle = ctypes.CDLL(lib["filepath"])
        for prefix, suffix in _NAMINGS:
            fn = getattr(handle, f"{prefix}cblas_{'s' if char == 'f' else 'd'}gemm{suffix}", None)
            config = getattr(handle, f"{prefix}openblas_get_config{suffix}", None)
            if fn is None or config is None:
                continue
            config.restype = ctypes.c_char_p
            index = ctypes.c_int64 if b"USE64BITINT" in (config() or b"") else ctypes.c_int
            scalar = ctypes.c_float if char == "f" else ctypes.c_double
            ptr = ctypes.c_void_p
            fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, index, index, index,
                           scalar, ptr, index, ptr, index, scalar, ptr, index]
            fn.restype = None
            return fn
    return None


def _self_test(fn: Callable, dtype: np.dtype) -> bool:
    """Products of strided views, in each transpose combination, overwriting and accumulating."""
    rng = np.random.default_rng(0)
    big = rng.standard_normal((9, 11)).astype(dtype)
    a, b = big[:3, 1:5], big[2:6, 3:8]  # (3, 4) and (4, 5) views with row stride 11
    tol = 1e-4 if dtype == np.float32 else 1e-12
    for trans_a in (False, True):
        for trans_b in (False, True):
            aa = big[4:8, 6:9] if trans_a else a  # (4, 3) view, used transposed
            bb = big[:5, 7:11] if trans_b else b  # (5, 4) view, used transposed
            want = (aa.T if trans_a else aa) @ (bb.T if trans_b else bb)
            out = np.ones((3, 5), dtype)
            _call(fn, aa, bb, out, True, trans_a, trans_b)
            if not np.allclose(out, 1 + want, rtol=tol, atol=tol):
                return False
            _call(fn, aa, bb, out, False, trans_a, trans_b)
            if not np.allclose(out, want, rtol=tol, atol=tol):
                return False
    return True
