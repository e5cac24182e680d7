"""Einsum: forwards against torch.einsum and onnx's reference implementation, VJPs against finite
differences (float64) for every form ONNX allows: explicit and implicit output, repeated letters in an
operand (diagonals), letters summed away, ellipsis with broadcasting, any number of operands."""

import numpy as np
import pytest
import torch

from gradcheck import check_vjp, onnx_reference, run_op
from gradserve.worker.autodiff import NodeError

rng = np.random.default_rng(11)

CASES = [
    ("ij,jk->ik", [(2, 3), (3, 4)]),  # matmul
    ("bij,bjk->bik", [(2, 3, 4), (2, 4, 5)]),  # batched matmul
    ("bhqd,bhkd->bhqk", [(2, 3, 4, 5), (2, 3, 6, 5)]),  # attention scores
    ("i,j->ij", [(3,), (4,)]),  # outer product
    ("ii", [(4, 4)]),  # trace (implicit output: nothing)
    ("ii->i", [(4, 4)]),  # diagonal
    ("bii->bi", [(2, 3, 3)]),  # batched diagonal
    ("ij->ji", [(2, 3)]),  # transpose
    ("ij->", [(2, 3)]),  # sum
    ("ij->i", [(2, 3)]),  # row sums
    ("ij,jk", [(2, 3), (3, 4)]),  # implicit output: ik
    ("ba,cb", [(3, 2), (4, 3)]),  # implicit output sorts the letters: ac
    ("Ab,bA", [(2, 3), (3, 2)]),  # upper and lower case are distinct letters
    ("...ij,...jk->...ik", [(1, 2, 3), (4, 3, 2)]),  # ellipsis; a leading size-1 dim broadcasts
    ("...ij,jk", [(5, 2, 3), (3, 4)]),  # implicit: ellipsis axes first
    ("i...,i...->...", [(3, 1, 4), (3, 2, 1)]),  # ellipsis after letters, both broadcast
    ("ij,jk,kl->il", [(2, 3), (3, 4), (4, 2)]),  # three operands
    ("ij,ij,ij->j", [(3, 2), (3, 2), (3, 2)]),  # a letter shared by three operands
    ("ij,jk,ki->", [(2, 3), (3, 4), (4, 2)]),  # a trace of a triple product
    ("iij,jk->ki", [(3, 3, 2), (2, 4)]),  # a diagonal inside a product
    ("ij,k->ik", [(2, 3), (4,)]),  # j is summed over its operand alone
    ("bn,anm,bm->ba", [(2, 3), (4, 3, 5), (2, 5)]),  # bilinear
    (" i j , j k -> i k ", [(2, 3), (3, 4)]),  # spaces are allowed
]


@pytest.mark.parametrize("equation,shapes", CASES, ids=[c[0].replace(" ", "_") for c in CASES])
def test_einsum(equation, shapes):
    xs = [rng.standard_normal(s) for s in shapes]
    y = run_op("Einsum", xs, {"equation": equation})[0]
    want = torch.einsum(equation.replace(" ", ""), *map(torch.from_numpy, xs)).numpy()
    assert y.shape == want.shape and y.dtype == np.float64
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(
        y, onnx_reference("Einsum", xs, {"equation": equation}, opset=17)[0], rtol=1e-12, atol=1e-12
    )
    check_vjp("Einsum", xs, {"equation": equation})


def test_einsum_ellipses_of_different_ranks():
    # ONNX wants every ellipsis to stand for as many axes (its shape inference refuses this);
    # numpy and torch right-align them and broadcast, and so do we
    a, b = rng.standard_normal((2, 3)), rng.standard_normal((5, 4, 3, 2))
    y = run_op("Einsum", [a, b], {"equation": "...ij,...jk->...ik"})[0]
    np.testing.assert_allclose(y, np.matmul(a, b), rtol=1e-12)
    check_vjp("Einsum", [a, b], {"equation": "...ij,...jk->...ik"}, check_shapes=False)


def test_einsum_explicit_output_without_ellipsis_sums_it():
    # numpy refuses "...i->i"; it can only mean the sum over the ellipsis axes
    x = rng.standard_normal((2, 5, 3))
    np.testing.assert_allclose(run_op("Einsum", [x], {"equation": "...i->i"})[0], x.sum(axis=(0, 1)))
    check_vjp("Einsum", [x], {"equation": "...i->i"}, check_shapes=False)


def test_einsum_float32_and_errors():
    a, b = (rng.standard_normal(s).astype(np.float32) for s in [(2, 3), (3, 4)])
    y = run_op("Einsum", [a, b], {"equation": "ij,jk->ik"})[0]
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, a @ b, rtol=1e-5)
    assert run_op("Einsum", [a], {"equation": "ij->"})[0].dtype == np.float32  # 0-d, not a numpy scalar
    assert isinstance(run_op("Einsum", [a], {"equation": "ij->"})[0], np.ndarray)
    with pytest.raises(NodeError, match="sizes 3 and 2"):
        run_op("Einsum", [a, a], {"equation": "ij,jk->ik"})
    with pytest.raises(NodeError, match="does not fit"):
        run_op("Einsum", [a], {"equation": "ijk->i"})
    with pytest.raises(NodeError, match="2 operands"):
        run_op("Einsum", [a], {"equation": "ij,jk->ik"})
