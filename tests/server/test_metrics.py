"""Prometheus metrics (``gradserve serve --metrics-address``): a real server on a free port, jobs
through gradserve.Client, then ``/metrics`` scraped over HTTP and parsed with prometheus_client's
own parser. Also: two servers in one process keep their own metrics, and the KubeRay manifests
let a Prometheus find the endpoint."""

from __future__ import annotations

import json
import re
from pathlib import Path

import grpc
import numpy as np
import pytest

import gradserve
from gradserve.client.remote import Cancelled, Client, InvalidArgument
from gradserve.proto.v1 import service_pb2, service_pb2_grpc
from gradserve.server.limits import Limits
from scraping import scrape, total, value
from serving import REFERENCE, GatedEngine, assert_same, batch, mlp, serving

ROOT = Path(__file__).resolve().parents[2]


def gather_model():
    """A model that passes every check at submit but fails when it runs on an index out of range."""
    m = gradserve.ModelBuilder()
    i = m.input("i", (None,), np.int64)
    w = m.param("w", np.ones((4, 3), np.float32))
    return m.loss(m.op("Gather", w, i).sum())


def test_metrics_count_jobs_by_outcome_over_http():
    engine = GatedEngine()
    with (
        serving(lambda: engine, limits=Limits(max_concurrent_jobs=1), metrics_address="127.0.0.1:0") as srv,
        Client(srv.address, timeout=30) as c,
    ):
        assert srv.metrics_address and srv.metrics_address != "127.0.0.1:0"
        model, feeds = mlp(31), batch(31)
        running = c.submit(model, feeds)
        assert engine.started.wait(5)
        queued = c.submit(model, feeds)
        now = scrape(srv.metrics_address)
        assert value(now, "gradserve_jobs_running") == 1 and value(now, "gradserve_jobs_queued") == 1
        assert value(now, "gradserve_pending_bytes") == 2 * sum(a.nbytes for a in feeds.values())

        # Two cancelled (one queued, one running), one done, one failed at run time, one rejected.
        queued.cancel()
        running.cancel()
        for job in (queued, running):
            with pytest.raises(Cancelled):
                job.result(timeout=10)
        engine.gate.set()
        assert_same(c.gradients(model, feeds), REFERENCE.gradients(model, feeds))
        with pytest.raises(InvalidArgument, match="gather"):
            c.gradients(gather_model(), {"i": np.array([1, 9])})
        with pytest.raises(InvalidArgument, match="feed 'x'"):
            c.gradients(model, {"x": np.zeros((2, 5), np.float32), "y": np.zeros((2, 1), np.float32)})

        m = scrape(srv.metrics_address)
        assert value(m, "gradserve_jobs_total", outcome="done", code="OK") == 1
        assert value(m, "gradserve_jobs_total", outcome="failed", code="INVALID_ARGUMENT") == 1
        assert value(m, "gradserve_jobs_total", outcome="cancelled", code="CANCELLED") == 2
        assert value(m, "gradserve_jobs_total", outcome="rejected", code="INVALID_ARGUMENT") == 1
        assert total(m, "gradserve_jobs_total") == 5
        # Started: the running one cancelled, the done one, the failed one (the queued one never ran).
        assert value(m, "gradserve_job_queue_seconds_count") == 3
        assert value(m, "gradserve_job_run_seconds_count") == 3
        assert value(m, "gradserve_job_run_seconds_bucket", le="+Inf") == 3
        assert value(m, "gradserve_jobs_running") == 0 and value(m, "gradserve_jobs_queued") == 0
        assert value(m, "gradserve_jobs_max_concurrent") == 1
        assert value(m, "gradserve_pending_bytes") == 0

        assert value(m, "gradserve_model_store_models") == len(srv.store) == 2
        assert value(m, "gradserve_model_store_bytes") == srv.store.nbytes
        assert value(m, "gradserve_upload_bytes_total", kind="model") == srv.store.nbytes
        feed_bytes = sum(a.nbytes for a in feeds.values())
        # Every feed byte received counts, the rejected job's (2x5 + 2x1 float32) too.
        assert value(m, "gradserve_upload_bytes_total", kind="feeds") == 3 * feed_bytes + 16 + 48

        # RPCs by method and code.
        assert value(m, "gradserve_rpcs_total", method="GradientService/Submit", code="OK") == 2
        assert value(m, "gradserve_rpcs_total", method="GradientService/Cancel", code="OK") == 2
        assert value(m, "gradserve_rpcs_total", method="GradientService/FetchResult", code="CANCELLED") == 2
        assert value(m, "gradserve_rpcs_total", method="GradientService/Compute", code="OK") == 1
        assert value(m, "gradserve_rpcs_total", method="GradientService/Compute", code="INVALID_ARGUMENT") == 2
        assert value(m, "gradserve_rpcs_total", method="GradientService/UploadModel", code="OK") == 2

        # The inline engine computes on this machine, with no worker actors.
        assert value(m, "gradserve_pool_nodes") == 1
        assert total(m, "gradserve_pool_actors") == 0
        assert total(m, "gradserve_node_cpus") >= 1
        assert value(m, "gradserve_info", version=gradserve_version(), engine="gated") == 1
        assert value(m, "gradserve_start_time_seconds") > 0


