"""The one way the ops reach BLAS (gradserve.worker.ops.blas): the strided GEMM the direct
convolution is built on and the matmul every product goes through, against numpy's matmul, on each
BLAS library this machine has."""

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


def _libraries() -> list[str]:
    """The BLAS libraries the ops can call directly here (MKL only where it is installed)."""
    return ["openblas"] + (["mkl"] if _has_dist("mkl") else [])


def _has_dist(name: str) -> bool:
    import importlib.metadata

    try:
        importlib.metadata.distribution(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.fixture
def library(request, monkeypatch):
    """The blas module bound to the library named by the test's parameter (and back after)."""
    monkeypatch.setenv("GRADSERVE_BLAS", request.param)
    blas._backend.cache_clear()
    yield request.param
    monkeypatch.undo()
    blas._backend.cache_clear()


@pytest.mark.parametrize("library", _libraries(), indirect=True)
def test_each_library_binds_and_passes_its_self_test(library):
    assert blas.backend().name == library
    assert blas.available(np.float32) and blas.available(np.float64)


def _layouts(x: np.ndarray):
    """x as a row-major array, as the transpose of one (column-major), and as a strided view."""
    yield x
    yield np.asfortranarray(x)
    wide = np.zeros(x.shape[:-1] + (x.shape[-1] + 3,), x.dtype)
    wide[..., 1 : 1 + x.shape[-1]] = x
    yield wide[..., 1 : 1 + x.shape[-1]]


@pytest.mark.parametrize("library", _libraries() + ["numpy"], indirect=True)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "shapes",
    [
        ((64, 70), (70, 80)),  # 2-D
        ((3, 64, 70), (70, 80)),  # a stack times one matrix: folded into one product
        ((3, 64, 70), (3, 70, 80)),  # batched
        ((64, 70), (2, 3, 70, 80)),  # broadcast over a stack
        ((1, 64, 70), (4, 70, 80)),
        ((1, 64, 70), (1, 70, 80)),  # a stack of one
        ((2, 1, 64, 70), (1, 3, 70, 80)),  # broadcast along different axes: no one stride per operand
        ((2, 3, 64, 70), (2, 3, 70, 80)),  # two stack axes that flatten into one
        ((4, 5), (5, 3)),  # small: numpy's
    ],
)
def test_matmul_is_numpys_matmul(library, dtype, shapes):
    a0, b0 = (rng.standard_normal(s).astype(dtype) for s in shapes)
    want = np.matmul(a0.astype(np.float64), b0.astype(np.float64))
    tol = 1e-4 if dtype == np.float32 else 1e-12
    for a in _layouts(a0):
        for b in _layouts(b0):
            got = blas.matmul(a, b)
            assert got.shape == want.shape and got.dtype == dtype
            np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
    out = np.full(want.shape, np.nan, dtype)
    assert blas.matmul(a0, b0, out=out) is out
    np.testing.assert_allclose(out, want, rtol=tol, atol=tol)
    if out.ndim == 2:  # into a strided view of a wider output, nothing outside it touched
        wide = np.full((out.shape[0], out.shape[1] + 4), 7.0, dtype)
        blas.matmul(a0, b0, out=wide[:, 2 : 2 + out.shape[1]])
        np.testing.assert_allclose(wide[:, 2 : 2 + out.shape[1]], want, rtol=tol, atol=tol)
        assert (wide[:, :2] == 7).all() and (wide[:, 2 + out.shape[1] :] == 7).all()


def test_matmul_leaves_what_blas_cannot_do_to_numpy():
    ints = np.arange(12).reshape(3, 4), np.arange(20).reshape(4, 5)
    np.testing.assert_array_equal(blas.matmul(*ints), np.matmul(*ints))
    mixed = rng.standard_normal((64, 70)).astype(np.float32), rng.standard_normal((70, 80))
    np.testing.assert_allclose(blas.matmul(*mixed), np.matmul(*mixed), rtol=1e-6)
    v = rng.standard_normal(70)
    np.testing.assert_allclose(blas.matmul(mixed[1].T, v), mixed[1].T @ v, rtol=1e-12)
    with pytest.raises(ValueError):
        blas.matmul(np.ones((3, 4)), np.ones((5, 6)))


