"""A client pointed at no server, or at the wrong one, says so within seconds, in one line naming
the address and what gRPC found (connection refused, host name not found, TLS handshake failed),
instead of retrying for two minutes; a server that answered once and then went away is still
retried for as long as the call's timeout. Addresses without a port mean the server's 50051.

Real sockets throughout: refused ports, a port that accepts and never speaks, TLS mismatches,
in-process servers on the inline engine, and the CLI in this process and in a subprocess.
"""

from __future__ import annotations

import random
import re
import socket
import subprocess
import sys
import threading
import time

import grpc
import pytest

from gradserve.client.cli import main as cli_main
from gradserve.client.connection import DEFAULT_PORT, connect_failure, server_target
from gradserve.client.remote import CONNECT_TIMEOUT, Client, Unavailable
from gradserve.client.retry import RetryPolicy
from clusters import free_port
from retry_fakes import FakeClock, Failure, failing
from serving import REFERENCE, GatedEngine, _files, batch, mlp, same, serving
from tls import self_signed

FAST = 5.0  # seconds: what "fails fast" means here (it took 114 s before, `gradserve status` 8-23 s)


def _refused_address() -> str:
    return f"127.0.0.1:{free_port()}"


def _fails_fast(client: Client, reason: str, call=lambda c: c.has_model("x")) -> Unavailable:
    """``call(client)`` raises Unavailable naming the address and ``reason`` (a regex), within FAST seconds."""
    start = time.monotonic()
    with pytest.raises(Unavailable) as info:
        call(client)
    elapsed = time.monotonic() - start
    assert elapsed < FAST, f"took {elapsed:.1f}s"
    assert re.fullmatch(rf"no gradserve server at {re.escape(client.address)} \({reason}\)", str(info.value)), str(
        info.value
    )
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    return info.value


# -- addresses -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "given, target",
    [
        ("127.0.0.1", "127.0.0.1:50051"),
        ("localhost", "localhost:50051"),
        ("10.0.0.7:6000", "10.0.0.7:6000"),
        ("[::1]", "[::1]:50051"),
        ("[::1]:6000", "[::1]:6000"),
        ("::1", "[::1]:50051"),
        ("dns:///example.com", "dns:///example.com:50051"),
        ("dns:example.com:7", "dns:example.com:7"),
        ("ipv4:10.0.0.1,10.0.0.2:7", "ipv4:10.0.0.1:50051,10.0.0.2:7"),
        ("unix:/run/gradserve.sock", "unix:/run/gradserve.sock"),
        ("unix:///run/gradserve.sock", "unix:///run/gradserve.sock"),
    ],
)
def test_the_default_port_is_the_servers_never_443(given, target):
    assert server_target(given) == target
    assert Client(given).address == target


@pytest.mark.parametrize(
    "given, complaint",
    [
        ("", "empty"),
        ("host:", "port '' is not a number"),
        ("host:http", "port 'http' is not a number"),
        ("host:0", "port '0' is not a number from 1 to 65535"),
        ("host:65536", "port '65536'"),
        (":50051", "no host"),
        ("http://host:50051", "not a URL"),
        ("[::1", "without ']'"),
        ("1:2:3", "goes in brackets"),
    ],
)
def test_a_malformed_address_is_refused_before_anything_is_sent(given, complaint):
    with pytest.raises(ValueError, match=re.escape(complaint)):
        Client(given)


def test_no_port_reaches_a_server_on_50051():
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", DEFAULT_PORT))
        except OSError:
            pytest.skip(f"port {DEFAULT_PORT} is taken on this machine")
    model, feeds = mlp(41), batch(41)
    with serving(address=f"127.0.0.1:{DEFAULT_PORT}"), Client("127.0.0.1", timeout=30) as c:
        assert same(c.gradients(model, feeds), REFERENCE.gradients(model, feeds))


def test_the_reasons_read_from_grpcs_texts():
    # gRPC's texts as grpc 1.85 writes them (the tests below get the same from real sockets).
    assert (
        connect_failure(
            "failed to connect to all addresses; last error: UNKNOWN: ipv6:%5B::1%5D:50052: "
            "Failed to connect to remote host: Connection refused"
        )
        == "connection refused"
    )
    assert (
        connect_failure(
            "errors resolving x.invalid:50051: [field:hostname lookup error:address lookup "
            "failed for x.invalid:50051: Domain name not found]"
        )
        == "host name not found"
    )
    assert (
        connect_failure(
            "failed to connect to all addresses; last error: UNKNOWN: ipv4:1.2.3.4:5: Something new: errno 99"
        )
        == "Something new: errno 99"
    )  # unknown: gRPC's own words
    assert connect_failure("shutting down") is None  # a server's own UNAVAILABLE: retried as ever


