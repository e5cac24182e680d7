"""The strided GEMM the direct convolution is built on, against numpy's matmul."""

import numpy as np
import pytest

from gradserve.worker.ops import blas

rng = np.random.default_rng(3)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
def test_gemm_on_strided_views_overwrites_and_accumulates(dtype, trans_a, trans_b):
    big = rng.standard_normal((40, 70)).astype(dtype)
    m, k, n = 5, 7, 9
    a = big[:k, 3 : 3 + m] if trans_a else big[:m, 3 : 3 + k]  # row stride 70, not the width
    b = big[10 : 10 + n, 20 : 20 + k] if trans_b else big[10 : 10 + k, 20 : 20 + n]
    want = (a.T if trans_a else a) @ (b.T if trans_b else b)
    out_buf = np.full((m, 30), 2.0, dtype)
    out = out_buf[:, 4 : 4 + n]  # a strided output too
    blas.gemm(a, b, out, accumulate=True, trans_a=trans_a, trans_b=trans_b)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(out, 2 + want, rtol=tol, atol=tol)
    blas.gemm(a, b, out, accumulate=False, trans_a=trans_a, trans_b=trans_b)
    np.testing.assert_allclose(out, want, rtol=tol, atol=tol)
    assert (out_buf[:, :4] == 2).all() and (out_buf[:, 4 + n :] == 2).all()  # nothing outside the view


def test_gemm_refuses_what_blas_cannot_address():
    a, b = np.ones((3, 4)), np.ones((4, 5))
    with pytest.raises(ValueError, match="shapes do not match"):
        blas.gemm(a, b, np.empty((3, 6)), accumulate=False)
    with pytest.raises(ValueError, match="unit stride"):
        blas.gemm(np.ones((3, 8))[:, ::2], b, np.empty((3, 5)), accumulate=False)
    with pytest.raises(ValueError, match="float64"):
        blas.gemm(a.astype(np.float32), b, np.empty((3, 5)), accumulate=False)
    with pytest.raises(ValueError, match="read-only"):
        out = np.empty((3, 5))
        out.flags.writeable = False
        blas.gemm(a, b, out, accumulate=False)


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv("GRADSERVE_STRIDED_BLAS", "0")
    blas._routine.cache_clear()
    try:
        assert not blas.available(np.float32)
        with pytest.raises(RuntimeError):
            blas.gemm(np.ones((2, 2), np.float32), np.ones((2, 2), np.float32), np.empty((2, 2), np.float32), accumulate=False)
    finally:
        monkeypatch.delenv("GRADSERVE_STRIDED_BLAS")
        blas._routine.cache_clear()
    assert blas.available(np.float32)
