"""Nothing accepted is lost: a server killed with SIGKILL and started again on the same state
directory serves its models without a new upload, runs again the asynchronous jobs that were
queued or running, returns the kept results; a synchronous call whose server died gets its result
from the restarted one (the client retries)."""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
import time

import numpy as np
import pytest

import gradserve
from gradserve.client.remote import Client, Job
from serving import SERVE_INLINE

pytestmark = pytest.mark.slow  # several server processes

INLINE = gradserve.local()


def _model(seed: int = 3):
    """A 4 x 384 tanh MLP, float64: about a quarter second per job at batch 2048 on one core."""
    rng = np.random.default_rng(seed)
    m = gradserve.ModelBuilder()
    h = m.input("x", (None, 384), np.float64)
    for i in range(4):
        h = m.tanh(h @ m.param(f"w{i}", rng.standard_normal((384, 384)) / 20))
    return m.loss((h * h).mean())


def _feeds(i: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(100 + i).standard_normal((2048, 384))}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(address: str, state_dir, *args: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [
            *SERVE_INLINE,
            "--address",
            address,
            "--state-dir",
            str(state_dir),
            "--max-concurrent-jobs",
            "1",
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    timer = threading.Timer(60, proc.kill)
    timer.start()
    try:
        line = proc.stdout.readline()
    finally:
        timer.cancel()
    assert line.startswith("listening on "), line
    return proc


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)


def _same(got, want) -> None:
    assert abs(got.loss - want.loss) <= 1e-12 * max(1.0, abs(want.loss))
    for name, g in want.grads.items():
        np.testing.assert_allclose(got.grads[name], g, rtol=1e-9, atol=1e-12)


def test_a_crash_loses_no_accepted_job(tmp_path) -> None:
    address, state = f"127.0.0.1:{_port()}", tmp_path / "state"
    model = _model()
    server = _serve(address, state)
    try:
        with Client(address, timeout=60) as client:
            model_id = client.upload(model)
            jobs = [client.submit(model_id, _feeds(i), partitions=1) for i in range(5)]
            # Kill once the first job has finished and the next one is running: one result kept,
            # one job running, three queued.
            deadline = time.monotonic() + 60
            while jobs[0].status().state != "done" or jobs[1].status().state != "running":
                assert time.monotonic() < deadline, [j.status().state for j in jobs]
                time.sleep(0.02)
            _kill(server)
            server = _serve(address, state)
            assert client.has_model(model_id)  # served from the state directory: no new upload
            for i, job in enumerate(jobs):
                again = Job(client, job.id, model_id)  # only the id survives with the client
                _same(again.result(timeout=120), INLINE.gradients(model, _feeds(i)))
            # Fetched results are dropped from the disk; the model stays.
            assert not list((state / "jobs").iterdir())
            assert [p.stem for p in (state / "models").iterdir()] == [model_id]
    finally:
        _kill(server)


def test_a_synchronous_call_rides_out_a_crash(tmp_path) -> None:
    address, state = f"127.0.0.1:{_port()}", tmp_path / "state"
    model = _model(5)
    server = _serve(address, state)
    out: dict = {}
    try:
        with Client(address, timeout=120) as client:
            client.upload(model)
            # Keep the one slot busy -- four jobs of 4x the batch ahead, a few seconds of work -- so
            # the synchronous job is still waiting behind them when the server dies.
            for i in range(4):
                client.submit(model, {"x": np.concatenate([_feeds(9 + i)["x"]] * 4)}, partitions=1)
            call = threading.Thread(target=lambda: out.update(result=client.gradients(model, _feeds(1), partitions=1)))
            call.start()
            time.sleep(0.5)  # the synchronous job has reached the server (it is not listed in the status)
            assert call.is_alive() and len(client.server_status().jobs) >= 2, "the jobs ahead finished too soon"
            _kill(server)
            time.sleep(0.5)  # the client sees the server gone and retries
            server = _serve(address, state)
            call.join(120)
            assert not call.is_alive()
            _same(out["result"], INLINE.gradients(model, _feeds(1)))
            assert client.retries >= 1
    finally:
        _kill(server)