def test_a_failure_with_a_window_is_retried_until_the_window_closes():
    clock = FakeClock()
    policy = RetryPolicy(initial_backoff=0.1, multiplier=2.0, max_backoff=5.0)
    attempt = failing(Failure(grpc.StatusCode.UNAVAILABLE), clock)
    with pytest.raises(Failure):
        policy.call(attempt, 60.0, window=lambda exc: 2.0, clock=clock, sleep=clock.sleep, rng=random.Random(3))
    assert clock.now - 1000.0 == pytest.approx(2.0)  # the last try as the window closed, none after
    assert len(attempt.lefts) >= 3
    attempt = failing(Failure(grpc.StatusCode.UNAVAILABLE), clock)
    with pytest.raises(Failure):
        policy.call(attempt, 60.0, window=lambda exc: None, clock=clock, sleep=clock.sleep, rng=random.Random(3))
    assert clock.now - 1002.0 > 30  # no window: retried up to the deadline, as before


# -- failing fast ----------------------------------------------------------------------------------


def test_a_refused_port_fails_fast_with_one_clear_line():
    address = _refused_address()
    with Client(address) as c:  # the defaults of the README's example: no timeout, retries on
        _fails_fast(c, "connection refused")
        _fails_fast(c, "connection refused", lambda c: c.gradients(mlp(1), batch(1)))
        assert c.retries >= 1  # a server that is only starting gets connect_timeout seconds
    with Client(address, retry=None) as c:
        _fails_fast(c, "connection refused")
        assert c.retries == 0


def test_an_unknown_host_name_fails_fast():
    with Client("no-such-host.invalid:50051", connect_timeout=0.5) as c:  # .invalid never resolves (RFC 6761)
        _fails_fast(c, "host name (not found|lookup failed)")


def test_a_missing_unix_socket_fails_fast(tmp_path):
    with Client(f"unix:{tmp_path / 'gradserve.sock'}", connect_timeout=0.5) as c:
        _fails_fast(c, "no such socket file")


def test_a_port_that_never_answers_fails_fast():
    """A listener that accepts connections and never speaks HTTP/2 (another program's port, or a
    host that drops packets): gRPC would wait 20 s for each connection attempt."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)  # the kernel accepts; nobody ever reads or writes
        with Client(f"127.0.0.1:{listener.getsockname()[1]}") as c:
            _fails_fast(c, "connection timed out")


def test_tls_mismatches_fail_fast_naming_the_handshake(tls_files, tmp_path):
    cert, key = tls_files
    with serving(tls_cert=cert.read_bytes(), tls_key=key.read_bytes()) as tls, serving() as plain:
        with Client(tls.address, connect_timeout=0.5) as c:  # plaintext to a TLS server
            _fails_fast(c, "connection closed during setup: does the server use TLS\\?")
        with Client(plain.address, ca_file=cert, connect_timeout=0.5) as c:  # TLS to a plaintext server
            _fails_fast(c, "TLS handshake failed: the server does not speak TLS")
        other = tmp_path / "other.pem"
        self_signed(other, tmp_path / "other.key", name="other")
        with Client(tls.address, ca_file=other, connect_timeout=0.5) as c:  # a certificate the client does not trust
            _fails_fast(c, "TLS handshake failed: certificate verify failed: .+")


def test_a_server_that_answered_once_is_retried_past_the_connect_timeout():
    """Retries are for servers that restart: one that answered and then went away for longer than
    connect_timeout still gets the call's whole timeout."""
    port = free_port()
    model, feeds = mlp(42), batch(42)
    out: dict = {}
    with Client(f"127.0.0.1:{port}", timeout=60, retry=RetryPolicy(max_backoff=0.5)) as c:
        with serving(address=f"127.0.0.1:{port}"):
            c.upload(model)
        gone = time.monotonic()
        caller = threading.Thread(target=lambda: out.update(result=c.gradients(model, feeds)))
        caller.start()
        while time.monotonic() - gone < CONNECT_TIMEOUT + 1.0:  # the client keeps retrying meanwhile
            assert caller.is_alive(), "the client gave up on a server it had reached"
            time.sleep(0.05)
        with serving(address=f"127.0.0.1:{port}"):
            caller.join(60)
        assert not caller.is_alive() and same(out["result"], REFERENCE.gradients(model, feeds))
        assert c.retries_by_code["UNAVAILABLE"] >= 3


