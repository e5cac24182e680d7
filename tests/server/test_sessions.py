"""Training sessions: weights and optimizer state stay with the engine, and training through a
session equals training with torch.optim on the same model (inline), and the inline session
(Ray: every partitioning, micro-batching and replication, replicas bit-identical)."""

from __future__ import annotations

import contextlib
import dataclasses

import grpc
import numpy as np
import pytest
import ray
import torch

import gradserve
from gradserve.client.remote import Client, InvalidArgument, NotFound, ResourceExhausted
from gradserve.client.status import format_status, server_status
from gradserve.proto import chunks
from gradserve.proto.v1 import service_pb2
from gradserve.server.inline import InlineEngine
from gradserve.server.limits import Limits
from gradserve.server.planning import memory
from gradserve.server.service import GradientServer
from gradserve.server.session import SessionClosed
from gradserve.worker.graph import GraphError
from gradserve.worker.optim import SGD, Adam, AdamW

from ambush import Ambush, forward_of
from borrowed import Borrowed
from gradcheck import assert_close

SIZES = [6, 12, 8, 2]
STEPS = 6


def mlp():
    """A tanh MLP in float64 with an MSE loss, and STEPS batches for it."""
    rng = np.random.default_rng(0)
    m = gradserve.ModelBuilder()
    x, y = m.input("x", (None, SIZES[0]), np.float64), m.input("y", (None, SIZES[-1]), np.float64)
    h = x
    for i, (a, b) in enumerate(zip(SIZES, SIZES[1:])):
        h = h @ m.param(f"w{i}", rng.standard_normal((a, b)) / np.sqrt(a)) + m.param(
            f"b{i}", rng.standard_normal(b) * 0.1
        )
        h = m.tanh(h) if i < len(SIZES) - 2 else h
    model = m.loss(m.mse(h, y))
    batches = [
        {"x": rng.standard_normal((8, SIZES[0])), "y": rng.standard_normal((8, SIZES[-1]))} for _ in range(STEPS)
    ]
    return model, batches


def torch_training(model, batches, make_optimizer, max_norm=None, lrs=None):
    """The same MLP trained by torch: losses per step and the final weights."""
    params = {n: torch.tensor(v, requires_grad=True) for n, v in model.params.items()}
    opt = make_optimizer(list(params.values()))
    losses = []
    for step, batch in enumerate(batches, start=1):
        if lrs is not None:
            for group in opt.param_groups:
                group["lr"] = lrs(step)
        h = torch.tensor(batch["x"])
        for i in range(len(SIZES) - 1):
            h = h @ params[f"w{i}"] + params[f"b{i}"]
            h = torch.tanh(h) if i < len(SIZES) - 2 else h
        loss = torch.nn.functional.mse_loss(h, torch.tensor(batch["y"]))
        opt.zero_grad()
        loss.backward()
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(list(params.values()), max_norm)
        opt.step()
        losses.append(loss.item())
    return losses, {n: p.detach().numpy() for n, p in params.items()}


@pytest.mark.parametrize(
    "ours,theirs,max_norm",
    [
        (
            SGD(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
            lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
            None,
        ),
        (Adam(lr=0.01, amsgrad=True), lambda p: torch.optim.Adam(p, lr=0.01, amsgrad=True), 0.5),
        (AdamW(lr=0.02), lambda p: torch.optim.AdamW(p, lr=0.02), 0.3),
    ],
)
def test_an_inline_session_trains_as_torch_optim_does(ours, theirs, max_norm):
    model, batches = mlp()
    want_losses, want_weights = torch_training(model, batches, theirs, max_norm)
    with gradserve.local().session(model, ours, max_norm=max_norm) as session:
        losses = [session.step(b).loss for b in batches]
        assert session.steps == STEPS
        assert_close(session.weights(), want_weights)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-12)


