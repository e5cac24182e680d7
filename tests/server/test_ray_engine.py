"""The Ray engine gives the inline engine's loss and gradients for every partitioning, micro-batching
and replication, and fails cleanly (naming the node, leaving no per-job state) when a worker fails."""

from __future__ import annotations

import os
import signal
import threading

import numpy as np
import pytest
import torch

import gradserve
from gradserve.server.events import JobCancelled
from gradserve.worker.graph import GraphError

import models
from dags import random_dag
from graphs import _refusal_cases
from gradcheck import assert_same_result

pytestmark = pytest.mark.slow  # needs Ray worker processes

INLINE = gradserve.local()


def builder_mlp(seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    m = gradserve.ModelBuilder()
    x = m.input("x", (None, 6), dtype)
    y = m.input("y", (None, 2), dtype)
    h = x
    sizes = [6, 12, 12, 8, 2]
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        w = m.param(f"w{i}", (rng.standard_normal((a, b)) / np.sqrt(a)).astype(dtype))
        bias = m.param(f"b{i}", np.zeros(b, dtype))
        h = h @ w + bias
        h = m.tanh(h) if i < len(sizes) - 2 else h
    model = m.loss(m.mse(h, y))
    return model, {"x": rng.standard_normal((8, 6)).astype(dtype), "y": rng.standard_normal((8, 2)).astype(dtype)}


def onnx_cnn(tmp_path_factory):
    net = models.make_cnn(seed=1).double().eval()  # eval: BatchNorm uses running statistics
    x = torch.randn(8, 3, 12, 12, dtype=torch.float64)
    labels = torch.randint(0, 5, (8,))
    path = models.export(
        models.WithCrossEntropy(net).eval(),
        [x, labels],
        tmp_path_factory.mktemp("cnn") / "cnn.onnx",
        ["x", "labels"],
        ["loss"],
        dynamic_batch=True,
    )
    return gradserve.load_onnx(str(path)), {"x": x.numpy(), "labels": labels.numpy()}


def onnx_transformer(tmp_path_factory):
    net = models.make_transformer(seed=2).double().train()
    tokens = torch.randint(0, 20, (8, 6))
    target = torch.randn(8, 3, dtype=torch.float64)
    path = models.export(
        models.WithMSE(net),
        [tokens, target],
        tmp_path_factory.mktemp("tr") / "transformer.onnx",
        ["tokens", "target"],
        ["loss"],
        dynamic_batch=True,
    )
    return gradserve.load_onnx(str(path)), {"tokens": tokens.numpy(), "target": target.numpy()}


@pytest.fixture(scope="module", params=["mlp", "dag0", "dag1", "cnn", "transformer"])
def case(request, tmp_path_factory):
    name = request.param
    if name == "mlp":
        model, feeds = builder_mlp()
    elif name.startswith("dag"):
        model, feeds = random_dag(int(name[3:]), depth=12)
    elif name == "cnn":
        model, feeds = onnx_cnn(tmp_path_factory)
    else:
        model, feeds = onnx_transformer(tmp_path_factory)
    return name, model, feeds, INLINE.gradients(model, feeds)


@pytest.mark.parametrize("replicas", [1, 2])
@pytest.mark.parametrize("micro_batches", [1, 2, 4])
@pytest.mark.parametrize("partitions", [1, 2, 3, 4])
def test_equals_inline(ray_engine, case, partitions, micro_batches, replicas):
    name, model, feeds, reference = case
    result = ray_engine.gradients(model, feeds, partitions=partitions, micro_batches=micro_batches, replicas=replicas)
    assert_same_result(result, reference)
    assert result.info["partitions"] == min(partitions, len(model.nodes))


def test_input_gradients_and_fan_out_across_cuts(ray_engine):
    model, feeds = random_dag(3, depth=12)
    reference = INLINE.gradients(model, feeds, input_grads=["x"])
    result = ray_engine.gradients(model, feeds, partitions=4, micro_batches=2, input_grads=["x"])
    assert_same_result(result, reference)
    np.testing.assert_allclose(result.input_grads["x"], reference.input_grads["x"], rtol=1e-10, atol=1e-14)
    plan = ray_engine.plan(model, feeds, partitions=4)
    assert any(len(b.consumers) > 1 or b.consumers[0] > b.producer + 1 for b in plan.boundaries.values()), (
        "the DAG should have a value read by several partitions or a skip over a partition"
    )


def test_parameters_are_placed_once_per_content(ray_engine):
    model, feeds = builder_mlp(seed=5)
    ray_engine.gradients(model, feeds, partitions=2)
    (key,) = ray_engine._latest[model.structure_fingerprint()]
    placed = ray_engine._params[key]
    new_feeds = {k: v * 2 for k, v in feeds.items()}
    ray_engine.gradients(model, new_feeds, partitions=2)
    assert ray_engine._params[key] is placed, "a job with new feeds only reuses the placed weights"
    # A training step that updates the weights in place must not be served stale weights.
    for value in model.params.values():
        value -= 0.1
    assert_same_result(ray_engine.gradients(model, feeds, partitions=2), INLINE.gradients(model, feeds))
    assert key not in ray_engine._latest[model.structure_fingerprint()] and key not in ray_engine._params
    # A caller that vouches for the content (the server's model id) skips the comparison.
    ray_engine.gradients(model, feeds, partitions=2, model_key="content-hash-1")
    assert "content-hash-1" in ray_engine._params


def test_progress_events_cover_every_step(ray_engine):
    model, feeds = builder_mlp(seed=6)
    events = []
    ray_engine.gradients(model, feeds, partitions=3, micro_batches=2, progress=events.append)
    steps = {(e.phase, e.partition, e.micro_batch) for e in events}
    assert steps == {(ph, p, mb) for ph in ("forward", "backward") for p in range(3) for mb in range(2)}
    assert {e.total for e in events} == {12}
    # A graph with fewer nodes than partitions asked for: refused before any step (it used to run
    # fewer partitions without a word); the most it can give runs, and the total counts those.
    m = gradserve.ModelBuilder()
    x = m.input("x", (None, 2), np.float64)
    model = m.loss((x @ m.param("w", np.ones((2, 1)))).sum())
    small = []
    with pytest.raises(GraphError, match="at most 2 partitions"):
        ray_engine.gradients(model, {"x": np.ones((4, 2))}, partitions=4, progress=small.append)
    assert small == []
    result = ray_engine.gradients(model, {"x": np.ones((4, 2))}, partitions=2, progress=small.append)
    assert result.info["partitions"] == 2 and {e.total for e in small} == {4}


def test_worker_error_names_the_node_and_leaves_no_state(ray_engine):
    m = gradserve.ModelBuilder()
    idx = m.input("idx", (None,), np.int64)
    x = m.input("x", (None, 4), np.float64)
    w = m.param("w", np.ones((4, 2)))
    table = m.param("table", np.ones((3, 2)))
    h = m.tanh(x @ w)
    emb = m.op("Gather", table, idx, name="embed")
    model = m.loss((h * emb).sum())
    feeds = {"idx": np.array([0, 7]), "x": np.ones((2, 4))}
    with pytest.raises(GraphError, match="node 'embed' \\(Gather\\)"):
        ray_engine.gradients(model, feeds, partitions=3)
    import ray

    assert sum(ray.get([a.job_count.remote() for a in ray_engine._pool.actors])) == 0
    # and the engine still works
    good = {"idx": np.array([0, 2]), "x": np.ones((2, 4))}
    assert_same_result(ray_engine.gradients(model, good, partitions=3), INLINE.gradients(model, good))


def test_cancelled_job_raises_and_frees_state(ray_engine):
    model, feeds = builder_mlp(seed=7)
    cancelled = threading.Event()
    cancelled.set()
    with pytest.raises(JobCancelled):
        ray_engine.gradients(model, feeds, partitions=2, cancelled=cancelled)
    import ray

    assert sum(ray.get([a.job_count.remote() for a in ray_engine._pool.actors])) == 0


@pytest.mark.parametrize("case", list(_refusal_cases()))
def test_micro_batching_refuses_what_it_cannot_split_exactly(ray_engine, case):
    model, match = _refusal_cases()[case]
    feeds = {"x": np.arange(12.0).reshape(4, 3)}
    with pytest.raises(GraphError, match=match):
        ray_engine.gradients(model, feeds, micro_batches=2)
    assert ray_engine.gradients(model, feeds).loss == pytest.approx(INLINE.gradients(model, feeds).loss)


def test_ignored_targets_never_leave_a_micro_batch_empty(ray_engine):
    m = gradserve.ModelBuilder()
    x = m.input("x", (None, 4), np.float64)
    labels = m.input("labels", (None,), np.int64)
    logits = x @ m.param("w", np.random.default_rng(0).standard_normal((4, 3)))
    model = m.loss(m.op("SoftmaxCrossEntropyLoss", logits, labels, reduction="mean", ignore_index=-1))
    feeds = {"x": np.random.default_rng(1).standard_normal((8, 4)), "labels": np.array([-1, -1, -1, -1, -1, 2, 0, 1])}
    # An even split would give the first micro-batches only ignored targets (a 0/0 mean).
    assert_same_result(ray_engine.gradients(model, feeds, micro_batches=3), INLINE.gradients(model, feeds))
    with pytest.raises(GraphError, match="only 3 samples have targets"):
        ray_engine.gradients(model, feeds, micro_batches=2, replicas=2)


def test_concurrent_jobs_on_shared_workers(ray_engine):
    cases = [builder_mlp(seed=s) for s in range(3)] + [random_dag(9, depth=8)]
    results: dict[int, object] = {}

    def run(i, model, feeds):
        results[i] = ray_engine.gradients(model, feeds, partitions=2 + i % 3, micro_batches=2)

    threads = [threading.Thread(target=run, args=(i, *c)) for i, c in enumerate(cases)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for i, (model, feeds) in enumerate(cases):
        assert_same_result(results[i], INLINE.gradients(model, feeds))


def test_a_job_survives_a_worker_dying(ray_engine):
    import ray

    model, feeds = builder_mlp(seed=11)
    reference = INLINE.gradients(model, feeds)
    warm = ray_engine.gradients(model, feeds, partitions=2)
    pid = warm.info["placement"][0][1]["pid"]  # the next job runs on the same actors: they hold its stages
    victim = next(a for a, w in zip(ray_engine._pool.actors, ray_engine._pool.where) if w["pid"] == pid)
    ray.kill(victim, no_restart=True)
    result = ray_engine.gradients(model, feeds, partitions=2)  # loses the worker, runs again
    assert_same_result(result, reference)
    assert result.info["retries"] == 1
    assert all(a is not victim for a in ray_engine._pool.actors), "the dead actor left the pool"
    assert sum(ray.get([a.job_count.remote() for a in ray_engine._pool.actors])) == 0


def test_a_worker_dying_mid_job(ray_engine):
    import ray

    rng = np.random.default_rng(12)
    m = gradserve.ModelBuilder()
    h = m.input("x", (None, 384), np.float64)
    for i in range(6):  # about a second of work: long enough to kill a worker mid-way
        h = m.tanh(h @ m.param(f"w{i}", rng.standard_normal((384, 384)) / 20))
    model = m.loss((h * h).mean())
    feeds = {"x": rng.standard_normal((4096, 384))}
    reference = INLINE.gradients(model, feeds)
    warm = ray_engine.gradients(model, feeds, partitions=3, micro_batches=4)
    # The next job runs on the same actors (they hold its stages): the last partition's is killed.
    victim = warm.info["placement"][0][2]["pid"]
    events = []

    def kill_once(event):
        events.append(event)
        if len(events) == 2:  # the first forward steps are done, the rest is in flight
            os.kill(victim, signal.SIGKILL)

    result = ray_engine.gradients(model, feeds, partitions=3, micro_batches=4, progress=kill_once)
    assert_same_result(result, reference)
    assert result.info["retries"] == 1
    assert sum(ray.get([a.job_count.remote() for a in ray_engine._pool.actors])) == 0