def gradserve_version() -> str:
    from gradserve.server.status import version

    return version()


def test_rpcs_turned_away_by_the_token_are_counted():
    with serving(auth_token="tok", metrics_address="127.0.0.1:0") as srv:
        with grpc.insecure_channel(srv.address) as channel:
            stub = service_pb2_grpc.GradientServiceStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                stub.HasModel(service_pb2.ModelRef(model_id="x"), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            reply = stub.HasModel(
                service_pb2.ModelRef(model_id="x"), metadata=(("authorization", "Bearer tok"),), timeout=5
            )
            assert not reply.present
        m = scrape(srv.metrics_address)
        assert value(m, "gradserve_rpcs_total", method="GradientService/HasModel", code="UNAUTHENTICATED") == 1
        assert value(m, "gradserve_rpcs_total", method="GradientService/HasModel", code="OK") == 1


def test_two_servers_in_one_process_keep_their_own_metrics():
    with (
        serving(metrics_address="127.0.0.1:0") as a,
        serving(metrics_address="127.0.0.1:0") as b,
        Client(a.address, timeout=30) as c,
    ):
        c.gradients(mlp(32), batch(32))
        c.gradients(mlp(32), batch(33))
        assert a.metrics.registry is not b.metrics.registry
        assert value(scrape(a.metrics_address), "gradserve_jobs_total", outcome="done", code="OK") == 2
        assert value(scrape(b.metrics_address), "gradserve_jobs_total", outcome="done", code="OK") == 0
    # Without --metrics-address nothing is served, but the metrics are kept all the same.
    with serving() as srv, Client(srv.address, timeout=30) as c:
        c.gradients(mlp(33), batch(33))
        assert srv.metrics_address is None
        assert srv.metrics.registry.get_sample_value("gradserve_jobs_total", {"outcome": "done", "code": "OK"}) == 1


def test_a_busy_metrics_port_fails_the_start():
    with serving(metrics_address="127.0.0.1:0") as srv:
        from gradserve.server.inline import InlineEngine
        from gradserve.server.service import GradientServer

        other = GradientServer(InlineEngine, "127.0.0.1:0", metrics_address=srv.metrics_address)
        with pytest.raises(OSError, match="cannot serve metrics"):
            other.start()


# -- deployment ------------------------------------------------------------------------------------


def _serve_container(cluster: dict) -> dict:
    containers = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "gradserve")


def test_kuberay_pod_is_annotated_for_prometheus():
    yaml = pytest.importorskip("yaml", reason="PyYAML (a Ray dependency) is not installed")
    docs = [d for d in yaml.safe_load_all((ROOT / "deploy/kuberay/raycluster.yaml").read_text()) if d]
    cluster = next(d for d in docs if d["kind"] == "RayCluster")
    head = cluster["spec"]["headGroupSpec"]["template"]
    notes = head["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true" and notes["prometheus.io/path"] == "/metrics"
    server = _serve_container(cluster)
    command = " ".join(server["args"])
    metrics_port = int(re.search(r"--metrics-address 0\.0\.0\.0:(\d+)", command).group(1))
    assert int(notes["prometheus.io/port"]) == metrics_port
    assert {"name": "metrics", "containerPort": metrics_port} in [
        {k: p[k] for k in ("name", "containerPort")} for p in server["ports"]
    ]
    # The Service exposes it too, under the same name (a ServiceMonitor or endpoints discovery).
    service = next(
        d
        for d in yaml.safe_load_all((ROOT / "deploy/kuberay/gradserve.yaml").read_text())
        if d and d["kind"] == "Service"
    )
    port = next(p for p in service["spec"]["ports"] if p["name"] == "metrics")
    assert port["port"] == metrics_port and port["targetPort"] == "metrics"
    assert service["metadata"]["annotations"]["prometheus.io/port"] == str(metrics_port)


def test_grafana_dashboard_uses_exported_metrics():
    dashboard = json.loads((ROOT / "deploy/grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(dashboard["panels"]) >= 5 and exprs
    with serving(metrics_address="127.0.0.1:0") as srv, Client(srv.address, timeout=30) as c:
        c.gradients(mlp(34), batch(34))
        names = {n for n, _ in scrape(srv.metrics_address)}
    used = {name for e in exprs for name in re.findall(r"gradserve_[a-z_]+", e)}
    assert used and used <= names, f"not exported: {sorted(used - names)}"