def test_a_schedule_and_param_groups_follow_torch():
    model, batches = mlp()
    schedule = [(1, 0.05), (3, 0.02), (5, 0.01)]

    def lr(step):
        return [lr for s, lr in schedule if s <= step][-1]

    def theirs(params):  # w0 in a group of its own, with no weight decay and twice the lr
        w0, rest = params[0], params[1:]
        return torch.optim.AdamW([{"params": [w0], "weight_decay": 0.0, "lr": 0.1}, {"params": rest}], lr=0.05)

    # torch's scheduler scales every group alike: w0's lr stays twice the base one
    _, want = torch_training(model, batches, theirs)
    ours = gradserve.local().session(model, AdamW(lr=0.05), param_groups={"w0": {"weight_decay": 0.0, "lr": 0.1}})
    for b in batches:
        ours.step(b)
    assert_close(ours.weights(), want)

    scheduled = gradserve.local().session(model, Adam(lr=0.05), schedule=schedule)
    _, want = torch_training(model, batches, lambda p: torch.optim.Adam(p, lr=0.05), lrs=lr)
    results = [scheduled.step(b) for b in batches]
    assert [r.info["lr"] for r in results] == [lr(s) for s in range(1, STEPS + 1)]
    assert_close(scheduled.weights(), want)


def test_gradients_set_weights_and_close():
    model, batches = mlp()
    session = gradserve.local().session(model, SGD(lr=0.1))
    session.step(batches[0])
    current = session.weights()
    moved = gradserve.Model(model.nodes, model.inputs, current, model.loss, model.constants, model.opset)
    expected = gradserve.local().gradients(moved, batches[1])
    got = session.gradients(batches[1])
    assert got.loss == pytest.approx(expected.loss, rel=1e-12)
    assert_close(got.grads, expected.grads, rtol=1e-12)
    assert_close(session.weights(), current)  # gradients() does not update

    session.set_weights({"w1": np.zeros_like(current["w1"])})
    assert np.all(session.weights(["w1"])["w1"] == 0)
    with pytest.raises(GraphError, match="'nope' is not a parameter"):
        session.set_weights({"nope": np.zeros(3)})
    with pytest.raises(GraphError, match="parameter 'w1' has shape"):
        session.set_weights({"w1": np.zeros(3)})
    result = session.step(batches[1], return_grads=True)
    assert result.step == 2 and set(result.grads) == set(model.params)
    session.close()
    with pytest.raises(SessionClosed):
        session.step(batches[2])


def test_param_groups_must_name_parameters():
    model, _ = mlp()
    with pytest.raises(GraphError, match="'w9', which is not a parameter"):
        gradserve.local().session(model, SGD(lr=0.1), param_groups={"w9": {"lr": 1.0}})


# -- on Ray workers ----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("k,m,r", [(1, 1, 1), (2, 1, 1), (3, 2, 1), (1, 1, 2), (2, 2, 2)])
def test_a_ray_session_trains_as_the_inline_one(ray_engine, k, m, r):
    model, batches = mlp()
    options = dict(max_norm=0.5, schedule=[(1, 0.02), (4, 0.01)])
    reference = gradserve.local().session(model, Adam(lr=0.02, weight_decay=0.1), **options)
    want = [reference.step(b).loss for b in batches]
    with ray_engine.session(
        model, Adam(lr=0.02, weight_decay=0.1), partitions=k, micro_batches=m, replicas=r, **options
    ) as session:
        got = [session.step(b).loss for b in batches]
        assert (session.placement["partitions"], session.placement["micro_batches"], session.placement["replicas"]) == (
            k,
            m,
            r,
        )
        np.testing.assert_allclose(got, want, rtol=1e-12)
        assert_close(session.weights(), reference.weights(), rtol=1e-10)
        replicas = session.replica_weights()
        assert len(replicas) == r
        for other in replicas[1:]:  # every replica applied the same update to the same weights
            for name, value in replicas[0].items():
                assert np.array_equal(other[name], value), name


