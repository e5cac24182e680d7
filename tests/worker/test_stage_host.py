"""The stage actor's body, driven directly (no Ray): one call runs several steps of a job, a
failure sticks to the job, and steps of an aborted job that arrive late are no-ops."""

from __future__ import annotations

import numpy as np
import pytest

import gradserve
from gradserve.server.planning.partition import plan_model
from gradserve.worker.actor import StageHost
from gradserve.worker.protocol import (
    BY_REF,
    FEED_GROUP,
    Backward,
    Forward,
    Norm,
    Reduce,
    Relay,
    StageCall,
    Update,
    Weights,
)
from gradserve.worker.graph import GraphError
from gradserve.worker.stage import StageSpec


def _host():
    """A one-partition stage of z = x @ w, loss = sum(tanh(z)), loaded on a StageHost."""
    m = gradserve.ModelBuilder()
    x = m.input("x", (None, 3), np.float64)
    w = m.param("w", np.arange(6.0).reshape(3, 2) / 10)
    model = m.loss(m.tanh(x @ w).sum())
    part = plan_model(model, {"x": np.ones((4, 3))}, 1).partitions[0]
    spec = StageSpec(part.nodes, part.feeds, part.inputs, part.outputs, part.params, part.constants, [])
    host = StageHost()
    host.load("s", spec, {}, spec.params, *[model.params[p] for p in spec.params])
    return host, model, spec


def _whole_job(job: str, x: np.ndarray, spec: StageSpec) -> StageCall:
    steps = (Forward(0, 1), Backward(0, 1, False), Weights(0, False))
    return StageCall("s", job, (1, 1), steps, ("x", spec.outputs[0]), (x, np.asarray(1.0)), 2, to_driver=(0, 1))


def test_one_call_runs_forward_backward_and_weights() -> None:
    host, model, spec = _host()
    x = np.random.default_rng(0).standard_normal((4, 3))
    loss, (grads, seconds) = host.run(_whole_job("j", x, spec))
    expected = gradserve.local().gradients(model, {"x": x})
    assert np.isclose(loss, expected.loss) and np.allclose(grads["w"], expected.grads["w"])
    assert set(seconds) == {0}  # compute seconds, per replica
    assert host.stages["s"].job_count() == 0  # the weight step ended the job


def test_values_by_ref_come_from_the_arguments() -> None:
    host, _, spec = _host()
    x = np.ones((4, 3))
    call = _whole_job("j", x, spec)
    by_ref = StageCall(call.key, call.job_id, call.threads, call.steps, call.names, (BY_REF, BY_REF), 2, (0, 1))
    assert np.isclose(host.run(by_ref, x, np.asarray(1.0))[0], host.run(_whole_job("k", x, spec))[0])


def test_a_failure_sticks_to_its_job_and_a_late_step_of_an_aborted_job_is_a_no_op() -> None:
    host, _, spec = _host()
    bad = StageCall("s", "j", (1, 1), (Forward(0, 1),), ("x",), (np.ones((4, 5)),), 1)
    with pytest.raises(GraphError, match="MatMul"):
        host.run(bad)
    # A later step of the same job raises the same failure, so it reaches the driver.
    with pytest.raises(Exception) as again:
        host.run(StageCall("s", "j", (1, 1), (Weights(0, False),), (), (), 1))
    assert again.value is host.failed["j"]
    host.end_job("j")
    assert not host.failed and host.stages["s"].job_count() == 0
    # A step of the ended job that arrives late returns placeholders instead of a KeyError.
    late = StageCall("s", "j", (1, 1), (Backward(0, 1, False),), (spec.outputs[0],), (np.asarray(1.0),), 1)
    assert host.run(late) is None
    # Other jobs are unaffected.
    loss, _ = host.run(_whole_job("k", np.ones((4, 3)), spec))
    assert np.isfinite(loss)


def test_cancelled_steps_return_placeholders() -> None:
    host, _, spec = _host()
    host.cancel("j")
    # The loss is missing and the weight step hands over nothing; the stage kept no state.
    assert host.run(_whole_job("j", np.ones((4, 3)), spec)) == (None, ({}, {}))
    assert host.stages["s"].job_count() == 0


def test_a_kept_weight_step_and_its_reduce_sum_the_replicas() -> None:
    """A replica with children in the reduction tree keeps its dL/dw; the later reduce call adds
    the children's (here one, passed by value) and returns the sum with every replica's seconds."""
    host, model, spec = _host()
    rng = np.random.default_rng(1)
    x0, x1 = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    child = host.run(_whole_job("child", x0, spec))[1]  # another replica's (grads, seconds)
    steps = (Forward(0, 1), Backward(0, 1, False), Weights(1, True))
    kept = StageCall("s", "j", (1, 1), steps, ("x", spec.outputs[0]), (x1, np.asarray(1.0)), 1, to_driver=(0,))
    (loss,) = host.run(kept)  # the weight step gave no result: only the loss
    assert ("j", "s") in host.kept
    reduce = StageCall("s", "j", (1, 1), (Reduce(1, 1),), ("",), (BY_REF,), 1, to_driver=(0,))
    ((grads, seconds),) = host.run(reduce, child)
    whole = gradserve.local().gradients(model, {"x": np.concatenate([x0, x1])})
    assert np.allclose(grads["w"], whole.grads["w"]) and set(seconds) == {0, 1}
    assert not host.kept
    # A job aborted between the two calls leaves nothing kept behind.
    host.run(StageCall("s", "k", (1, 1), steps, ("x", spec.outputs[0]), (x1, np.asarray(1.0)), 1, to_driver=(0,)))
    host.end_job("k")
    assert not host.kept


