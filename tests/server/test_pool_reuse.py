"""Small models keep their actors whatever K (issue 19): on a real embedded Ray, jobs of two small
models alternating K = 3, 2, 1 start no actor once each (model, K) has run once, and retire none.

The engine here has a pool of its own on the session's Ray (the ``ray_engine`` fixture starts it),
so what it starts does not depend on which tests ran before.
"""

from __future__ import annotations

import numpy as np
import pytest

import gradserve
from gradcheck import assert_same_result
from gradserve.server.ray_engine import RayEngine
from gradserve.server.ray_engine.scheduler import MIN_RESERVATION

pytestmark = pytest.mark.slow  # needs Ray worker processes

# Model and K change every job. Starting with the most partitions is the order that made the old
# pool (each actor reserving exactly its first stage's need) retire and start actors when warm.
ORDER = [("b", 3), ("a", 2), ("b", 1), ("a", 3), ("b", 2), ("a", 1)]


def _mlp(layers: int, width: int, seed: int) -> tuple[gradserve.Model, dict[str, np.ndarray]]:
    """A small tanh MLP with a mean-squared-error loss (tens of KB of float64 parameters), batch 16."""
    rng = np.random.default_rng(seed)
    m = gradserve.ModelBuilder()
    h = m.input("x", (None, width), np.float64)
    y = m.input("y", (None, width), np.float64)
    for i in range(layers):
        h = m.tanh(
            h @ m.param(f"w{i}", rng.standard_normal((width, width)) / np.sqrt(width))
            + m.param(f"b{i}", np.zeros(width))
        )
    feeds = {name: rng.standard_normal((16, width)) for name in ("x", "y")}
    return m.loss(m.mse(h, y)), feeds


@pytest.fixture
def engine(ray_engine):
    own = RayEngine(threads_per_worker=1)  # joins the session's Ray: its own, empty pool
    yield own
    own.close()  # kills its actors only: the session's Ray and pool stay


def test_alternating_k_and_models_starts_no_actor_once_warm(engine):
    cases = {"a": _mlp(5, 24, 0), "b": _mlp(3, 32, 1)}
    inline = gradserve.local()
    expected = {name: inline.gradients(model, feeds) for name, (model, feeds) in cases.items()}

    def run(name: str, k: int) -> None:
        model, feeds = cases[name]
        result = engine.gradients(model, feeds, partitions=k, micro_batches=1, replicas=1)
        assert result.info["partitions"] == k
        assert_same_result(result, expected[name])

    for name, k in ORDER:  # cold: plans made, stages loaded, the pool grows to what K=3 needs
        run(name, k)
    started, pids = engine._pool.started, {w["pid"] for w in engine._pool.where}
    assert started == len(pids) == 3, engine._pool.where  # one actor per partition of K=3, no more
    for _ in range(3):
        for name, k in ORDER:
            run(name, k)
            assert engine._pool.started == started, f"{name} K={k} started an actor once warm"
    assert {w["pid"] for w in engine._pool.where} == pids, "an actor was retired"
    assert {w["memory"] for w in engine._pool.where} == {MIN_RESERVATION}