@pytest.mark.slow
def test_a_ray_session_keeps_its_weights_between_steps_and_frees_them(ray_engine):
    model, batches = mlp()
    session = ray_engine.session(model, SGD(lr=0.1, momentum=0.9), partitions=2, replicas=1, micro_batches=1)
    reference = gradserve.local().session(model, SGD(lr=0.1, momentum=0.9))
    for b in batches[:2]:
        session.step(b), reference.step(b)
    # a client-side change of some weights travels alone; the momentum stays on the workers
    session.set_weights({"b0": np.ones(SIZES[1])})
    reference.set_weights({"b0": np.ones(SIZES[1])})
    step = session.step(batches[2], return_grads=True)
    expected = reference.step(batches[2], return_grads=True)
    assert_close(step.grads, expected.grads, rtol=1e-10)
    assert_close(session.weights(), reference.weights(), rtol=1e-10)
    got = session.gradients(batches[3])
    assert_close(got.grads, reference.gradients(batches[3]).grads, rtol=1e-10)

    hosts = [(actor, session._dep.keys[p]) for row in session._dep.actors for p, actor in enumerate(row)]
    assert all(ray.get(actor.weights.remote(key)) for actor, key in hosts)
    session.close()
    for actor, key in hosts:  # the stages and their optimizer state are gone from the workers
        with pytest.raises(ray.exceptions.RayTaskError, match="KeyError"):
            ray.get(actor.weights.remote(key))
    assert session._key not in ray_engine._params


# -- through the gRPC service ------------------------------------------------------------------------


@contextlib.contextmanager
def serving(engine_factory=InlineEngine, **limits):
    server = GradientServer(engine_factory, "127.0.0.1:0", limits=Limits(**limits))
    server.start()
    try:
        with Client(server.address, timeout=120) as client:
            yield server, client
    finally:
        server.stop(grace=1.0)


def test_a_session_through_the_server_trains_as_the_local_one():
    model, batches = mlp()
    options = dict(max_norm=0.5, schedule=lambda step: 0.02 / step)
    reference = gradserve.local().session(model, Adam(lr=0.02), param_groups={"b0": {"lr": 0.04}}, **options)
    with serving() as (server, client):
        with client.session(model, Adam(lr=0.02), param_groups={"b0": {"lr": 0.04}}, **options) as session:
            for b in batches[:3]:
                got, want = session.step(b), reference.step(b)
                assert got.loss == pytest.approx(want.loss, rel=1e-12) and got.grads is None
            got, want = session.step(batches[3], return_grads=True), reference.step(batches[3], return_grads=True)
            assert got.step == 4 and got.info["lr"] == pytest.approx(0.005)
            assert_close(got.grads, want.grads, rtol=1e-12)
            assert_close(session.weights(), reference.weights(), rtol=1e-12)
            assert_close(session.weights(["w1"]), reference.weights(["w1"]), rtol=1e-12)
            assert_close(session.gradients(batches[4]).grads, reference.gradients(batches[4]).grads, rtol=1e-12)
            session.set_weights({"w0": np.full((SIZES[0], SIZES[1]), 0.1)})
            reference.set_weights({"w0": np.full((SIZES[0], SIZES[1]), 0.1)})
            assert session.step(batches[5]).loss == pytest.approx(reference.step(batches[5]).loss, rel=1e-12)
            assert_close(session.weights(), reference.weights(), rtol=1e-12)
            with pytest.raises(InvalidArgument, match="parameter 'w0' has shape"):
                session.set_weights({"w0": np.zeros(3)})
            with pytest.raises(InvalidArgument, match="'x'"):
                session.step({"y": batches[0]["y"]})  # a feed missing: refused before any work
            assert session.weights().keys() == model.params.keys()  # and the session goes on
            session_id = session.id
        assert server.servicer.sessions.open_count() == 0  # closed by the with block
        stub = client.calls.stub
        with pytest.raises(grpc.RpcError) as err:
            stub.GetWeights(service_pb2.WeightsRequest(session_id=session_id)).next()
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and session_id in err.value.details()


def _step_request(session_id: str, number: int, feeds: dict) -> list:
    options = service_pb2.StepOptions(session_id=session_id, step=number, update=True, feeds=chunks.headers(feeds))
    return [service_pb2.StepChunk(options=options), *(service_pb2.StepChunk(feed=c) for c in chunks.chunks(feeds))]


