"""The inline engine: the seed example in closed form, fan-out graphs, whole-model finite
differences, memory release, and bad input failing fast with the culprit named."""

import numpy as np
import pytest

import gradserve
from gradserve.worker.graph import GraphError, InputSpec, Model, Node

from dags import random_dag

engine = gradserve.local()


def sigmoid(z):
    return 1 / (1 + np.exp(-z))


def seed_model(w0=0.7, b0=-0.3):
    """z = w x + b, y_hat = sigmoid(z), L = 1/2 (y - y_hat)^2, summed over the batch."""
    m = gradserve.ModelBuilder()
    x = m.input("x", (None, 1), np.float64)
    y = m.input("y", (None, 1), np.float64)
    w = m.param("w", np.array([[w0]]))
    b = m.param("b", np.array([b0]))
    y_hat = m.sigmoid(x @ w + b)
    return m.loss((0.5 * (y - y_hat) ** 2).sum())


def test_seed_example_closed_form():
    model = seed_model()
    x = np.array([[0.5], [-1.2], [2.0]])
    y = np.array([[1.0], [0.0], [1.0]])
    res = engine.gradients(model, {"x": x, "y": y})
    z = 0.7 * x - 0.3
    y_hat = sigmoid(z)
    # dL/dw = (y_hat - y) sigmoid'(z) x, summed over the batch
    dz = (y_hat - y) * y_hat * (1 - y_hat)
    assert res.loss == pytest.approx(float(np.sum(0.5 * (y - y_hat) ** 2)), rel=1e-12)
    np.testing.assert_allclose(res.grads["w"], [[np.sum(dz * x)]], rtol=1e-12)
    np.testing.assert_allclose(res.grads["b"], [np.sum(dz)], rtol=1e-12)


def _finite_difference_check(model, feeds, eps=1e-6, seed=0):
    """<v, dL/dw> == (L(w + eps v) - L(w - eps v)) / 2 eps for a random direction v."""
    rng = np.random.default_rng(seed)
    res = engine.gradients(model, feeds)
    vs = {p: rng.standard_normal(v.shape) for p, v in model.params.items()}

    def loss_at(t):
        shifted = Model(
            model.nodes,
            model.inputs,
            {p: model.params[p] + t * vs[p] for p in model.params},
            model.loss,
            model.constants,
        )
        return engine.gradients(shifted, feeds).loss

    numeric = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
    analytic = sum(float(np.vdot(vs[p], res.grads[p])) for p in model.params)
    assert analytic == pytest.approx(numeric, rel=1e-6, abs=1e-9)
    return res


def test_fan_out_sums_errors():
    # L = sum(tanh(tanh(x w) + tanh(x w))): one value, two consumers
    m = gradserve.ModelBuilder()
    x = m.input("x", (None, 3), np.float64)
    w = m.param("w", np.random.default_rng(1).standard_normal((3, 3)))
    a = m.tanh(x @ w)
    model = m.loss(m.tanh(a + a).sum())
    res = _finite_difference_check(model, {"x": np.random.default_rng(2).standard_normal((4, 3))})
    assert np.abs(res.grads["w"]).max() > 0


def test_diamond_chain_and_parameter_used_twice():
    m = gradserve.ModelBuilder()
    x = m.input("x", (None, 4), np.float64)
    w = m.param("w", np.random.default_rng(3).standard_normal((4, 4)) * 0.5)
    c = m.param("c", np.random.default_rng(4).standard_normal(4))
    a = x @ w
    b = m.sigmoid(a)
    d = a + b  # diamond: a -> b -> d and a -> d
    e = d + c  # chain d = a + b; e = d + c
    f = m.tanh(e @ w)  # w used a second time
    model = m.loss((f * f).mean())
    _finite_difference_check(model, {"x": np.random.default_rng(5).standard_normal((5, 4))})


def test_random_dags_against_finite_differences():
    for seed in range(3):
        model, feeds = random_dag(seed)
        res = _finite_difference_check(model, feeds, seed=seed)
        assert not np.any(res.grads["dead"]), "a parameter that does not reach the loss gets a zero gradient"


def test_input_gradients():
    model = seed_model()
    x, y = np.array([[0.5], [1.5]]), np.array([[1.0], [0.0]])
    res = engine.gradients(model, {"x": x, "y": y}, input_grads=["x"])
    y_hat = sigmoid(0.7 * x - 0.3)
    np.testing.assert_allclose(res.input_grads["x"], (y_hat - y) * y_hat * (1 - y_hat) * 0.7, rtol=1e-12)


def test_float32_stays_float32():
    m = gradserve.ModelBuilder()
    x = m.input("x", (None, 3))
    w = m.param("w", np.ones((3, 2), np.float32))
    model = m.loss(m.relu(x @ w).mean())
    res = engine.gradients(model, {"x": np.ones((2, 3), np.float32)})
    assert res.grads["w"].dtype == np.float32


