"""A weight the loss does not read, in training sessions: every engine leaves it alone, as
torch.optim leaves a parameter whose ``.grad`` is None (no decay, no momentum), and it stays the
session's like any weight (read, set, checkpointed) though no Ray stage holds it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gradserve
from gradserve.worker.optim import AdamW

from gradcheck import assert_close


def with_an_unread_weight():
    """x -> tanh(x @ w0 + b0) @ w1, MSE; and ``unread``, a weight of a branch the loss does not read."""
    rng = np.random.default_rng(1)
    m = gradserve.ModelBuilder()
    x, y = m.input("x", (None, 4), np.float64), m.input("y", (None, 2), np.float64)
    h = m.tanh(x @ m.param("w0", rng.standard_normal((4, 3))) + m.param("b0", rng.standard_normal(3)))
    _dead_branch = m.tanh(x @ m.param("unread", rng.standard_normal((4, 3))))
    model = m.loss(m.mse(h @ m.param("w1", rng.standard_normal((3, 2))), y))
    batches = [{"x": rng.standard_normal((8, 4)), "y": rng.standard_normal((8, 2))} for _ in range(4)]
    return model, batches


def torch_steps_with_an_unread_weight(model, batches):
    """torch.optim.AdamW with weight decay on the same model: the unread weight's .grad stays None,
    so AdamW leaves it alone (no decay)."""
    params = {n: torch.tensor(v, requires_grad=True) for n, v in model.params.items()}
    opt = torch.optim.AdamW(list(params.values()), lr=0.05, weight_decay=0.5)
    for batch in batches:
        h = torch.tanh(torch.tensor(batch["x"]) @ params["w0"] + params["b0"])
        loss = torch.nn.functional.mse_loss(h @ params["w1"], torch.tensor(batch["y"]))
        opt.zero_grad()
        loss.backward()
        assert params["unread"].grad is None
        opt.step()
    return {n: p.detach().numpy() for n, p in params.items()}


def test_a_weight_the_loss_does_not_read_is_left_alone_as_torch_optim_leaves_it():
    model, batches = with_an_unread_weight()
    start = model.params["unread"].copy()
    with gradserve.local().session(model, AdamW(lr=0.05, weight_decay=0.5)) as session:
        for batch in batches:
            step = session.step(batch, return_grads=True)
            assert step.info["unreached"] == ["unread"] and not np.any(step.grads["unread"])
        weights = session.weights()
    assert np.array_equal(weights["unread"], start)  # no decay, no step
    assert_close(weights, torch_steps_with_an_unread_weight(model, batches))


@pytest.mark.slow
def test_a_ray_session_leaves_an_unread_weight_alone_as_the_inline_one(ray_engine):
    model, batches = with_an_unread_weight()
    reference = gradserve.local().session(model, AdamW(lr=0.05, weight_decay=0.5))
    for batch in batches:
        reference.step(batch)
    assert ray_engine.gradients(model, batches[0], partitions=2).info["unreached"] == ["unread"]
    with ray_engine.session(model, AdamW(lr=0.05, weight_decay=0.5), partitions=2) as session:
        for batch in batches:
            session.step(batch)
        assert_close(session.weights(), reference.weights(), rtol=1e-10)
        # No stage holds it (no partition reads it), yet it is the session's like any weight.
        session.set_weights({"unread": np.full((4, 3), 7.0)})
        session.step(batches[0])
        assert np.array_equal(session.weights(["unread"])["unread"], np.full((4, 3), 7.0))
        assert np.array_equal(session.checkpoint().weights["unread"], np.full((4, 3), 7.0))