def test_a_step_sent_twice_is_applied_once():
    model, batches = mlp()
    with serving() as (server, client):
        session = client.session(model, SGD(lr=0.1))
        first = list(client.calls.stub.Step(iter(_step_request(session.id, 1, batches[0]))))
        again = list(client.calls.stub.Step(iter(_step_request(session.id, 1, batches[0]))))  # its reply was lost
        assert first[0].header.loss == again[0].header.loss
        assert server.servicer.sessions.get(session.id).session.steps == 1
        with pytest.raises(grpc.RpcError) as err:
            list(client.calls.stub.Step(iter(_step_request(session.id, 3, batches[1]))))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "the next one is 2" in err.value.details()
        expected = gradserve.local().session(model, SGD(lr=0.1))
        expected.step(batches[0])
        assert_close(session.weights(), expected.weights(), rtol=1e-12)


def test_sessions_are_limited_per_client_and_closed_when_idle():
    model, batches = mlp()
    with serving(max_sessions_per_client=1, session_idle_ttl=60.0) as (server, client):
        session = client.session(model, SGD(lr=0.1))
        session.step(batches[0])
        with pytest.raises(ResourceExhausted, match="sessions open"):
            client.session(model, SGD(lr=0.1))
        status = server_status(client)
        assert [(t.session_id, t.steps) for t in status.sessions] == [(session.id, 1)] and status.session_steps == 1
        assert "training sessions: 1 open, 1 steps since start" in format_status(status)
        server.servicer.sessions.get(session.id).last_used -= 61.0  # as if a minute had passed idle
        server.servicer.sessions.sweep()
        with pytest.raises(NotFound, match=session.id):
            session.step(batches[0])
        client.session(model, SGD(lr=0.1)).close()  # the closed one no longer counts


def test_bad_session_requests_are_refused_naming_the_fault():
    model, _ = mlp()
    with serving() as (server, client):
        model_id = client.upload(model)
        bad = service_pb2.SessionOptions(model_id=model_id, optimizer_json='{"optimizer": {"type": "LBFGS"}}')
        with pytest.raises(grpc.RpcError) as err:
            client.calls.stub.OpenSession(bad)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "LBFGS" in err.value.details()
        with pytest.raises(NotFound, match="not on this server"):
            client.session("0" * 64, SGD(lr=0.1))
        with pytest.raises(GraphError, match="'w9'"):
            client.session(model_id, SGD(lr=0.1), param_groups={"w9": {"lr": 1.0}})


@pytest.mark.slow
def test_a_ray_session_through_the_server(ray_engine):
    model, batches = mlp()
    reference = gradserve.local().session(model, AdamW(lr=0.01))
    with serving(lambda: Borrowed(ray_engine)) as (server, client):
        with client.session(model, AdamW(lr=0.01), partitions=2, replicas=2, micro_batches=1) as session:
            for b in batches:
                got = session.step(b)
                assert got.loss == pytest.approx(reference.step(b).loss, rel=1e-12)
            assert got.info["partitions"] == 2 and got.info["replicas"] == 2
            assert_close(session.weights(), reference.weights(), rtol=1e-10)


# -- nothing is lost ---------------------------------------------------------------------------------


def test_a_server_restart_on_the_same_state_directory_brings_sessions_back(tmp_path):
    model, batches = mlp()
    reference = gradserve.local().session(model, Adam(lr=0.02))
    first = GradientServer(
        InlineEngine, "127.0.0.1:0", limits=Limits(session_checkpoint_steps=2), state_dir=str(tmp_path)
    )
    first.start()
    client = Client(first.address, timeout=60)
    try:
        session = client.session(model, Adam(lr=0.02))
        for b in batches[:3]:
            assert session.step(b).loss == pytest.approx(reference.step(b).loss, rel=1e-12)
        # every 2 steps a checkpoint went to the state directory
        (kept,) = list(first.state.sessions())
        assert kept[0] == session.id and kept[1]["step"] == 2
        session.checkpoint()  # and one now, on demand
        (kept,) = list(first.state.sessions())
        assert kept[1]["step"] == 3
        assert_close(kept[2], session.weights(), rtol=0)
    finally:
        first.stop(grace=1.0)  # a graceful stop checkpoints the last step too
    second = GradientServer(InlineEngine, first.address, state_dir=str(tmp_path))
    second.start()
    try:
        step = session.step(batches[3])  # the same client, the server back at the same address
        want = reference.step(batches[3])
        assert (step.step, step.info["restored_from_step"]) == (4, 3)
        assert step.loss == pytest.approx(want.loss, rel=1e-12)
        assert_close(session.weights(), reference.weights(), rtol=1e-12)
        session.close()
        assert list(second.state.sessions()) == []  # a closed session's checkpoint goes with it
    finally:
        client.close()
        second.stop(grace=1.0)


