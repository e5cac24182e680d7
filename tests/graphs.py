"""Models built with gradserve.ModelBuilder that several test files plan or run: a deep float32 MLP
(``deep_mlp``: big enough that planning shares it out) and the losses micro-batching must refuse,
each with what its refusal says (``_refusal_cases``); and hand-built ONNX-style graphs for the
micro-batching planner (``graph``, ``follow``, ``f64``)."""

from __future__ import annotations

import numpy as np

import gradserve
from gradserve.server.planning.batching import _Follower
from gradserve.server.planning.prepare import PreparedJob, prepare
from gradserve.worker.graph import InputSpec, Model, Node
from gradserve.worker.validate import infer_shapes, toposort


def deep_mlp(layers: int = 6, width: int = 512, batch: int = 256) -> tuple[Model, dict[str, np.ndarray], PreparedJob]:
    """A ``layers``-deep tanh MLP of ``width`` units with an MSE loss (float32), feeds of ``batch``
    samples, and the prepared job."""
    rng = np.random.default_rng(0)
    m = gradserve.ModelBuilder()
    x, y = m.input("x", (None, width)), m.input("y", (None, width))
    h = x
    for i in range(layers):
        h = m.tanh(h @ m.param(f"w{i}", (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)))
    model = m.loss(m.mse(h, y))
    feeds = {k: rng.standard_normal((batch, width)).astype(np.float32) for k in ("x", "y")}
    return model, feeds, prepare(model, feeds)


def _refusal_cases() -> dict[str, tuple[Model, str]]:
    """Losses that cannot be split into micro-batches exactly, by name: (model, what the refusal
    says). Each takes an ``x`` of shape (batch, 3)."""

    def build(make_loss, training_bn=False):
        m = gradserve.ModelBuilder()
        x = m.input("x", (None, 3), np.float64)
        w = m.param("w", np.ones((3, 2)))
        h = x @ w
        if training_bn:
            h = m.op(
                "BatchNormalization",
                h,
                m.param("s", np.ones(2)),
                m.param("b", np.zeros(2)),
                m.constant(np.zeros(2)),
                m.constant(np.ones(2)),
                n_outputs=3,
                training_mode=1,
            )[0]
        return m.loss(make_loss(m, h, w))

    return {
        "product of means": (build(lambda m, h, w: (h * h).mean() * (h * h).mean()), "not linear"),
        "batch-independent term": (build(lambda m, h, w: h.sum() + (w * w).sum()), "does not depend on the batch"),
        "batch mean below the loss": (
            build(lambda m, h, w: ((h - h.mean()) ** 2).sum()),
            "combines a batch reduction with per-sample values",
        ),
        "training-mode BatchNorm": (build(lambda m, h, w: h.mean(), training_bn=True), "statistics of the whole batch"),
    }


RNG = np.random.default_rng(0)


def follow(model, feeds, batched=None, n=None):
    """The loss reduction found for a hand-built graph, shape-checked by ONNX only (the ops need not
    run yet): (kind, detail), or GraphError."""
    nodes = toposort(model.nodes)
    job = PreparedJob(tuple(nodes), infer_shapes(model, nodes, feeds), tuple(model.params), (), model.loss)
    batched = batched or {s.name for s in model.inputs if not isinstance(s.shape[0], int)}
    n = n or feeds[next(iter(batched))].shape[0]
    return _Follower(model, job, set(batched), n).loss_reduction()


def graph(nodes, inputs, params=None, constants=None, loss="loss", opset=17):
    specs = [InputSpec(name, np.dtype(dtype), shape) for name, shape, dtype in inputs]
    return Model(
        nodes=[Node(f"n{k}_{n[0]}", n[0], n[1], n[2], n[3] if len(n) > 3 else {}) for k, n in enumerate(nodes)],
        inputs=specs,
        params=params or {},
        loss=loss,
        constants=constants or {},
        opset=opset,
    )


def f64(*shape):
    return RNG.standard_normal(shape)


def lm(B=6, T=4, D=3, V=5, shape_from="constant", ignore=None, dynamic=True):
    """logits (B, T, V) -> (B*T, V) and targets (B, T) -> (B*T,) into a mean cross-entropy."""
    m = gradserve.ModelBuilder()
    x = m.input("x", (None if dynamic else B, T, D), np.float64)
    t = m.input("t", (None if dynamic else B, T), np.int64)
    logits = m.op("Add", x @ m.param("w", f64(D, V)), m.param("b", f64(V)))
    if shape_from == "constant":  # logits.view(-1, V)
        flat = m.op("Reshape", logits, m.constant(np.array([-1, V])), name="merge")
        labels = m.op("Reshape", t, m.constant(np.array([-1])), name="merge_t")
    else:  # logits.reshape(B*T, V), B from Shape, as the legacy exporter writes it
        b = m.op("Gather", m.op("Shape", x), m.constant(np.array(0)), axis=0)
        bt = m.op("Unsqueeze", m.op("Mul", b, m.constant(np.array(T))), m.constant(np.array([0])))
        flat = m.op("Reshape", logits, m.op("Concat", bt, m.constant(np.array([V])), axis=0), name="merge")
        labels = m.op("Reshape", t, bt, name="merge_t")
    attrs = {} if ignore is None else {"ignore_index": ignore}
    model = m.loss(m.op("SoftmaxCrossEntropyLoss", flat, labels, reduction="mean", **attrs))
    targets = RNG.integers(0, V, (B, T))
    if ignore is not None:
        targets[0] = ignore
        targets[3, 1:] = ignore
    return model, {"x": f64(B, T, D), "t": targets}
