"""What the Ray commands print (issue 19, "the first five minutes"): nothing of Ray's that a user
cannot act on. An embedded Ray prints no token notice and writes no token file, yet refuses
connections without its token; a gracefully stopped server prints no C++ SIGTERM trace; a cluster
that refuses the token gives one line naming the env file to source, exit status 2.

Every command runs for real in a subprocess whose environment is a new user's: no RAY_* variables.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from clusters import local_cluster

CLI = [sys.executable, "-m", "gradserve.client.cli"]
NOTICE = "Token authentication is enabled"
CPP_SPAM = ("SIGTERM received", "PC: @", "InvalidAuthToken", "gcs_client.cc")


def _clean_env(**extra: str) -> dict[str, str]:
    """This environment without Ray's variables (the test session's embedded Ray set some)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.pop("GRADSERVE_CLUSTER_DIR", None)
    return {**env, **extra}


@pytest.fixture
def job(tmp_path: Path) -> list[str]:
    """`grad` arguments for a tiny model: MODEL --feeds FEEDS --out OUT."""
    import gradserve

    m = gradserve.ModelBuilder()
    x = m.input("x", (None, 3), np.float64)
    w = m.param("w", np.full((3, 1), 0.5))
    model = m.loss((x @ w).sum())
    model.save(tmp_path / "tiny.gsm")
    np.savez(tmp_path / "feeds.npz", x=np.ones((4, 3)))
    return [str(tmp_path / "tiny.gsm"), "--feeds", str(tmp_path / "feeds.npz"), "--out", str(tmp_path / "grads.npz")]


@pytest.mark.slow
def test_embedded_ray_refuses_connections_without_its_token(ray_engine):
    """The token the embedded Ray got is enforced: its GCS turns away a call without it, and
    answers the same call with the credentials Ray sends."""
    import grpc
    import ray
    from ray._private.grpc_utils import init_grpc_channel
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    if os.environ.get("RAY_AUTH_MODE") != "token":
        pytest.skip("RAY_AUTH_MODE was set to something else for this session: the user's choice is kept")
    gcs = ray.get_runtime_context().gcs_address
    request = gcs_service_pb2.GetClusterIdRequest()
    with grpc.insecure_channel(gcs) as bare:
        with pytest.raises(grpc.RpcError) as refused:
            gcs_service_pb2_grpc.NodeInfoGcsServiceStub(bare).GetClusterId(request, timeout=30)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with init_grpc_channel(gcs) as ours:
        assert gcs_service_pb2_grpc.NodeInfoGcsServiceStub(ours).GetClusterId(request, timeout=30).cluster_id


@pytest.mark.slow
def test_server_on_embedded_ray_prints_its_own_lines_only(tmp_path):
    """`gradserve serve` on an embedded Ray, then SIGTERM: exit 0, stderr holds the server's log
    and "shutting down" only (no token notice, no C++ SIGTERM trace), and no token file was
    written into the (new) home directory."""
    from gradserve.worker import kernels

    home = tmp_path / "home"
    home.mkdir()
    # a new user's home, but the compiled kernels of this machine (compiling them takes ~20 s)
    env = _clean_env(HOME=str(home), NUMBA_CACHE_DIR=str(kernels.cache_dir()))
    server = subprocess.Popen(
        [*CLI, "serve", "--address", "127.0.0.1:0", "--state-dir", "none"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    timer = threading.Timer(300, server.kill)  # a server that never starts fails the test, not hangs it
    timer.start()
    try:
        first = server.stdout.readline()  # blocks until the server is up (or has exited)
        timer.cancel()
        assert first.startswith("listening on "), first + server.stderr.read()
        server.send_signal(signal.SIGTERM)
        out, err = server.communicate(timeout=120)
    finally:
        timer.cancel()
        if server.poll() is None:
            server.kill()
            server.wait()
    assert server.returncode == 0, err
    assert NOTICE not in err and not any(s in err for s in CPP_SPAM), err
    own = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+ (DEBUG|INFO|WARNING|ERROR) gradserve[.\w]*: |^shutting down$")
    assert all(own.match(line) for line in err.splitlines()), err
    assert "shutting down" in err.splitlines()
    assert not (home / ".ray").exists(), list((home / ".ray").iterdir())


def test_the_env_file_named_is_the_one_of_that_cluster(tmp_path, monkeypatch):
    """The hint names a local cluster's env file only for that cluster's address, however written."""
    from ray._private.services import canonicalize_bootstrap_address

    from gradserve.server.ray_engine.connect import local_cluster_env

    (tmp_path / "env").write_text("export RAY_ADDRESS=127.0.0.1:40123\nexport RAY_AUTH_MODE=token\n")
    monkeypatch.setenv("GRADSERVE_CLUSTER_DIR", str(tmp_path))
    assert local_cluster_env(canonicalize_bootstrap_address("localhost:40123")) == tmp_path / "env"
    assert local_cluster_env(canonicalize_bootstrap_address("127.0.0.1:40124")) is None


def _refusal(proc: subprocess.CompletedProcess) -> str:
    """The one line a refused connection prints (exit status 2, no Ray log lines)."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    assert not any(s in proc.stderr for s in CPP_SPAM)
    return lines[0]


@pytest.mark.slow
def test_cluster_without_its_token_gets_one_line_naming_the_env_file(tmp_path, job):
    """Against a deploy/local-cluster: `plan`, `grad --engine ray` and `serve` with --ray-address
    and no token each print one line saying which env file to source, and exit 2; a wrong token is
    named as such; with the env file's variables the same `plan` works. The cluster's own server,
    stopped by `down` with SIGTERM, logged no C++ SIGTERM trace."""
    # one raylet (the head, with the CPU): the cheapest cluster there is
    with local_cluster(tmp_path, 0, "--head-cpus", "1") as (_, state):
        ray_address = (state / "ray_address").read_text().strip()
        env_file = state / "env"
        env = _clean_env(GRADSERVE_CLUSTER_DIR=str(state))
        commands = {
            "plan": ["plan", job[0], *job[1:3], "--partitions", "auto", "--ray-address", ray_address],
            "grad": ["grad", *job, "--engine", "ray", "--ray-address", ray_address],
            "serve": ["serve", "--address", "127.0.0.1:0", "--state-dir", "none", "--ray-address", ray_address],
        }
        for name, args in commands.items():
            line = _refusal(subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=120))
            assert f"cannot join the Ray cluster at {ray_address}" in line, f"{name}: {line}"
            assert "none was sent" in line and f"source {env_file}" in line, f"{name}: {line}"

        # elsewhere (no GRADSERVE_CLUSTER_DIR naming it), the variables to set; a wrong token is named
        wrong = _clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="not-the-token")
        line = _refusal(
            subprocess.run([*CLI, *commands["plan"]], env=wrong, capture_output=True, text=True, timeout=120)
        )
        assert "refused the token in RAY_AUTH_TOKEN" in line and "RAY_AUTH_TOKEN_PATH" in line, line

        # what the hint says to do works
        exports = dict(re.findall(r"^export (\w+)=(.*)$", env_file.read_text(), re.M))
        sourced = subprocess.run(
            [*CLI, *commands["plan"]], env={**env, **exports}, capture_output=True, text=True, timeout=300
        )
        assert sourced.returncode == 0, sourced.stderr[-3000:]
        assert f"the Ray cluster at {ray_address}" in sourced.stdout
    log = (state / "server.log").read_text()
    assert "shutting down" in log and "SIGTERM received" not in log, log[-3000:]