@pytest.mark.slow
def test_a_ray_session_that_loses_a_worker_goes_on_from_its_last_checkpoint(ray_engine):
    model, batches = mlp()
    session = ray_engine.session(model, Adam(lr=0.02), partitions=2, micro_batches=1, replicas=1, checkpoint_steps=2)
    reference = gradserve.local().session(model, Adam(lr=0.02))
    for b in batches[:3]:
        session.step(b)
    for b in batches[:2]:
        reference.step(b)  # the checkpoint: after step 2
    ray.kill(session._dep.actors[0][1])  # the worker of partition 1, with its weights and Adam's moments
    step = session.step(batches[3])
    want = reference.step(batches[3])
    assert (step.step, step.info["restored_from_step"]) == (3, 2)
    assert step.loss == pytest.approx(want.loss, rel=1e-12)
    assert_close(session.weights(), reference.weights(), rtol=1e-10)
    step = session.step(batches[4])  # and it goes on normally
    assert step.step == 4 and "restored_from_step" not in step.info
    assert step.loss == pytest.approx(reference.step(batches[4]).loss, rel=1e-12)
    session.close()


@pytest.mark.slow
def test_a_session_whose_optimizer_state_cannot_fit_is_refused_before_it_starts(ray_engine, monkeypatch):
    model, batches = mlp()
    as_job = ray_engine.plan(model, batches[0], partitions=1).memory[0].total
    weights = sum(p.nbytes for p in model.params.values())
    real = ray_engine._pool.nodes
    # nodes that fit the job, and the session's own copy of the weights, but not Adam's two moments too
    monkeypatch.setattr(
        ray_engine._pool,
        "nodes",
        lambda refresh=False: [dataclasses.replace(n, memory_bytes=as_job + 2 * weights) for n in real(refresh)],
    )
    with ray_engine.session(model, Adam(lr=0.01), partitions=1, micro_batches=1, replicas=1) as session:
        with pytest.raises(memory.ResourceExhausted, match=r"more for its own weights and the optimizer's state"):
            session.step(batches[0])
        assert session._dep is None and session.steps == 0  # nothing was placed


@pytest.mark.slow
def test_a_worker_killed_mid_step_sends_the_session_back_to_its_checkpoint(ray_engine):
    """As the fault tests do: partition 1's actor is held while partition 0 computes, and killed
    once partition 0's forward is done; the step runs again from the last checkpoint. Two
    micro-batches: the step goes through the driver's calls, which the hold holds (with one, this
    small model's step nests its calls, and partition 0's actor calls partition 1's itself; a
    lost worker there is tested in test_nested.py)."""
    model, batches = mlp()
    session = ray_engine.session(
        model, SGD(lr=0.1, momentum=0.9), partitions=2, micro_batches=2, replicas=1, checkpoint_steps=2
    )
    reference = gradserve.local().session(model, SGD(lr=0.1, momentum=0.9))
    for b in batches[:3]:
        session.step(b)
    for b in batches[:2]:
        reference.step(b)  # the checkpoint: after step 2
    pid = session.placement["placement"][0][1]["pid"]
    with Ambush(ray_engine, hold=pid, kill=pid, when=forward_of(0, 0)) as ambush:
        step = session.step(batches[3], progress=ambush)
    assert ambush.killed.is_set(), f"the moment never came: {ambush.events}"
    assert (step.step, step.info["restored_from_step"]) == (3, 2)
    assert step.loss == pytest.approx(reference.step(batches[3]).loss, rel=1e-12)
    assert_close(session.weights(), reference.weights(), rtol=1e-10)
    assert pid not in [w["pid"] for w in session.placement["placement"][0]]  # on fresh workers
    session.close()
