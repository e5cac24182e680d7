"""``gradserve demo``: the seed regression example and an MLP, end to end.

With ``--engine server`` (the default) it starts a gradserve server on a free local port with an
embedded single-node Ray, submits both models through the client library, prints the loss and
gradients, checks them against the closed form and the inline engine, and shuts everything down.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import time
from typing import Any, Iterator

import numpy as np

from gradserve.client.builder import ModelBuilder
from gradserve.server.inline import InlineEngine
from gradserve.worker.graph import Model


def seed_example() -> tuple[Model, dict[str, np.ndarray]]:
    """z = w x + b, y_hat = sigmoid(z), L = 1/2 (y - y_hat)^2 (summed over a batch of 4)."""
    m = ModelBuilder()
    x = m.input("x", (None, 1), np.float64)
    y = m.input("y", (None, 1), np.float64)
    w = m.param("w", np.array([[0.8]]))
    b = m.param("b", np.array([-0.2]))
    y_hat = m.sigmoid(x @ w + b)
    model = m.loss((0.5 * (y - y_hat) ** 2).sum())
    feeds = {"x": np.array([[0.5], [-1.0], [2.0], [0.1]]), "y": np.array([[1.0], [0.0], [1.0], [0.0]])}
    return model, feeds


def seed_closed_form(feeds: dict[str, np.ndarray], w: float = 0.8, b: float = -0.2) -> dict[str, np.ndarray]:
    """dL/dw = (y_hat - y) sigmoid'(z) x and dL/db = (y_hat - y) sigmoid'(z), summed over the batch."""
    x, y = feeds["x"], feeds["y"]
    y_hat = 1 / (1 + np.exp(-(w * x + b)))
    dz = (y_hat - y) * y_hat * (1 - y_hat)
    return {"w": np.array([[np.sum(dz * x)]]), "b": np.array([np.sum(dz)])}


def mlp_example(seed: int = 0) -> tuple[Model, dict[str, np.ndarray]]:
    """A 3-layer tanh MLP (16 -> 64 -> 64 -> 4) with an MSE loss, float32, batch 256."""
    rng = np.random.default_rng(seed)
    m = ModelBuilder()
    x = m.input("x", (None, 16))
    y = m.input("y", (None, 4))
    h = x
    for i, (a, b) in enumerate([(16, 64), (64, 64), (64, 4)]):
        w = m.param(f"layer{i}.weight", (rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32))
        bias = m.param(f"layer{i}.bias", np.zeros(b, np.float32))
        h = h @ w + bias
        if i < 2:
            h = m.tanh(h)
    model = m.loss(m.mse(h, y))
    feeds = {
        "x": rng.standard_normal((256, 16)).astype(np.float32),
        "y": rng.standard_normal((256, 4)).astype(np.float32),
    }
    return model, feeds


@contextlib.contextmanager
def _engine(kind: str) -> Iterator[Any]:
    """Something with ``.gradients(model, feeds, **options)``: an engine or a client of a local server."""
    if kind == "inline":
        yield InlineEngine()
        return
    from gradserve.server.ray_engine import RayEngine

    if kind == "ray":
        with RayEngine(partitions=2) as engine:
            yield engine
        return
    from gradserve.client.remote import Client
    from gradserve.server.service import GradientServer

    print("starting a local gradserve server with an embedded single-node Ray ...", flush=True)
    server = GradientServer(lambda: RayEngine(), "127.0.0.1:0")
    address = server.start()
    print(f"server listening on {address}", flush=True)
    try:
        with Client(address) as client:
            yield client
    finally:
        server.stop(grace=5)
        print("server stopped", flush=True)


def _show(title: str, result, expected: dict[str, np.ndarray], what: str) -> float:
    print(f"\n{title}\n  loss = {result.loss:.6f}")
    worst = 0.0
    for name, g in result.grads.items():
        want = expected[name]
        err = float(np.abs(g - want).max() / max(np.abs(want).max(), 1e-30))
        worst = max(worst, err)
        flat = np.ravel(g)
        shown = np.array2string(flat[:4], precision=5, separator=", ") + (" ..." if flat.size > 4 else "")
        print(f"  dL/d{name:<15} shape {str(g.shape):<10} {shown}   rel. err vs {what}: {err:.1e}")
    return worst


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo; exit status 0 when every gradient matches its reference."""
    logging.getLogger("gradserve").setLevel(logging.WARNING)
    inline = InlineEngine()
    seed_model, seed_feeds = seed_example()
    mlp_model, mlp_feeds = mlp_example()
    ok = True
    with _engine(args.engine) as engine:
        options = {} if args.engine == "inline" else {"partitions": 2, "micro_batches": 2}
        t = time.perf_counter()
        seed = engine.gradients(seed_model, seed_feeds)
        worst = _show(
            "seed example: z = w x + b, y_hat = sigmoid(z), L = 1/2 (y - y_hat)^2",
            seed,
            seed_closed_form(seed_feeds),
            "closed form",
        )
        ok &= worst < 1e-10
        mlp = engine.gradients(mlp_model, mlp_feeds, **options)
        worst = _show(
            f"MLP 16-64-64-4, batch 256, float32 ({args.engine} engine{', 2 partitions x 2 micro-batches' if options else ''})",
            mlp,
            inline.gradients(mlp_model, mlp_feeds).grads,
            "inline engine",
        )
        ok &= worst < 1e-4
        print(f"\ncomputed in {time.perf_counter() - t:.2f} s")
    print("all gradients match their references" if ok else "MISMATCH: some gradients differ from their references")
    return 0 if ok else 1
