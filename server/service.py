"""The gRPC GradientService server and ``gradserve serve``.

:class:`GradientServer` wires everything together: the servicer (:mod:`gradserve.server.servicer`),
the model store, the job registry on top of one engine, bearer-token auth, TLS, health checking,
reflection and Prometheus metrics (:mod:`gradserve.server.metrics`). :func:`serve_forever` is what
``gradserve serve`` runs; :func:`configure_logging` sets up its log (text or JSON lines).
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gradserve.server.auth import BearerTokenInterceptor
from gradserve.server.engines import EngineFactory, EngineRunner, engine_factory
from gradserve.server.jobs import JobRegistry
from gradserve.server.limits import Limits
from gradserve.server.metrics import ServerMetrics, serve_metrics
from gradserve.server.models import ModelStore
from gradserve.server.state import StateDir
from gradserve.server.servicer import SERVICE_NAME, GradientServicer, generic_handler
from gradserve.server.sessions import SessionRegistry
from gradserve.server.settings import ServerSettings

__all__ = ["GradientServer", "Limits", "SERVICE_NAME", "configure_logging", "serve_forever"]

log = logging.getLogger("gradserve.server")


class GradientServer:
    """A GradientService server, usable from Python and tests::

        server = GradientServer(lambda: InlineEngine(), "127.0.0.1:0")
        address = server.start()          # "127.0.0.1:PORT"
        ...
        server.stop(grace=5)

    ``engine_factory`` builds the one engine all jobs share (default: the Ray engine when it is
    available, else the inline engine). ``auth_token`` requires ``authorization: Bearer <token>``
    on every call but health checks; ``tls_cert``/``tls_key`` (PEM bytes) serve TLS.
    ``metrics_address`` (HOST:PORT): serve Prometheus metrics at ``http://HOST:PORT/metrics``
    (``self.metrics_address`` is the bound one); the metrics are kept either way
    (``self.metrics.registry``), in a registry of this server's own. ``state_dir``: keep models,
    accepted asynchronous jobs and unfetched results there (:mod:`gradserve.server.state`), and take
    them back at start; None keeps everything in memory.
    """

    def __init__(
        self,
        engine_factory: EngineFactory | None = None,
        address: str = "127.0.0.1:0",
        *,
        limits: Limits = Limits(),
        auth_token: str | None = None,
        tls_cert: bytes | None = None,
        tls_key: bytes | None = None,
        rpc_threads: int = 64,
        metrics_address: str | None = None,
        state_dir: str | None = None,
    ) -> None:
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("TLS needs both a certificate and its private key")
        self._factory = engine_factory
        self.requested_address = address
        self.limits = limits
        self._auth_token = auth_token
        self._tls = (tls_key, tls_cert) if tls_cert is not None else None
        self._rpc_threads = rpc_threads
        self.address: str | None = None
        self._server: grpc.Server | None = None
        self._health: health.HealthServicer | None = None
        self._runner: EngineRunner | None = None
        self.registry: JobRegistry | None = None
        self.store: ModelStore | None = None
        self.servicer: GradientServicer | None = None
        self.metrics = ServerMetrics()
        self.requested_metrics_address = metrics_address
        self.state_dir = state_dir
        self.state: StateDir | None = None
        self.metrics_address: str | None = None
        self._metrics_http = None
        self._stopped = threading.Event()

    def start(self) -> str:
        """Build the engine, bind, start serving; return the bound ``HOST:PORT``."""
        factory = self._factory or engine_factory(None)
        self._runner = EngineRunner(factory())
        try:
            return self._start()
        except BaseException:
            self._runner.close()  # do not leak an engine (e.g. Ray workers) when binding fails
            if self.registry is not None:
                self.registry.shutdown(0)
            if self.state is not None:
                self.state.close()
            if self._server is not None:
                self._server.stop(0)
            self._stop_metrics()
            raise

    def _start(self) -> str:
        assert self._runner is not None
        limits = self.limits
        if self.state_dir is not None:
            self.state = StateDir(self.state_dir, limits.max_state_bytes)
        self.store = ModelStore(max(limits.max_store_bytes, limits.max_model_bytes), self.state)
        self.registry = JobRegistry(
            self._runner,
            max_concurrent=limits.max_concurrent_jobs,
            max_queued=limits.max_queued_jobs,
            result_ttl=limits.result_ttl,
            metrics=self.metrics,
            state=self.state,
        )
        if self.state is not None:
            self.registry.recover(self.store)
            log.info(
                "state directory %s: %d models, %d jobs kept",
                self.state.path,
                len(self.store),
                len(self.registry.jobs()),
            )
        sessions = SessionRegistry(
            self._runner.session,
            idle_ttl=limits.session_idle_ttl,
            max_per_client=limits.max_sessions_per_client,
            state=self.state,
            checkpoint_steps=limits.session_checkpoint_steps,
            checkpoint_seconds=limits.session_checkpoint_seconds,
        )
        if self.state is not None and sessions.recover(self.store):
            log.info("state directory %s: %d training sessions reopened", self.state.path, sessions.open_count())
        self.servicer = GradientServicer(self.store, self.registry, self._runner, limits, self.metrics, sessions)
        servicer = self.servicer
        from gradserve.server.status import state

        self.metrics.watch(lambda: state(servicer))
        # RPCs are counted first, so that calls the token check turns away are counted too.
        interceptors = [self.metrics.interceptor()]
        if self._auth_token:
            interceptors.append(BearerTokenInterceptor(self._auth_token))
        server = grpc.server(
            ThreadPoolExecutor(max_workers=self._rpc_threads, thread_name_prefix="gradserve-rpc"),
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", limits.max_message_bytes),
                ("grpc.max_send_message_length", limits.max_message_bytes),
                ("grpc.so_reuseport", 0),  # port 0 must mean a port nobody else holds
            ],
        )
        server.add_generic_rpc_handlers((generic_handler(self.servicer),))
        self._health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
        )
        try:
            if self._tls:
                port = server.add_secure_port(self.requested_address, grpc.ssl_server_credentials([self._tls]))
            else:
                port = server.add_insecure_port(self.requested_address)
        except RuntimeError as exc:  # grpc raises RuntimeError for a busy or malformed address
            raise OSError(f"cannot listen on {self.requested_address}: {exc}") from None
        if not port:
            raise OSError(f"cannot listen on {self.requested_address}")
        if self.requested_metrics_address:  # before serving: a busy metrics port fails the start
            self._metrics_http, self.metrics_address = serve_metrics(self.metrics, self.requested_metrics_address)
        server.start()
        self._server = server
        for name in ("", SERVICE_NAME):
            self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        host = self.requested_address.rpartition(":")[0] or "0.0.0.0"
        self.address = f"{host}:{port}"
        log.info(
            "serving %s on %s (engine %s, %s, %s%s)",
            SERVICE_NAME,
            self.address,
            self._runner.name,
            "TLS" if self._tls else "plaintext",
            "token auth" if self._auth_token else "no auth",
            f", metrics on http://{self.metrics_address}/metrics" if self.metrics_address else "",
        )
        return self.address

    def _stop_metrics(self) -> None:
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
            self._metrics_http = None

    @property
    def stats(self) -> dict[str, int]:
        """Counters: uploads, uploads_skipped, upload_chunks, has_model_calls, jobs."""
        assert self.servicer is not None, "server not started"
        counters = self.servicer.counters()
        counters.pop("rejected")
        return counters

    def stop(self, grace: float = 5.0) -> None:
        """Stop accepting calls, let running jobs finish for up to ``grace`` seconds (then cancel
        them), end open calls, release the engine. Idempotent."""
        if self._stopped.is_set() or self._server is None:
            return
        self._stopped.set()
        log.info("shutting down (grace %.1fs)", grace)
        assert self._health and self.registry and self._runner
        self._health.enter_graceful_shutdown()  # probes see NOT_SERVING from now on
        done = self._server.stop(grace)  # no new calls; open ones get up to `grace`
        self.registry.shutdown(grace)
        done.wait(grace + 5.0)
        if self.servicer is not None:
            self.servicer.sessions.close_all()  # their weights go with the engine
        try:
            self._runner.close()
        except Exception:  # noqa: BLE001 -- shutting down anyway; say what failed
            log.exception("closing the engine failed")
        self._stop_metrics()  # last: a scrape during the grace period still sees the jobs end
        if self.state is not None:
            self.state.close()
        log.info("stopped")

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        """Block until :meth:`stop` was called (True) or ``timeout`` passed (False)."""
        return self._stopped.wait(timeout)

    def __enter__(self) -> "GradientServer":
        if self._server is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line, for log shippers: ``time`` (ISO 8601, UTC), ``level``,
    ``logger``, ``message``, the record's ``fields`` (``extra={"fields": {...}}``: a job's outcome
    line carries job_id, model_id, outcome, code, partitions, micro_batches, replicas,
    queued_seconds, run_seconds and loss or error) and, for errors logged with one, ``traceback``."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in (getattr(record, "fields", None) or {}).items():
            out.setdefault(key, value)
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str = "info", log_format: str = "text") -> None:
    """The server's log on stderr: gradserve's loggers at ``level``, every line (Ray's and gRPC's
    Python loggers included) as text or as JSON (:class:`JsonLogFormatter`)."""
    if log_format not in ("text", "json"):
        raise ValueError(f"log format must be text or json, not {log_format!r}")
    logging.getLogger("gradserve").setLevel(getattr(logging, level.upper()))
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler())
    formatter = JsonLogFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    for handler in root.handlers:
        handler.setFormatter(formatter)


def _stop_on_signals(stop: threading.Event) -> None:
    """SIGINT and SIGTERM set ``stop`` (only the main thread may install signal handlers)."""
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda signum, frame: stop.set())


def serve_forever(settings: ServerSettings) -> None:
    """Run ``gradserve serve`` with ``settings`` until SIGINT/SIGTERM, then shut down gracefully."""
    configure_logging(settings.log_level, settings.log_format)
    server = GradientServer(
        engine_factory(settings.engine, ray_address=settings.ray_address),
        settings.address,
        limits=settings.limits,
        auth_token=settings.auth_token,
        tls_cert=settings.tls_cert,
        tls_key=settings.tls_key,
        metrics_address=settings.metrics_address,
        state_dir=settings.state_dir,
    )
    stop = threading.Event()
    _stop_on_signals(stop)  # a signal while the engine starts stops the server right after
    address = server.start()
    # Again: Ray's core worker, started in the driver with the engine, installs its C++ failure
    # handler for SIGTERM too, which prints "*** SIGTERM received ..." and a stack trace twice
    # before passing the signal on -- a graceful stop that looks like a crash. Ours replaces it for
    # SIGINT/SIGTERM only; the crash signals (SIGSEGV, SIGABRT...) keep Ray's traces.
    _stop_on_signals(stop)
    print(f"listening on {address}", flush=True)  # scripts wait for this line
    if server.metrics_address:
        print(f"metrics on http://{server.metrics_address}/metrics", flush=True)
    try:
        while not stop.wait(1.0):  # wake up now and then: signals are handled between waits
            pass
    finally:
        if settings.log_format == "json":  # stderr holds JSON lines only
            log.info("signal received: shutting down")
        else:
            print("shutting down", file=sys.stderr, flush=True)
        server.stop(settings.grace)
