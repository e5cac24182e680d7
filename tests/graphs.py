"""Models built with gradserve.ModelBuilder that several test files plan or run: a deep float32 MLP
(``deep_mlp``: big enough that planning shares it out) and the losses micro-batching must refuse,
each with what its refusal says (``_refusal_cases``)."""

from __future__ import annotations

import numpy as np

import gradserve
from gradserve.server.planning.prepare import PreparedJob, prepare
from gradserve.worker.graph import Model


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
            h = m.op("BatchNormalization", h, m.param("s", np.ones(2)), m.param("b", np.zeros(2)),
                     m.constant(np.zeros(2)), m.constant(np.ones(2)), n_outputs=3, training_mode=1)[0]
        return m.loss(make_loss(m, h, w))

    return {
        "product of means": (build(lambda m, h, w: (h * h).mean() * (h * h).mean()), "not linear"),
        "batch-independent term": (build(lambda m, h, w: h.sum() + (w * w).sum()), "does not depend on the batch"),
        "batch mean below the loss": (build(lambda m, h, w: ((h - h.mean()) ** 2).sum()),
                                      "combines a batch reduction with per-sample values"),
        "training-mode BatchNorm": (build(lambda m, h, w: h.mean(), training_bn=True), "statistics of the whole batch"),
    }
