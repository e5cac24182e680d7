"""A tiny job's calls nest (server/ray_engine/nested.py): the driver calls the first stage, which
calls the next and waits for it. The same loss, dL/dw and dL/dx as the inline engine (and as
PyTorch autograd); the jobs the
lane is not for keep the driver's calls; a lost worker, whether the caller or the called, is a retry.
"""

from __future__ import annotations

import numpy as np
import pytest

import gradserve
from gradserve.server.planning.partition import plan_model
from gradcheck import assert_same_result

pytestmark = pytest.mark.slow  # needs Ray worker processes

INLINE = gradserve.local()


def tiny_mlp(seed: int, width: int = 6, dtype=np.float64):
    """A tanh MLP small enough for the lane (well under 100 KiB moved), a float64 oracle."""
    rng = np.random.default_rng(seed)
    m = gradserve.ModelBuilder()
    x = m.input("x", (None, width), dtype)
    y = m.input("y", (None, 2), dtype)
    h = x
    sizes = [width, 12, 12, 8, 2]
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        h = h @ m.param(f"w{i}", (rng.standard_normal((a, b)) / np.sqrt(a)).astype(dtype))
        h = h + m.param(f"b{i}", np.zeros(b, dtype))
        h = m.tanh(h) if i < len(sizes) - 2 else h
    model = m.loss(m.mse(h, y))
    feeds = {"x": rng.standard_normal((8, width)).astype(dtype), "y": rng.standard_normal((8, 2)).astype(dtype)}
    return model, feeds


def torch_mlp_gradients(params: dict, feeds: dict):
    """Loss, dL/dw and dL/dx of :func:`tiny_mlp` by PyTorch autograd (float64)."""
    import torch

    w = {n: torch.tensor(v, requires_grad=True) for n, v in params.items()}
    x = torch.tensor(feeds["x"], requires_grad=True)
    layers = len(w) // 2
    h = x
    for i in range(layers):
        h = h @ w[f"w{i}"] + w[f"b{i}"]
        h = torch.tanh(h) if i < layers - 1 else h
    loss = torch.nn.functional.mse_loss(h, torch.tensor(feeds["y"]))
    loss.backward()
    return loss.item(), {n: t.grad.numpy() for n, t in w.items()}, x.grad.numpy()


