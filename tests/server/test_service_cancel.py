"""The gRPC service over a real socket: cancelling running and queued jobs, a synchronous job
whose client gives up, and a graceful shutdown that cancels what outlives its grace (the
service's other tests: test_service*.py)."""

from __future__ import annotations

import time

import pytest

from gradserve.client.remote import (
    Cancelled,
    Client,
    DeadlineExceeded,
    RemoteError,
    ResourceExhausted,
)
from gradserve.server.events import JobCancelled
from gradserve.server.limits import Limits
from gradserve.server.service import GradientServer
from serving import REFERENCE, assert_same, batch, counting_calls, GatedEngine, mlp, serving

# -- cancellation, queueing, shutdown --------------------------------------------------------------


def test_cancel_running_and_queued_jobs():
    engine = GatedEngine()
    with (
        serving(lambda: engine, limits=Limits(max_concurrent_jobs=1, max_queued_jobs=1)) as srv,
        Client(srv.address, timeout=30, retry=None) as c,
    ):
        model, feeds = mlp(11), batch(11)
        running = c.submit(model, feeds)
        assert engine.started.wait(5)
        assert running.status().state == "running"
        queued = c.submit(model, feeds)
        assert queued.status().state == "queued"
        with pytest.raises(ResourceExhausted, match="at most 1 at once and queues 1 more"):
            c.submit(model, feeds)

        assert queued.cancel().state == "cancelled"
        with pytest.raises(Cancelled):
            queued.result(timeout=5)
        status = running.cancel()
        assert status.state == "cancelled" or status.message == "cancel requested"
        statuses = list(running.watch(timeout=5))
        assert statuses[-1].state == "cancelled" and statuses[-1].error_code == "CANCELLED"
        with pytest.raises(Cancelled) as info:
            running.result(timeout=5)
        assert isinstance(info.value, JobCancelled)

        engine.gate.set()  # the engine is free again: jobs run normally
        assert_same(c.gradients(model, feeds), REFERENCE.gradients(model, feeds))
        assert srv.servicer.pending.used == 0  # every job's feeds were released, cancelled or not


@pytest.mark.parametrize("rpc", ["Compute", "Run"])
def test_sync_job_is_cancelled_when_the_client_gives_up(rpc):
    engine = GatedEngine()
    with serving(lambda: engine) as srv, Client(srv.address) as c:
        c._compute = rpc == "Compute"
        calls = counting_calls(c)
        with pytest.raises(DeadlineExceeded):
            c.gradients(mlp(12), batch(12), timeout=0.5)
        deadline = time.monotonic() + 5
        while srv.registry.jobs() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert srv.registry.jobs() == []  # cancelled and forgotten, not left running
        assert calls == [rpc] and srv.servicer.pending.used == 0


def test_graceful_shutdown_cancels_jobs_after_grace_and_closes_engine():
    engine = GatedEngine()
    srv = GradientServer(lambda: engine, "127.0.0.1:0")
    srv.start()
    with Client(srv.address, timeout=10, retry=None) as c:
        c.submit(mlp(13), batch(13))
        assert engine.started.wait(5)
        (job,) = srv.registry.jobs()
        t0 = time.monotonic()
        srv.stop(grace=0.3)
        assert time.monotonic() - t0 < 5
        assert job.state == "cancelled" and engine.closed
        with pytest.raises(RemoteError):
            c.has_model("x")
