"""Prometheus metrics of one server (``gradserve serve --metrics-address HOST:PORT`` serves them
at ``/metrics``).

Every server has its own :class:`~prometheus_client.CollectorRegistry` (not the process-wide
default one), so several servers in one process -- tests, notebooks -- never share or clash over
a metric. Counters and histograms are updated as things happen (jobs ending, uploads, RPCs); the
gauges (jobs queued and running, the model store, the worker pool) are read from the server's
state at scrape time by :class:`_StateCollector`, so they cannot drift.

Names (see README, "Operating"):

======================================  =========  ==============================================
gradserve_jobs_total{outcome,code}      counter    jobs that ended: outcome done, failed, cancelled
                                                   or rejected (refused at submit); code the gRPC
                                                   status code name (OK, INVALID_ARGUMENT, ...)
gradserve_job_queue_seconds             histogram  time from submit to start, of jobs that started
gradserve_job_run_seconds               histogram  time from start to end, of jobs that started
gradserve_jobs_queued / _running        gauge      jobs waiting / computing now
gradserve_jobs_max_concurrent           gauge      jobs that may compute at once now
gradserve_upload_bytes_total{kind}      counter    tensor bytes received: kind model or feeds
gradserve_pending_bytes                 gauge      uploads in flight + feeds of queued/running jobs
gradserve_model_store_bytes / _models   gauge      the model store's size and model count
gradserve_model_store_max_bytes         gauge      its budget (--max-store-bytes)
gradserve_pool_nodes                    gauge      alive nodes that compute (inline engine: 1)
gradserve_pool_actors{node}             gauge      worker actors of the pool on each node
gradserve_pool_busy_actors{node}        gauge      of those, running a job's steps now
gradserve_node_cpus{node}               gauge      CPUs of each node
gradserve_node_memory_bytes{node}       gauge      memory of each node (Ray's memory resource)
gradserve_worker_retries_total          counter    jobs run again after losing a worker
gradserve_rpcs_total{method,code}       counter    RPCs ended, by method (Service/Method) and code
gradserve_info{version,engine}          gauge      1, labelled with what runs
gradserve_start_time_seconds            gauge      when the server started (Unix time)
======================================  =========  ==============================================
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from gradserve.server.handlers import like

log = logging.getLogger("gradserve.server")

# Seconds: a tiny job takes a few ms, a large one minutes; queueing anything from 0 to minutes.
SECONDS_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
)
OUTCOMES = ("done", "failed", "cancelled", "rejected")


class ServerMetrics:
    """The metrics of one server, in a registry of its own (``self.registry``)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.jobs = Counter(
            "gradserve_jobs",
            "Jobs that ended, by outcome (done, failed, cancelled, rejected at submit) and gRPC status code",
            ["outcome", "code"],
            registry=r,
        )
        self.queue_seconds = Histogram(
            "gradserve_job_queue_seconds",
            "Seconds jobs waited between submit and start",
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.run_seconds = Histogram(
            "gradserve_job_run_seconds", "Seconds jobs computed, from start to end", buckets=SECONDS_BUCKETS, registry=r
        )
        self.upload_bytes = Counter(
            "gradserve_upload_bytes", "Tensor bytes received, by kind (model, feeds)", ["kind"], registry=r
        )
        self.worker_retries = Counter(
            "gradserve_worker_retries", "Jobs run again on fresh workers after losing one", registry=r
        )
        self.rpcs = Counter(
            "gradserve_rpcs",
            "RPCs that ended, by method (Service/Method) and gRPC status code",
            ["method", "code"],
            registry=r,
        )
        for kind in ("model", "feeds"):  # present (at 0) from the first scrape
            self.upload_bytes.labels(kind)

    def job_ended(self, outcome: str, code: str, run_seconds: float | None) -> None:
        """Count a job that ended (``run_seconds`` None: it never started). Its queue time was
        observed when it started (``queue_seconds``)."""
        self.jobs.labels(outcome, code).inc()
        if run_seconds is not None:
            self.run_seconds.observe(run_seconds)

    def watch(self, state: Callable[[], dict[str, Any]]) -> None:
        """Read the gauges from ``state()`` at each scrape (see :class:`_StateCollector`)."""
        self.registry.register(_StateCollector(state))

    def interceptor(self) -> grpc.ServerInterceptor:
        """A server interceptor counting every RPC by method and status code (install it first, so
        calls that authentication turns away are counted too)."""
        return _RpcCounter(self.rpcs)


class _StateCollector(Collector):
    """Gauges read at scrape time. ``state()`` returns a dict with: version, engine, started (Unix
    time), queued, running, max_concurrent, pending_bytes, store_bytes, store_models,
    store_max_bytes, sessions, session_steps, and nodes: a list of dicts (node_id, cpus, memory_bytes, actors, busy_actors,
    alive) as :mod:`gradserve.server.status` builds them."""

    def __init__(self, state: Callable[[], dict[str, Any]]) -> None:
        self._state = state

    def describe(self) -> Iterable:
        return []  # the names depend on nothing the registry must check up front

    def collect(self) -> Iterable:
        try:
            s = self._state()
        except Exception:  # noqa: BLE001 -- a scrape must not fail because the cluster hiccuped
            log.warning("reading the server's state for /metrics failed", exc_info=True)
            return
        info = GaugeMetricFamily(
            "gradserve_info", "The server: gradserve version and engine", labels=["version", "engine"]
        )
        info.add_metric([s["version"], s["engine"]], 1)
        yield info
        yield GaugeMetricFamily(
            "gradserve_start_time_seconds", "When the server started (Unix time)", value=s["started"]
        )
        for name, key, text in (
            ("gradserve_jobs_queued", "queued", "Jobs waiting to start"),
            ("gradserve_jobs_running", "running", "Jobs computing now"),
            ("gradserve_jobs_max_concurrent", "max_concurrent", "Jobs that may compute at once now"),
            (
                "gradserve_pending_bytes",
                "pending_bytes",
                "Bytes of uploads in flight and feeds of queued and running jobs",
            ),
            ("gradserve_model_store_bytes", "store_bytes", "Bytes of the stored models' parameters and constants"),
            ("gradserve_model_store_models", "store_models", "Models stored"),
            ("gradserve_model_store_max_bytes", "store_max_bytes", "The model store's budget in bytes"),
            ("gradserve_sessions_open", "sessions", "Training sessions open"),
        ):
            yield GaugeMetricFamily(name, text, value=s[key])
        yield CounterMetricFamily(
            "gradserve_session_steps", "Training steps applied by all sessions since start", value=s["session_steps"]
        )
        nodes = [n for n in s["nodes"] if n.get("alive", True)]
        yield GaugeMetricFamily("gradserve_pool_nodes", "Alive nodes that compute", value=len(nodes))
        per_node = {
            "gradserve_pool_actors": ("actors", "Worker actors of the pool, per node"),
            "gradserve_pool_busy_actors": ("busy_actors", "Worker actors running a job's steps now, per node"),
            "gradserve_node_cpus": ("cpus", "CPUs of each node"),
            "gradserve_node_memory_bytes": ("memory_bytes", "Memory of each node in bytes"),
        }
        for name, (key, text) in per_node.items():
            family = GaugeMetricFamily(name, text, labels=["node"])
            for n in s["nodes"]:
                family.add_metric([n["node_id"]], n.get(key, 0))
            yield family


class _RpcCounter(grpc.ServerInterceptor):
    """Counts each RPC once when it ends, with the status code it ended with."""

    def __init__(self, counter: Counter) -> None:
        self._counter = counter
        # method -> (the handler gRPC gave, its counting wrapper): the service's handlers are the
        # same objects call after call, so each is wrapped once, not on every call
        self._wrapped: dict[str, tuple[Any, Any]] = {}

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None  # unknown method: gRPC answers UNIMPLEMENTED
        cached = self._wrapped.get(handler_call_details.method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, handler_call_details.method)
        self._wrapped[handler_call_details.method] = (handler, wrapped)
        return wrapped

    def _wrap(self, handler, full_method: str):
        service, _, method = full_method.strip("/").rpartition("/")
        label = f"{service.rpartition('.')[2]}/{method}"
        count = self._counter
        if handler.response_streaming:
            inner = handler.unary_stream or handler.stream_stream

            def behaviour(request, context):
                code = "OK"
                try:
                    yield from inner(request, context)
                except GeneratorExit:  # the client went away while the reply streamed
                    code = _code(context, "CANCELLED")
                    raise
                except BaseException:
                    code = _code(context, "UNKNOWN")
                    raise
                finally:
                    count.labels(label, code).inc()
        else:
            inner = handler.unary_unary or handler.stream_unary

            def behaviour(request, context):
                try:
                    reply = inner(request, context)
                except BaseException:
                    count.labels(label, _code(context, "UNKNOWN")).inc()
                    raise
                count.labels(label, "OK").inc()
                return reply

        return like(handler, behaviour)


def _code(context: grpc.ServicerContext, default: str) -> str:
    """The status code a failed handler set (``context.abort``), else ``default``."""
    try:
        code = context.code()
    except Exception:  # noqa: BLE001 -- a context without code(): older grpc
        code = None
    return code.name if isinstance(code, grpc.StatusCode) else default


def serve_metrics(metrics: ServerMetrics, address: str) -> tuple[Any, str]:
    """Serve ``/metrics`` of ``metrics`` over HTTP at ``address`` (HOST:PORT, port 0 picks one) on a
    daemon thread; returns the HTTP server (``.shutdown()`` stops it) and the bound HOST:PORT."""
    from prometheus_client import start_http_server

    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--metrics-address must be HOST:PORT, got {address!r}")
    host = host.strip("[]") or "0.0.0.0"
    try:
        httpd, _ = start_http_server(int(port), addr=host, registry=metrics.registry)
    except OSError as exc:
        raise OSError(f"cannot serve metrics on {address}: {exc.strerror or exc}") from None
    bound = httpd.server_address[1]
    return httpd, f"{host}:{bound}"