def test_the_wire_form_is_msgpack_native_and_round_trips_every_action() -> None:
    """What the engine sends (StageCall.to_wire) must pack with msgpack alone, or Ray falls back
    to pickling it (~0.2 ms per call); unpacked as msgpack hands it back (lists), it is the same
    call, with arrays of any dtype and shape, an object array kept as an array, and every action."""
    msgpack = pytest.importorskip("msgpack")
    arrays = (np.arange(6, dtype=np.float32).reshape(2, 3).T, np.asarray(1.0), np.array([True, False]), BY_REF)
    steps = (
        Forward(0, 2),
        Backward(1, 1, True),
        Weights(2, False),
        Reduce(0, 3),
        Norm(1),
        Update(1, 0, 7, None, 0.5, True),
    )
    call = StageCall("key/0", "job", (2, 1), steps, ("x", "L", "m", ""), arrays, 4, (0, 2))
    wire = call.to_wire()
    back = StageCall.from_wire(msgpack.unpackb(msgpack.packb(wire), use_list=True))
    assert back.steps == call.steps and back.threads == (2, 1) and back.to_driver == (0, 2)
    assert (back.key, back.job_id, back.names, back.results) == (call.key, call.job_id, call.names, call.results)
    for got, sent in zip(back.values, call.values):
        if sent is None:
            assert got is None
        else:
            assert got.dtype == sent.dtype and got.shape == sent.shape and np.array_equal(got, sent)
    # A relay carries the peer's whole call in wire form, which the peer unpacks itself.
    inner = StageCall("key/1", "job", (1, 1), (Forward(0, 1),), ("h",), (BY_REF,), 1, (0,))
    relay = StageCall("key/0", "job", (1, 1), (Relay("peer", inner.to_wire(), (0,), (1,), 3),), (), (), 1, (0,))
    (back_relay,) = StageCall.from_wire(msgpack.unpackb(msgpack.packb(relay.to_wire()), use_list=True)).steps
    assert (back_relay.peer, back_relay.sends, back_relay.errors, back_relay.gives) == ("peer", (0,), (1,), 3)
    assert StageCall.from_wire(back_relay.call) == inner and relay.sent == {0}
    # Left to Ray's pickler: what a dtype string and bytes cannot carry (objects, a structured dtype's fields).
    others = (np.array(["a", None], dtype=object), np.zeros(2, dtype=[("a", "<f8"), ("b", "<i4")]))
    assert all(isinstance(v, np.ndarray) for v in StageCall("k", "j", (1, 1), (), ("o", "s"), others, 0).to_wire()[5])


def test_a_call_in_wire_form_runs_like_the_call() -> None:
    host, _, spec = _host()
    x = np.random.default_rng(2).standard_normal((4, 3))
    loss, (grads, _) = host.run(_whole_job("j", x, spec).to_wire())
    expected_loss, (expected, _) = host.run(_whole_job("k", x, spec))
    assert loss == expected_loss and np.array_equal(grads["w"], expected["w"])


def test_a_feed_group_value_is_unpacked_into_its_feeds() -> None:
    """Large feeds the same stage reads arrive as one {name: array} value named FEED_GROUP."""
    host, _, spec = _host()
    x = np.random.default_rng(3).standard_normal((4, 3))
    call = _whole_job("j", x, spec)
    grouped = StageCall(
        "s", "k", (1, 1), call.steps, (FEED_GROUP, spec.outputs[0]), (BY_REF, np.asarray(1.0)), 2, (0, 1)
    )
    loss, (grads, _) = host.run(grouped, {"x": x})
    expected_loss, (expected, _) = host.run(call)
    assert loss == expected_loss and np.array_equal(grads["w"], expected["w"])


def test_peers_are_looked_up_once_kept_in_bounds_and_a_freed_name_is_a_lost_worker(monkeypatch) -> None:
    """A relay finds its peer by pool name (Ray's named actors, faked here): once per name, at
    most _PEERS_KEPT kept, and a name Ray no longer knows (its actor died) is a lost worker."""
    from gradserve.worker import actor as actor_module

    looked: list[str] = []

    def get_actor(name: str) -> str:
        if name == "gone":
            raise ValueError("Failed to look up actor with name 'gone'")
        looked.append(name)
        return f"handle of {name}"

    monkeypatch.setattr(actor_module.ray, "get_actor", get_actor)
    host, _, _ = _host()
    assert host._peer("a") == host._peer("a") == "handle of a" and looked == ["a"]
    for i in range(actor_module._PEERS_KEPT + 5):
        host._peer(f"p{i}")
    assert len(host.peers) == actor_module._PEERS_KEPT and "a" not in host.peers  # the oldest went first
    with pytest.raises(actor_module.PeerLost, match="gone"):
        host._peer("gone")