@pytest.mark.parametrize("k", [2, 3])
def test_a_tiny_chain_nests_and_matches_the_inline_engine_and_torch(ray_engine, k):
    model, feeds = tiny_mlp(seed=k)
    options = dict(partitions=k, micro_batches=1, replicas=1, input_grads=["x"])
    result = ray_engine.gradients(model, feeds, **options)
    assert result.info["nested"] and result.info["partitions"] == k
    assert_same_result(result, INLINE.gradients(model, feeds, input_grads=["x"]))
    # and against PyTorch autograd on the same MLP
    loss, grads, dx = torch_mlp_gradients(model.params, feeds)
    assert result.loss == pytest.approx(loss, rel=1e-12)
    for name, g in grads.items():
        np.testing.assert_allclose(result.grads[name], g, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(result.input_grads["x"], dx, rtol=1e-10, atol=1e-14)
    events = []
    again = ray_engine.gradients(model, feeds, progress=events.append, **options)
    assert_same_result(again, result)
    # Every step is reported, once the one call is back: forward down the chain, backward up it.
    assert [(e.phase, e.partition) for e in events] == [("forward", p) for p in range(k)] + [
        ("backward", p) for p in reversed(range(k))
    ]


def test_two_values_crossing_between_the_stages_each_get_their_error(ray_engine):
    rng = np.random.default_rng(8)
    m = gradserve.ModelBuilder()
    x = m.input("x", (None, 4), np.float64)
    a = m.sigmoid(x @ m.param("w", rng.standard_normal((4, 3))))
    z = m.tanh(x @ m.param("v", rng.standard_normal((4, 3))))
    crossing = m.op("MatMul", z, m.param("u", rng.standard_normal((3, 3))), name="second_stage")
    model = m.loss((m.tanh(a) * crossing).sum())
    feeds = {"x": rng.standard_normal((5, 4))}
    assert len(plan_model(model, feeds, 2, split_at=["second_stage"]).boundaries) == 2
    options = dict(partitions=2, micro_batches=1, replicas=1, split_at=["second_stage"], input_grads=["x"])
    result = ray_engine.gradients(model, feeds, **options)
    assert result.info["nested"]
    assert_same_result(result, INLINE.gradients(model, feeds, input_grads=["x"]))


@pytest.mark.parametrize(
    "options, width",
    [
        (dict(partitions=2, micro_batches=2, replicas=1), 6),  # micro-batches pipeline through the stages
        (dict(partitions=2, micro_batches=1, replicas=2), 6),  # replicas
        (dict(partitions=2, micro_batches=1, replicas=1), 4096),  # 4096 x 12 x 8 B of dL/dw: too much to relay
        (dict(partitions=1, micro_batches=1, replicas=1), 6),  # nothing to nest
    ],
)
def test_jobs_the_lane_is_not_for_keep_the_drivers_calls(ray_engine, options, width):
    model, feeds = tiny_mlp(seed=5, width=width)
    result = ray_engine.gradients(model, feeds, **options)
    assert not result.info["nested"]
    assert_same_result(result, INLINE.gradients(model, feeds))


@pytest.mark.parametrize("victim", [0, 1])
def test_a_lost_caller_or_callee_is_a_retry(ray_engine, victim):
    """The first stage's actor (the driver's call fails) or the second's (the first stage's call
    to it fails inside the first stage's call): the job runs again on live workers."""
    import ray

    model, feeds = tiny_mlp(seed=11 + victim)
    options = dict(partitions=2, micro_batches=1, replicas=1)
    warm = ray_engine.gradients(model, feeds, **options)  # the next job runs on the same actors
    assert warm.info["nested"]
    pid = warm.info["placement"][0][victim]["pid"]
    dead = next(a for a, w in zip(ray_engine._pool.actors, ray_engine._pool.where) if w["pid"] == pid)
    ray.kill(dead, no_restart=True)
    result = ray_engine.gradients(model, feeds, **options)
    assert result.info["retries"] == 1
    assert_same_result(result, INLINE.gradients(model, feeds))
    assert all(a is not dead for a in ray_engine._pool.actors), "the dead actor left the pool"
    assert sum(ray.get([a.job_count.remote() for a in ray_engine._pool.actors])) == 0


def test_an_error_in_a_called_stage_names_its_node_and_leaves_no_state(ray_engine):
    """A bad index read by the last stage: its GraphError crosses two calls to reach the caller."""
    import ray

    m = gradserve.ModelBuilder()
    idx = m.input("idx", (None,), np.int64)
    x = m.input("x", (None, 4), np.float64)
    h = m.tanh(x @ m.param("w", np.ones((4, 2))))
    h = m.tanh(h @ m.param("v", np.ones((2, 2))))
    emb = m.op("Gather", m.param("table", np.ones((3, 2))), idx, name="embed")
    model = m.loss((h * emb).sum())
    options = dict(partitions=2, micro_batches=1, replicas=1, split_at=["embed"])
    good = {"idx": np.array([0, 2]), "x": np.ones((2, 4))}
    assert ray_engine.gradients(model, good, **options).info["nested"]
    with pytest.raises(gradserve.GraphError, match="node 'embed' \\(Gather\\)"):
        ray_engine.gradients(model, {"idx": np.array([0, 7]), "x": np.ones((2, 4))}, **options)
    assert sum(ray.get([a.job_count.remote() for a in ray_engine._pool.actors])) == 0
    assert_same_result(ray_engine.gradients(model, good, **options), INLINE.gradients(model, good))


def test_concurrent_nested_and_driver_jobs_all_finish(ray_engine):
    """Jobs of several models at once on the shared pool, nested and not: a nested call holds its
    actor while it waits, so only the pool's order keeps two of them from waiting on each other."""
    import threading

    cases = [
        (tiny_mlp(seed=20 + i), dict(partitions=2 + i % 2, micro_batches=1 + (i == 4), replicas=1)) for i in range(6)
    ]
    results: dict[int, list] = {i: [] for i in range(len(cases))}

    def run(i: int) -> None:
        (model, feeds), options = cases[i]
        for _ in range(5):
            results[i].append(ray_engine.gradients(model, feeds, **options))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "jobs stuck"
    for i, ((model, feeds), _) in enumerate(cases):
        reference = INLINE.gradients(model, feeds)
        assert len(results[i]) == 5
        for result in results[i]:
            assert_same_result(result, reference)
    assert any(r.info["nested"] for runs in results.values() for r in runs)


@pytest.mark.parametrize("k", [2, 3])
def test_a_tiny_sessions_steps_nest_and_train_as_the_inline_one(ray_engine, k):
    """Each stage updates its weights at the end of its own call (no global norm to wait for)."""
    from gradserve.worker.optim import Adam

    model, feeds = tiny_mlp(seed=30 + k)
    rng = np.random.default_rng(k)
    batches = [{name: rng.standard_normal(v.shape) for name, v in feeds.items()} for _ in range(4)]
    options = dict(schedule=[(1, 0.02), (3, 0.01)])
    reference = gradserve.local().session(model, Adam(lr=0.02, weight_decay=0.1), **options)
    with ray_engine.session(
        model, Adam(lr=0.02, weight_decay=0.1), partitions=k, micro_batches=1, replicas=1, **options
    ) as session:
        for i, batch in enumerate(batches):
            want = reference.step(batch, return_grads=i == 2)
            got = session.step(batch, return_grads=i == 2)
            assert got.info["nested"] and got.loss == pytest.approx(want.loss, rel=1e-12)
            if i == 2:
                for name, g in want.grads.items():
                    np.testing.assert_allclose(got.grads[name], g, rtol=1e-10, atol=1e-14)
        weights = session.weights()
    for name, value in reference.weights().items():
        np.testing.assert_allclose(weights[name], value, rtol=1e-10, atol=1e-14)
