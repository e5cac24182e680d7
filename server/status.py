"""The server as operators see it: what ``GetServerStatus`` answers (``gradserve status``) and the
gauges ``/metrics`` reads at each scrape (:mod:`gradserve.server.metrics`). Read-only."""

from __future__ import annotations

import socket
import time
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from gradserve.proto.v1 import service_pb2
from gradserve.server.job import QUEUED, RUNNING, Job
from gradserve.server.job_status import status_message

if TYPE_CHECKING:
    from gradserve.server.servicer import GradientServicer


@lru_cache(maxsize=1)
def version() -> str:
    """gradserve's installed version ("unknown" when it runs from a tree that is not installed)."""
    from importlib.metadata import PackageNotFoundError, version as dist_version

    try:
        return dist_version("gradserve")
    except PackageNotFoundError:
        return "unknown"


def nodes(engine: Any) -> list[dict[str, Any]]:
    """The machines that compute: the engine's own view (``engine.status()["nodes"]``, the Ray
    engine: the cluster's nodes and the pool's actors on each), else this machine (the inline
    engine computes in the server process, with no worker actors)."""
    status = getattr(engine, "status", None)
    if status is not None:
        return list(status()["nodes"])
    from gradserve.server.planning.memory import machine_node

    this = machine_node()
    return [
        {
            "node_id": socket.gethostname(),
            "address": "",
            "cpus": this.cpus,
            "memory_bytes": this.memory_bytes,
            "actors": 0,
            "busy_actors": 0,
            "alive": True,
        }
    ]


def _active_jobs(servicer: "GradientServicer") -> list[Job]:
    """Jobs queued or running, oldest first."""
    jobs = [j for j in servicer.registry.jobs() if j.state in (QUEUED, RUNNING)]
    return sorted(jobs, key=lambda j: j.submitted)


def _stored(servicer: "GradientServicer") -> list:
    """The model store's entries, least recently used first."""
    return servicer.store.entries()


def state(servicer: "GradientServicer") -> dict[str, Any]:
    """What the metrics' gauges read at a scrape (see :class:`gradserve.server.metrics._StateCollector`)."""
    jobs = _active_jobs(servicer)
    return {
        "version": version(),
        "engine": servicer.runner.name,
        "started": servicer.started,
        "queued": sum(j.state == QUEUED for j in jobs),
        "running": sum(j.state == RUNNING for j in jobs),
        "max_concurrent": servicer.registry.max_concurrent,
        "pending_bytes": servicer.pending.used,
        "store_bytes": servicer.store.nbytes,
        "store_models": len(servicer.store),
        "store_max_bytes": servicer.store.max_bytes,
        "nodes": nodes(servicer.runner.engine),
        "sessions": servicer.sessions.open_count(),
        "session_steps": servicer.sessions.steps,
    }


def server_status(servicer: "GradientServicer") -> service_pb2.ServerStatus:
    """The reply of ``GetServerStatus``."""
    registry = servicer.registry
    counts = registry.counts()
    ended, retries = counts.ended, counts.retries
    ended["rejected"] = servicer.counters()["rejected"]
    msg = service_pb2.ServerStatus(
        version=version(),
        engine=servicer.runner.name,
        uptime_seconds=max(0.0, time.time() - servicer.started),
        jobs=[status_message(j.snapshot()) for j in _active_jobs(servicer)],
        models=[
            service_pb2.ModelInfo(
                model_id=m.model_id, present=True, parameter_bytes=m.nbytes, parameter_count=len(m.model.params)
            )
            for m in _stored(servicer)
        ],
        max_concurrent_jobs=registry.max_concurrent,
        max_queued_jobs=registry.max_queued,
        model_store_bytes=servicer.store.nbytes,
        model_store_max_bytes=servicer.store.max_bytes,
        pending_bytes=servicer.pending.used,
        jobs_ended={k: int(v) for k, v in ended.items()},
        worker_retries=retries,
        sessions=[service_pb2.SessionStatus(**s) for s in servicer.sessions.snapshot()],
        session_steps=servicer.sessions.steps,
    )
    for n in nodes(servicer.runner.engine):
        msg.nodes.add(
            node_id=n["node_id"],
            address=n.get("address", ""),
            cpus=float(n.get("cpus", 0)),
            memory_bytes=int(n.get("memory_bytes", 0)),
            actors=int(n.get("actors", 0)),
            busy_actors=int(n.get("busy_actors", 0)),
            alive=bool(n.get("alive", True)),
        )
    return msg
