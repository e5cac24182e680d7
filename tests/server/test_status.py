"""``GetServerStatus`` and ``gradserve status``: a real server on a free port, jobs held queued and
running by a gated engine, the status read through the RPC (with and without the token) and
printed by the CLI; with the Ray engine, the cluster's nodes and the pool's actors on each."""

from __future__ import annotations

import json
import time

import grpc
import numpy as np
import pytest

from gradserve.client.cli import main as cli_main
from gradserve.client.remote import Client, Unauthenticated
from gradserve.client.status import ServerStatus, format_status, server_status
from gradserve.proto.v1 import service_pb2, service_pb2_grpc
from gradserve.server.limits import Limits
from gradserve.server.status import version
from borrowed import Borrowed
from scraping import scrape, total, value
from serving import REFERENCE, GatedEngine, assert_same, batch, mlp, serving

TOKEN = "status-t0ken"


def test_status_rpc_shows_queued_and_running_jobs_and_models_and_needs_the_token(tmp_path):
    engine = GatedEngine()
    with (
        serving(lambda: engine, limits=Limits(max_concurrent_jobs=1), auth_token=TOKEN) as srv,
        Client(srv.address, token=TOKEN, timeout=30) as c,
    ):
        model, feeds = mlp(41), batch(41)
        other = mlp(42)
        c.upload(other)
        running = c.submit(model, feeds)
        assert engine.started.wait(5)
        queued = c.submit(model, feeds)

        status = server_status(c)
        assert isinstance(status, ServerStatus)
        assert status.version == version() and status.engine == "gated"
        assert 0 <= status.uptime_seconds < 60
        assert [(j.job_id, j.state) for j in status.jobs] == [(running.id, "running"), (queued.id, "queued")]
        assert [j.job_id for j in status.running] == [running.id] and [j.job_id for j in status.queued] == [queued.id]
        run = status.jobs[0]
        assert run.model_id == model.fingerprint() and (run.steps_done, run.steps_total) == (0, 2)
        assert run.running_seconds > 0 and status.jobs[1].running_seconds == 0
        models = {m.model_id: m for m in status.models}
        assert set(models) == {model.fingerprint(), other.fingerprint()}
        assert models[model.fingerprint()].parameters == 3
        assert models[model.fingerprint()].bytes == srv.store.info(model.fingerprint()).nbytes
        assert status.model_store_bytes == srv.store.nbytes
        assert status.max_concurrent_jobs == 1 and status.max_queued_jobs == Limits().max_queued_jobs
        assert status.pending_bytes == 2 * sum(a.nbytes for a in feeds.values())
        (node,) = status.nodes  # the inline engine computes on the server's machine
        assert node.cpus >= 1 and node.memory_bytes > 0 and node.actors == 0 and node.alive

        screen = format_status(status, srv.address)
        for text in (
            "engine gated",
            running.id,
            queued.id,
            model.fingerprint()[:16],
            other.fingerprint()[:16],
            "0/2",
            "1 running, 1 queued",
        ):
            assert text in screen, text

        # The token is required, as for every other call.
        with Client(srv.address, timeout=10) as anonymous:
            with pytest.raises(Unauthenticated):
                server_status(anonymous)
        with grpc.insecure_channel(srv.address) as channel:
            stub = service_pb2_grpc.GradientServiceStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                stub.GetServerStatus(
                    service_pb2.ServerStatusRequest(), metadata=(("authorization", "Bearer no"),), timeout=5
                )
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED

        queued.cancel()
        engine.gate.set()
        assert_same(running.result(timeout=10), REFERENCE.gradients(model, feeds))
        with pytest.raises(Exception):
            c.gradients(model, {"x": np.zeros((1, 3), np.float32), "y": np.zeros((1, 1), np.float32)})
        after = server_status(c)
        assert after.jobs == []
        assert after.jobs_ended == {"done": 1, "cancelled": 1, "rejected": 1}
        assert after.pending_bytes == 0


def test_cli_status_prints_the_screen(tmp_path, capsys):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    engine = GatedEngine()
    with serving(lambda: engine, auth_token=TOKEN) as srv, Client(srv.address, token=TOKEN, timeout=30) as c:
        model = mlp(43)
        job = c.submit(model, batch(43))
        assert engine.started.wait(5)

        assert cli_main(["status", "--server", srv.address, "--token-file", str(token_file)]) == 0
        out = capsys.readouterr().out
        lines = out.splitlines()
        assert lines[0].startswith(f"gradserve {version()} at {srv.address}: engine gated, up ")
        assert "jobs: 1 running, 0 queued" in lines[1]
        assert any(line.split()[:3] == [job.id, model.fingerprint()[:16], "running"] for line in lines), out
        assert any(line.split()[:3] == [model.fingerprint()[:16], "196", "B"] for line in lines), out
        assert "NODE" in out and "ACTORS" in out

        assert cli_main(["status", "--server", srv.address, "--token-file", str(token_file), "--json"]) == 0
        data = json.loads(capsys.readouterr().out)
        assert data["engine"] == "gated" and [j["job_id"] for j in data["jobs"]] == [job.id]

        assert cli_main(["status", "--server", srv.address]) == 1  # no token: one line, no traceback
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Unauthenticated" in err
        engine.gate.set()
        job.result(timeout=10)


# -- the Ray engine --------------------------------------------------------------------------------


@pytest.mark.slow
def test_status_and_metrics_show_the_ray_pool(ray_engine):
    with (
        serving(lambda: Borrowed(ray_engine), metrics_address="127.0.0.1:0") as srv,
        Client(srv.address, timeout=120) as c,
    ):
        model, feeds = mlp(44), batch(44)
        result = c.gradients(model, feeds, partitions=2)
        assert result.info["partitions"] == 2
        assert_same(result, REFERENCE.gradients(model, feeds))

        engine = ray_engine.status()
        assert engine["actors"] >= 2 and engine["max_retries"] == ray_engine.max_retries
        status = server_status(c)
        assert status.engine == "ray"
        assert sum(n.actors for n in status.nodes) == engine["actors"]
        for node in status.nodes:
            assert node.alive and node.cpus > 0 and node.memory_bytes > 0 and node.address
            assert node.busy_actors == 0  # the job has ended
        screen = format_status(status)
        assert f"{engine['actors']} worker actors" in screen

        m = scrape(srv.metrics_address)
        assert value(m, "gradserve_pool_nodes") == len(status.nodes)
        assert total(m, "gradserve_pool_actors") == engine["actors"]
        assert value(m, "gradserve_jobs_total", outcome="done", code="OK") == 1
        assert value(m, "gradserve_worker_retries_total") == 0
        assert value(m, "gradserve_info", version=version(), engine="ray") == 1


@pytest.mark.slow
def test_ray_status_does_not_wait_for_a_job_being_placed(ray_engine):
    """``RayEngine.status()`` answers within about a second even while the engine's lock is held
    (actors starting for a job): actors are then counted without it."""
    with ray_engine._lock:  # noqa: SLF001 -- as while a job's actors start
        t0 = time.monotonic()
        status = ray_engine.status()
        assert time.monotonic() - t0 < 5
    assert all(n["busy_actors"] == 0 for n in status["nodes"])
    assert status["actors"] == len(ray_engine._pool.where)  # noqa: SLF001
