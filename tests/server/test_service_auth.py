"""Who may call the gRPC service: bearer tokens (from the API and from `gradserve serve
--auth-token-file`) and TLS, over real sockets (the service's other tests: test_service*.py)."""

from __future__ import annotations

import os
import select
import signal
import subprocess

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gradserve.client.cli import main as cli_main
from gradserve.client.remote import (
    Client,
    RemoteError,
    Unauthenticated,
)
from gradserve.proto.v1 import service_pb2, service_pb2_grpc
from serving import (
    REFERENCE,
    SERVE_INLINE,
    SERVICE,
    _files,
    assert_same,
    assert_same_npz,
    batch,
    counting_calls,
    mlp,
    serving,
)

# -- auth and TLS ----------------------------------------------------------------------------------


def test_bearer_token_auth(tmp_path):
    token = "s3cret-t0ken"
    (tmp_path / "token").write_text(token + "\n")
    model, feeds = mlp(14), batch(14)
    with serving(auth_token=token) as srv:
        for kwargs in ({}, {"token": "wrong"}, {"token": token + "x"}):
            with Client(srv.address, timeout=10, **kwargs) as c:
                with pytest.raises(Unauthenticated, match="bearer token"):
                    c.gradients(model, feeds)
                stub = service_pb2_grpc.GradientServiceStub(c._channel)  # a streaming call too
                with pytest.raises(grpc.RpcError) as info:
                    list(stub.Run(iter([service_pb2.JobChunk()]), timeout=10))
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
                with pytest.raises(grpc.RpcError) as info:
                    list(stub.Compute(service_pb2.JobRequest(), timeout=10))
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with Client(srv.address, token_file=tmp_path / "token", timeout=10) as c:
            calls = counting_calls(c)
            assert_same(c.gradients(model, feeds), REFERENCE.gradients(model, feeds))
            assert calls == ["Compute"]
            assert srv.stats["jobs"] == 1  # the rejected calls never reached the servicer
        with grpc.insecure_channel(srv.address) as channel:  # health needs no token
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_tls(tls_files):
    cert, key = tls_files
    model, feeds = mlp(15), batch(15)
    with serving(tls_cert=cert.read_bytes(), tls_key=key.read_bytes()) as srv:
        with Client(srv.address, ca_file=cert, timeout=10) as c:
            assert_same(c.gradients(model, feeds), REFERENCE.gradients(model, feeds))
        with Client(srv.address, timeout=3, retry=None) as plain:
            with pytest.raises(RemoteError) as info:
                plain.has_model("x")
            assert info.value.code == grpc.StatusCode.UNAVAILABLE


def test_cli_serve_with_token_file(tmp_path, capsys):
    token_file = tmp_path / "token"
    token_file.write_text("cli-token\n")
    model_path, feeds_path = _files(tmp_path, 17)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            *SERVE_INLINE,
            "--address",
            "127.0.0.1:0",
            "--state-dir",
            "none",
            "--auth-token-file",
            str(token_file),
            "--log-level",
            "warning",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        assert ready, "server did not start"
        line = proc.stdout.readline()
        assert line.startswith("listening on "), line + proc.stderr.read()
        address = line.split()[-1]
        out = str(tmp_path / "remote.npz")
        args = ["grad", model_path, "--feeds", feeds_path, "--out", out, "--server", address, "-q"]
        assert cli_main(args) == 1  # no token
        assert "Unauthenticated" in capsys.readouterr().err
        assert cli_main([*args, "--token-file", str(token_file)]) == 0
        assert cli_main(["grad", model_path, "--feeds", feeds_path, "--out", str(tmp_path / "local.npz"), "-q"]) == 0
        assert_same_npz(str(tmp_path / "local.npz"), out)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
