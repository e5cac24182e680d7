"""A real gRPC server in the test's process and what its tests send and check: ``with serving() as
srv: Client(srv.address)...`` (the inline engine on a free port unless told otherwise), the small
MLP job they send (``mlp(seed)``, ``batch(seed)``), the inline engine's answer to compare with
(``REFERENCE``), and an engine that holds its jobs until the test lets them go (``GatedEngine``)."""

from __future__ import annotations

import contextlib
import sys
import threading
from pathlib import Path
from typing import Callable, Iterator

import grpc
import numpy as np
import pytest

import gradserve
from gradserve.server.events import ProgressEvent, check_cancelled
from gradserve.server.inline import InlineEngine
from gradserve.server.service import GradientServer
from gradserve.worker.graph import Model

# `gradserve serve` on the inline engine, in a subprocess of its own: the tests add the address,
# state dir and the options under test.
SERVE_INLINE = [sys.executable, "-m", "gradserve.client.cli", "serve", "--engine", "inline"]

REFERENCE = InlineEngine()


def mlp(seed: int, n_in: int = 4, hidden: int = 8) -> Model:
    """A float32 tanh MLP with an MSE loss, its weights drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    m = gradserve.ModelBuilder()
    x = m.input("x", (None, n_in))
    y = m.input("y", (None, 1))
    w1 = m.param("w1", rng.standard_normal((n_in, hidden)).astype(np.float32))
    b1 = m.param("b1", np.zeros(hidden, np.float32))
    w2 = m.param("w2", rng.standard_normal((hidden, 1)).astype(np.float32))
    return m.loss(m.mse(m.tanh(x @ w1 + b1) @ w2, y))


def batch(seed: int, n: int = 16, n_in: int = 4) -> dict[str, np.ndarray]:
    """Feeds for :func:`mlp`: ``n`` samples drawn from ``seed``."""
    rng = np.random.default_rng(1000 + seed)
    return {"x": rng.standard_normal((n, n_in)).astype(np.float32), "y": rng.standard_normal((n, 1)).astype(np.float32)}


def assert_same(result, reference) -> None:
    """The loss, every dL/dw and every dL/dx of ``result`` equal ``reference``'s (float32 rounding)."""
    assert result.loss == pytest.approx(reference.loss, rel=1e-6)
    assert list(result.grads) == list(reference.grads)
    for name, g in reference.grads.items():
        assert result.grads[name].shape == np.shape(g), name
        np.testing.assert_allclose(result.grads[name], g, rtol=1e-5, atol=1e-6, err_msg=name)
    assert list(result.input_grads) == list(reference.input_grads)
    for name, g in reference.input_grads.items():
        np.testing.assert_allclose(result.input_grads[name], g, rtol=1e-5, atol=1e-6, err_msg=name)


def same(result, reference) -> bool:
    """Whether the loss and every dL/dw of ``result`` equal ``reference``'s: for threads and
    assertions that say more than one comparison."""
    return (
        result.loss == pytest.approx(reference.loss, rel=1e-6)
        and list(result.grads) == list(reference.grads)
        and all(np.allclose(result.grads[k], reference.grads[k], rtol=1e-5, atol=1e-6) for k in reference.grads)
    )


@contextlib.contextmanager
def serving(
    engine_factory: Callable = InlineEngine, address: str = "127.0.0.1:0", **kwargs
) -> Iterator[GradientServer]:
    """A started GradientServer on ``address`` (a free port by default), stopped afterwards;
    ``kwargs`` go to GradientServer (limits, auth_token, metrics_address...)."""
    server = GradientServer(engine_factory, address, **kwargs)
    server.start()
    try:
        yield server
    finally:
        server.stop(grace=1.0)


class GatedEngine:
    """The inline engine behind a gate: a job reports 'forward started', then waits (honouring
    cancellation) until the test opens the gate. Makes slow jobs deterministic."""

    name = "gated"

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.started = threading.Event()
        self.closed = False
        self.inner = InlineEngine()

    def gradients(self, model, feeds, *, input_grads=(), progress=None, cancelled=None, prepared=None):
        if progress:
            progress(ProgressEvent("forward", 0, done=False))
        self.started.set()
        while not self.gate.wait(0.01):
            check_cancelled(cancelled)
        return self.inner.gradients(model, feeds, input_grads=input_grads, cancelled=cancelled, prepared=prepared)

    def close(self) -> None:
        self.closed = True


def _files(tmp_path: Path, seed: int) -> tuple[str, str]:
    """:func:`mlp` and :func:`batch` of ``seed`` saved for the CLI: (model path, feeds path)."""
    model, feeds = mlp(seed), batch(seed)
    model.save(tmp_path / "model.gsm")
    np.savez(tmp_path / "feeds.npz", **feeds)
    return str(tmp_path / "model.gsm"), str(tmp_path / "feeds.npz")


def check_still_serving(client: "gradserve.Client", seed: int = 99) -> None:
    """After a bad request: a normal job on the same server still gives the right answer."""
    model, feeds = mlp(seed), batch(seed)
    assert_same(client.gradients(model, feeds), REFERENCE.gradients(model, feeds))


def code_and_details(fn) -> tuple:
    """The status code and details of the gRPC error ``fn()`` raises."""
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value.code(), info.value.details()


SERVICE = "gradserve.v1.GradientService"  # the service's full name, for raw calls and health checks


def counting_calls(client):
    """Record which job RPC each Client.gradients call makes."""
    calls = []
    for name in ("Compute", "Run"):
        method = getattr(client.calls.stub, name)
        setattr(
            client.calls.stub,
            name,
            lambda *a, _method=method, _name=name, **kw: calls.append(_name) or _method(*a, **kw),
        )
    return calls


def assert_same_npz(a, b) -> None:
    """Two .npz files hold the same arrays (to float32 rounding)."""
    with np.load(a) as x, np.load(b) as y:
        assert sorted(x.files) == sorted(y.files)
        for k in x.files:
            np.testing.assert_allclose(x[k], y[k], rtol=1e-5, atol=1e-6, err_msg=k)