def test_activations_not_needed_by_backward_are_released():
    from gradserve.worker.autodiff import compile_program, forward
    from gradserve.server.planning.prepare import prepare

    m = gradserve.ModelBuilder()
    x = m.input("x", (None, 8), np.float64)
    w = m.param("w", np.ones((8, 8)))
    h = x @ w
    for _ in range(5):
        h = h + 1.0  # Add keeps no inputs for its VJP: each intermediate can go right away
    model = m.loss(h.sum())
    feeds = {"x": np.ones((4, 8))}
    job = prepare(model, feeds)
    program = compile_program(list(job.nodes), [*feeds, *model.params, *model.constants], [model.loss], job.wrt)
    tape = forward(program, {**feeds, **model.params, **model.constants})
    held = [a for ctx in tape.entries if ctx is not None for a in ctx.inputs if a is not None and a.nbytes > 0]
    held = [a for a in held if a.strides != (0,) * a.ndim]
    # Only MatMul's x (and w) stay alive for the backward pass; the Add chain holds nothing.
    assert sum(a.size for a in held) == 4 * 8 + 8 * 8
    assert any(program.drop_after), "values nothing reads again are dropped during forward"


# -- bad input -------------------------------------------------------------------------------------
def _model(nodes, loss="L", params=None, inputs=None):
    return Model(
        nodes=nodes,
        inputs=inputs if inputs is not None else [InputSpec("x", np.dtype("float64"), ("batch", 3))],
        params=params if params is not None else {"w": np.ones((3, 2))},
        loss=loss,
    )


FEEDS = {"x": np.ones((2, 3))}


def _mean_loss(src="h"):
    return Node("mean", "ReduceMean", [src], ["L"], {"keepdims": 0})


@pytest.mark.parametrize(
    "nodes, feeds, match",
    [
        (
            [
                Node("mm", "MatMul", ["x", "w"], ["h"]),
                Node("cyc", "Add", ["h", "L"], ["h2"]),
                Node("mean", "ReduceMean", ["h2"], ["L"], {"keepdims": 0}),
            ],
            FEEDS,
            "cycle through nodes 'cyc', 'mean'",
        ),
        (
            [Node("mm", "MatMul", ["x", "nowhere"], ["h"]), _mean_loss()],
            FEEDS,
            "node 'mm' \\(MatMul\\): input 'nowhere'",
        ),
        (
            [Node("mm", "Frobnicate", ["x", "w"], ["h"]), _mean_loss()],
            FEEDS,
            "node 'mm'.*unsupported op type 'Frobnicate'",
        ),
        ([Node("mm", "MatMul", ["x", "w", "w"], ["h"]), _mean_loss()], FEEDS, "node 'mm' \\(MatMul\\)"),
        (
            [Node("mm", "MatMul", ["x", "x"], ["h"]), _mean_loss()],
            FEEDS,
            "node 'mm' \\(MatMul\\).*[Ii]ncompatible dimensions",
        ),
        ([Node("mm", "MatMul", ["x", "w"], ["L"])], FEEDS, "loss 'L' must be a scalar"),
        ([Node("mm", "MatMul", ["x", "w"], ["h"]), _mean_loss()], {}, "feed 'x' is missing"),
        (
            [Node("mm", "MatMul", ["x", "w"], ["h"]), _mean_loss()],
            {"x": np.ones((2, 4))},
            "feed 'x' has shape \\(2, 4\\)",
        ),
        (
            [Node("mm", "MatMul", ["x", "w"], ["h"]), _mean_loss()],
            {"x": np.ones((2, 3), np.float32)},
            "feed 'x' has dtype float32",
        ),
        (
            [Node("mm", "MatMul", ["x", "w"], ["h"]), _mean_loss()],
            {**FEEDS, "extra": np.ones(1)},
            "feed 'extra' is not an input",
        ),
        ([Node("mm", "MatMul", ["x", "w"], ["h"]), _mean_loss("nope")], FEEDS, "node 'mean'.*input 'nope'"),
    ],
    ids=[
        "cycle",
        "dangling",
        "unknown-op",
        "input-count",
        "shape-mismatch",
        "non-scalar-loss",
        "missing-feed",
        "feed-shape",
        "feed-dtype",
        "unknown-feed",
        "dangling-loss-input",
    ],
)
def test_bad_input_fails_fast_naming_the_culprit(nodes, feeds, match):
    with pytest.raises(GraphError, match=match):
        engine.gradients(_model(nodes), feeds)


def test_dtype_mismatch_between_node_inputs_is_named():
    model = _model([Node("mm", "MatMul", ["x", "w"], ["h"]), _mean_loss()], params={"w": np.ones((3, 2), np.float32)})
    with pytest.raises(GraphError, match="node 'mm' \\(MatMul\\)"):
        engine.gradients(model, FEEDS)


def test_run_time_error_names_the_node():
    # Index values are data: only running the Gather finds that 7 is out of range for 3 rows.
    m = gradserve.ModelBuilder()
    idx = m.input("idx", (None,), np.int64)
    table = m.param("table", np.ones((3, 2)))
    emb = m.op("Gather", table, idx, name="embed")
    model = m.loss(emb.sum())
    with pytest.raises(GraphError, match="node 'embed' \\(Gather\\)"):
        engine.gradients(model, {"idx": np.array([0, 7])})
