"""Random DAG models for engine tests: fan-out across partition cuts, skip connections, shared
parameters and a dead branch, all with a batch dimension so they can be micro-batched."""

from __future__ import annotations

import numpy as np

import gradserve


def random_dag(seed: int, width: int = 6, depth: int = 10, dtype=np.float64):
    """A model with ``depth`` layers; each layer combines 1-3 random earlier values (skip
    connections), some layers reuse a shared weight, and one branch does not reach the loss."""
    rng = np.random.default_rng(seed)
    m = gradserve.ModelBuilder()
    x = m.input("x", (None, width), dtype)
    target = m.input("target", (None, width), dtype)
    shared = m.param("shared", (rng.standard_normal((width, width)) / np.sqrt(width)).astype(dtype))
    values = [x]
    for i in range(depth):
        picks = rng.choice(len(values), size=min(len(values), rng.integers(1, 4)), replace=False)
        h = values[picks[0]]
        for j in picks[1:]:
            h = h + values[j] if rng.random() < 0.5 else h * m.tanh(values[j])
        w = (
            shared
            if rng.random() < 0.3
            else m.param(f"w{i}", (rng.standard_normal((width, width)) / np.sqrt(width)).astype(dtype))
        )
        b = m.param(f"b{i}", (0.1 * rng.standard_normal(width)).astype(dtype))
        act = [m.tanh, m.sigmoid, lambda v: v * 0.5][rng.integers(0, 3)]
        values.append(act(h @ w + b))
    dead = m.param("dead", np.ones((width, width), dtype))
    _unused = m.relu(values[-1] @ dead)  # does not reach the loss: must not hang, gets zero grad
    out = values[-1] + values[len(values) // 2]  # a long skip connection
    loss = ((out - target) ** 2).mean() + 0.1 * (values[2] * values[-2]).mean()
    model = m.loss(loss)
    feeds = {
        "x": rng.standard_normal((8, width)).astype(dtype),
        "target": rng.standard_normal((8, width)).astype(dtype),
    }
    return model, feeds