@pytest.mark.parametrize("library", _libraries(), indirect=True)
def test_limit_sets_the_threads_of_the_library_in_use(library):
    from threadpoolctl import threadpool_info

    def threads():
        return {i["internal_api"]: i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}

    blas.matmul(np.ones((64, 64)), np.ones((64, 64)))  # the library loaded
    before = threads()[library]
    with blas.limit(1):
        assert threads()[library] == 1
    assert threads()[library] == before
    with blas.limit(None):  # no budget: no limit
        assert threads()[library] == before


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv("GRADSERVE_BLAS", "numpy")
    blas._backend.cache_clear()
    try:
        assert blas.backend().name == "numpy"
        assert not blas.available(np.float32)
        with pytest.raises(RuntimeError):
            blas.gemm(
                np.ones((2, 2), np.float32), np.ones((2, 2), np.float32), np.empty((2, 2), np.float32), accumulate=False
            )
    finally:
        monkeypatch.delenv("GRADSERVE_BLAS")
        blas._backend.cache_clear()
    assert blas.available(np.float32)


def test_an_unknown_choice_is_auto(monkeypatch, caplog):
    monkeypatch.setenv("GRADSERVE_BLAS", "atlas")
    blas._backend.cache_clear()
    try:
        assert blas.backend().name in ("mkl", "openblas")
        assert "GRADSERVE_BLAS=atlas" in caplog.text
    finally:
        monkeypatch.delenv("GRADSERVE_BLAS")
        blas._backend.cache_clear()


@pytest.mark.parametrize("library", _libraries() + ["numpy"], indirect=True)
def test_products_of_the_ops_on_each_library(library, monkeypatch):
    """The ops whose products go through this module (Gemm, MatMul, Conv, an RNN), at sizes that
    reach the library, against finite differences and numpy's (or torch's) forward."""
    import torch

    from gradcheck import check_vjp, run_op

    calls = []
    real = blas.gemm
    monkeypatch.setattr(blas, "gemm", lambda *args, **kw: calls.append(1) or real(*args, **kw))

    a, b, c = rng.standard_normal((40, 50)), rng.standard_normal((60, 50)), rng.standard_normal(60)
    for attrs in ({"transB": 1}, {"transA": 1, "transB": 1, "alpha": 0.5}):
        aa = a.T.copy() if attrs.get("transA") else a
        check_vjp("Gemm", [aa, b, c], attrs)
        want = attrs.get("alpha", 1.0) * (a @ b.T) + c
        np.testing.assert_allclose(run_op("Gemm", [aa, b, c], attrs)[0], want, rtol=1e-12, atol=1e-12)
    x, w = rng.standard_normal((3, 40, 50)), rng.standard_normal((50, 60))
    check_vjp("MatMul", [x, w])
    check_vjp("MatMul", [x, rng.standard_normal((3, 50, 60))])
    np.testing.assert_allclose(run_op("MatMul", [x, w])[0], x @ w, rtol=1e-12, atol=1e-12)
    images, kernel = rng.standard_normal((2, 16, 12, 12)), rng.standard_normal((16, 16, 3, 3))
    check_vjp("Conv", [images, kernel, rng.standard_normal(16)], {"pads": [1, 1, 1, 1]})
    want = torch.nn.functional.conv2d(torch.from_numpy(images), torch.from_numpy(kernel), padding=1).numpy()
    np.testing.assert_allclose(
        run_op("Conv", [images, kernel], {"pads": [1, 1, 1, 1]})[0], want, rtol=1e-10, atol=1e-10
    )
    seq, hidden = rng.standard_normal((5, 8, 40)), 48
    check_vjp(
        "RNN",
        [seq, rng.standard_normal((1, hidden, 40)) * 0.1, rng.standard_normal((1, hidden, hidden)) * 0.1],
        {"hidden_size": hidden},
        n_outputs=2,
    )
    assert bool(calls) == (library != "numpy"), "the products reached the library asked for"


@pytest.mark.parametrize("library", _libraries(), indirect=True)
def test_a_stack_of_products_is_one_batched_call_where_the_library_has_one(library, monkeypatch):
    blas.backend()  # bound (and self-tested) before counting
    calls = []
    real = blas._batched
    monkeypatch.setattr(blas, "_batched", lambda *args: calls.append(args[-1]) or real(*args))
    a, b = rng.standard_normal((2, 3, 40, 50)), rng.standard_normal((2, 3, 50, 60))
    np.testing.assert_allclose(blas.matmul(a, b), np.matmul(a, b), rtol=1e-12, atol=1e-12)
    assert calls == ([2] if blas.backend().batch_routine("d") else [])  # one call over both stack axes