def test_connect_timeout_none_retries_a_server_never_reached_like_one_restarting():
    with Client(_refused_address(), timeout=1.0, connect_timeout=None) as c:
        with pytest.raises(Unavailable, match="no gradserve server at .* \\(connection refused\\)"):
            c.has_model("x")  # up to the call's timeout, then the same clear message
    with pytest.raises(ValueError, match="connect_timeout"):
        Client("127.0.0.1", connect_timeout=0)


# -- the CLI ---------------------------------------------------------------------------------------


def _cli(argv, capsys) -> tuple[int, str, float]:
    start = time.monotonic()
    code = cli_main(argv)
    return code, capsys.readouterr().err, time.monotonic() - start


def test_cli_status_and_grad_fail_fast_on_a_wrong_port(tmp_path, capsys):
    address = _refused_address()
    model_path, feeds_path = _files(tmp_path, 43)
    for argv in (
        ["status", "--server", address],
        ["grad", model_path, "--feeds", feeds_path, "--out", str(tmp_path / "g.npz"), "--server", address],
    ):
        code, err, elapsed = _cli(argv, capsys)
        assert code == 1 and elapsed < FAST, (argv[0], code, elapsed)
        assert err == f"gradserve: error: Unavailable: no gradserve server at {address} (connection refused)\n"
    assert not (tmp_path / "g.npz").exists()


def test_cli_in_a_fresh_process_fails_fast_in_one_line():
    address = _refused_address()
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "gradserve.client.cli", "status", "--server", address],
        capture_output=True,
        text=True,
        timeout=60,
    )
    elapsed = time.monotonic() - start
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == f"gradserve: error: Unavailable: no gradserve server at {address} (connection refused)\n"
    # Python's start and imports included: a generous bound on a busy 2-core machine (it was 23 s).
    assert elapsed < 2 * FAST, f"took {elapsed:.1f}s"


def test_cli_a_malformed_server_address_is_exit_status_2(capsys):
    with pytest.raises(SystemExit) as info:
        cli_main(["status", "--server", "127.0.0.1:abc"])
    assert info.value.code == 2
    assert "port 'abc' is not a number from 1 to 65535" in capsys.readouterr().err


def test_cli_grad_timeout_fails_and_the_server_cancels_the_job(tmp_path, capsys):
    model_path, feeds_path = _files(tmp_path, 44)
    engine = GatedEngine()  # the job never finishes on its own
    with serving(lambda: engine) as srv:
        argv = [
            "grad",
            model_path,
            "--feeds",
            feeds_path,
            "--out",
            str(tmp_path / "g.npz"),
            "-q",
            "--server",
            srv.address,
            "--timeout",
            "1",
        ]
        code, err, elapsed = _cli(argv, capsys)
        assert code == 1 and elapsed < FAST
        assert err == (
            "gradserve: error: DeadlineExceeded: the job did not finish within --timeout 1 s; the server cancels it\n"
        )
        deadline = time.monotonic() + 10
        while srv.registry.jobs() and time.monotonic() < deadline:  # wait for the cancellation to land
            time.sleep(0.02)
        assert srv.registry.jobs() == []
        with Client(srv.address) as c:
            assert c.server_status().jobs_ended.get("cancelled") == 1


def test_cli_grad_timeout_needs_a_server(tmp_path, capsys):
    model_path, feeds_path = _files(tmp_path, 45)
    code, err, _ = _cli(
        ["grad", model_path, "--feeds", feeds_path, "--out", str(tmp_path / "g.npz"), "--timeout", "5"], capsys
    )
    assert code == 2 and err == "gradserve: error: --timeout goes with --server\n"
    with pytest.raises(SystemExit):
        cli_main(["grad", model_path, "--feeds", feeds_path, "--out", "x", "--server", "h", "--timeout", "0"])
    assert "expected a number of seconds > 0" in capsys.readouterr().err
