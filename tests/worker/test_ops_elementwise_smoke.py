import numpy as np
import pytest

from gradcheck import check_vjp

rng = np.random.default_rng(0)


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div"])
@pytest.mark.parametrize("shapes", [((3, 4), (3, 4)), ((2, 3, 4), (4,)), ((3, 1), (1, 5)), ((), (2, 2))])
def test_binary_broadcast(op, shapes):
    a = rng.standard_normal(shapes[0])
    b = rng.standard_normal(shapes[1]) + (3.0 if op == "Div" else 0.0)
    check_vjp(op, [np.asarray(a), np.asarray(b)])


@pytest.mark.parametrize("op", ["Neg", "Exp", "Tanh", "Relu"])
def test_unary(op):
    check_vjp(op, [rng.standard_normal((5, 3))])
