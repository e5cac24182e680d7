"""Every byte a Ray job moves, counted: the object store holds no copy beyond the minimum.

A job has to move its feeds to the stages that read them, each boundary activation from the
stage that produces it (and its error back), and dL/dw: to the driver, and for replicas each
other replica's share to the one that sums them. Anything more in the object store is a copy
nobody needed. The raylet counts every byte created in its store (``cumulative_created_bytes``);
small values that Ray carries inline in a call (under 100 KB) never reach the store, so the
model here is sized for every value to go through it.
"""

from __future__ import annotations

import numpy as np
import pytest

import gradserve

pytestmark = pytest.mark.slow  # needs Ray worker processes

BATCH, WIDTH, LAYERS = 512, 256, 4  # every feed, activation and micro-batch above Ray's inline limit
SLACK = 64 << 10  # call tuples, per-stage seconds, pickle headers: bytes, not copies


def _mlp() -> tuple[gradserve.Model, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    m = gradserve.ModelBuilder()
    x, y = m.input("x", (None, WIDTH)), m.input("y", (None, WIDTH))
    h = x
    for i in range(LAYERS):
        h = h @ m.param(f"w{i}", (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32))
        h = m.tanh(h) if i < LAYERS - 1 else h
    model = m.loss(m.mse(h, y))
    feeds = {k: rng.standard_normal((BATCH, WIDTH)).astype(np.float32) for k in ("x", "y")}
    return model, feeds


def _created(what: str = "bytes") -> int:
    """Bytes (or objects) ever created in the object stores of the cluster's alive nodes."""
    import ray
    from ray._private.internal_api import node_stats  # the raylet's own store counters

    return sum(
        getattr(node_stats(n["NodeManagerAddress"], n["NodeManagerPort"]).store_stats, f"cumulative_created_{what}")
        for n in ray.nodes()
        if n["Alive"]
    )


@pytest.mark.parametrize("k,m,r", [(1, 1, 1), (2, 1, 1), (2, 4, 1), (3, 2, 1), (1, 1, 2)])
def test_a_job_moves_no_byte_beyond_the_minimum(ray_engine, k, m, r):
    model, feeds = _mlp()
    key = model.fingerprint()
    options = dict(model_key=key, partitions=k, micro_batches=m, replicas=r)
    ray_engine.gradients(model, feeds, **options)  # placed, deployed, loaded: later jobs move only their data
    plan = ray_engine.plan(model, feeds, partitions=k)
    assert len(plan.partitions) == k

    before = _created()
    result = ray_engine.gradients(model, feeds, **options)
    moved = _created() - before

    feed_bytes = sum(v.nbytes for v in feeds.values())
    # each boundary activation once, and an error back from each stage that reads it (the plan's
    # sizes are the whole batch's: micro-batches split them, they do not add to them)
    boundary_bytes = sum(b.nbytes * (1 + len(b.consumers)) for b in plan.boundaries.values())
    grad_bytes = sum(p.nbytes for p in model.params.values()) * r  # to the driver, plus r-1 into the sum
    minimum = feed_bytes + boundary_bytes + grad_bytes
    assert minimum <= moved <= minimum + SLACK, (
        f"K={k} M={m} R={r}: {moved} bytes created in the object store, the minimum is {minimum} "
        f"(feeds {feed_bytes}, boundaries {boundary_bytes}, dL/dw {grad_bytes})"
    )
    assert result.info["partitions"] == k and result.info["micro_batches"] == m and result.info["replicas"] == r


@pytest.mark.parametrize("k", [1, 2])
def test_large_feeds_read_on_one_node_travel_as_one_object(ray_engine, k):
    """x and y (512 KiB each) are read on one node (K=1: by the one stage; K=2 here: x by the first,
    y by the second, both on this one-node Ray): one put. An input the loss does not read is not
    put at all. The other objects: the result holding dL/dw of w (256 KiB); K=2's boundary value
    and its error (the second stage holds no parameter: its small result travels inline)."""
    rng = np.random.default_rng(1)
    m = gradserve.ModelBuilder()
    x, y, side = (m.input(name, (None, WIDTH)) for name in ("x", "y", "side"))
    w = m.param("w", (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32))
    _dead_branch = m.tanh(side @ w)
    model = m.loss(m.mse(m.tanh(x @ w), y))
    feeds = {name: rng.standard_normal((BATCH, WIDTH)).astype(np.float32) for name in ("x", "y", "side")}
    options = dict(model_key=model.fingerprint(), partitions=k, micro_batches=1, replicas=1)
    ray_engine.gradients(model, feeds, **options)  # placed, deployed, loaded
    objects, moved = _created("objects"), _created()
    result = ray_engine.gradients(model, feeds, **options)
    assert result.info["partitions"] == k
    boundary = 2 * BATCH * WIDTH * 4 * (k - 1)  # K=2: the activation at the cut and its error
    assert _created("objects") - objects == {1: 2, 2: 4}[k]  # a put per feed, side too: 4 and 6
    assert _created() - moved <= feeds["x"].nbytes + feeds["y"].nbytes + boundary + model.params["w"].nbytes + SLACK
    reference = gradserve.local().gradients(model, feeds)
    np.testing.assert_allclose(result.grads["w"], reference.grads["w"], rtol=1e-5, atol=1e-7)
    assert np.isclose(result.loss, reference.loss, rtol=1e-6)
