"""A server's status for operators: ``gradserve status --server HOST:PORT``.

    from gradserve.client.remote import Client
    from gradserve.client.status import server_status, format_status

    with Client("host:50051", token_file="token") as client:
        status = server_status(client)          # a ServerStatus
        print(format_status(status))

It calls the ``GetServerStatus`` RPC, which needs the bearer token like every other call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gradserve.client.remote import STATE_NAMES
from gradserve.proto.v1 import service_pb2

if TYPE_CHECKING:
    from gradserve.client.remote import Client


@dataclass(frozen=True)
class NodeStatus:
    """A machine that computes: a Ray node (Ray engine) or the server's machine (inline engine)."""

    node_id: str
    address: str
    cpus: float
    memory_bytes: int
    actors: int  # worker actors of the server's pool on this node
    busy_actors: int  # of those, running a job's steps now
    alive: bool = True


@dataclass(frozen=True)
class ServerJob:
    """A job queued or running on the server, with its progress."""

    job_id: str
    model_id: str
    state: str  # queued or running
    steps_done: int
    steps_total: int  # 0 while the engine has yet to choose partitions/micro-batches/replicas
    queued_seconds: float
    running_seconds: float
    cancel_requested: bool = False

    @classmethod
    def from_proto(cls, msg: service_pb2.JobStatus) -> "ServerJob":
        return cls(
            msg.job_id,
            msg.model_id,
            STATE_NAMES.get(msg.state, "unknown"),
            msg.steps_done,
            msg.steps_total,
            msg.queued_seconds,
            msg.running_seconds,
            msg.message == "cancel requested",
        )


@dataclass(frozen=True)
class StoredModel:
    model_id: str
    bytes: int  # parameters and constants
    parameters: int  # how many parameters


@dataclass(frozen=True)
class OpenSession:
    """A training session the server holds."""

    session_id: str
    model_id: str
    steps: int
    idle_seconds: float
    partitions: int  # 0 until its first step places it
    replicas: int


@dataclass(frozen=True)
class ServerStatus:
    """What ``GetServerStatus`` answers (see ``proto/v1/service.proto``)."""

    version: str
    engine: str
    uptime_seconds: float
    nodes: list[NodeStatus]
    jobs: list[ServerJob]  # queued and running, oldest first
    models: list[StoredModel]  # least recently used first
    max_concurrent_jobs: int
    max_queued_jobs: int
    model_store_bytes: int
    model_store_max_bytes: int
    pending_bytes: int
    jobs_ended: dict[str, int] = field(default_factory=dict)  # outcome -> jobs since start
    worker_retries: int = 0
    sessions: list[OpenSession] = field(default_factory=list)  # open training sessions, oldest first
    session_steps: int = 0  # training steps applied since start

    @property
    def queued(self) -> list[ServerJob]:
        return [j for j in self.jobs if j.state == "queued"]

    @property
    def running(self) -> list[ServerJob]:
        return [j for j in self.jobs if j.state == "running"]

    @classmethod
    def from_proto(cls, msg: service_pb2.ServerStatus) -> "ServerStatus":
        return cls(
            version=msg.version,
            engine=msg.engine,
            uptime_seconds=msg.uptime_seconds,
            nodes=[
                NodeStatus(n.node_id, n.address, n.cpus, n.memory_bytes, n.actors, n.busy_actors, n.alive)
                for n in msg.nodes
            ],
            jobs=[ServerJob.from_proto(j) for j in msg.jobs],
            models=[StoredModel(m.model_id, m.parameter_bytes, m.parameter_count) for m in msg.models],
            max_concurrent_jobs=msg.max_concurrent_jobs,
            max_queued_jobs=msg.max_queued_jobs,
            model_store_bytes=msg.model_store_bytes,
            model_store_max_bytes=msg.model_store_max_bytes,
            pending_bytes=msg.pending_bytes,
            jobs_ended=dict(msg.jobs_ended),
            worker_retries=msg.worker_retries,
            sessions=[
                OpenSession(t.session_id, t.model_id, t.steps, t.idle_seconds, t.partitions, t.replicas)
                for t in msg.sessions
            ],
            session_steps=msg.session_steps,
        )


def server_status(client: "Client", timeout: float | None = None) -> ServerStatus:
    """The server's status (``GetServerStatus``), through ``client``'s connection and token."""
    msg = client.calls.call(client.calls.stub.GetServerStatus, service_pb2.ServerStatusRequest(), timeout)
    return ServerStatus.from_proto(msg)


# -- the screen ------------------------------------------------------------------------------------


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h {minutes:02d}m"
    if hours:
        return f"{hours}h {minutes:02d}m {secs:02d}s"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    lines = []
    for row in [header, *rows]:
        lines.append("  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    return lines


def format_status(status: ServerStatus, address: str = "") -> str:
    """The operator's screen: server, nodes, jobs, models (plain text, fixed-width columns)."""
    where = f" at {address}" if address else ""
    ended = status.jobs_ended
    lines = [
        f"gradserve {status.version}{where}: engine {status.engine}, up {_duration(status.uptime_seconds)}",
        f"jobs: {len(status.running)} running, {len(status.queued)} queued (limits: {status.max_concurrent_jobs} at once, "
        f"{status.max_queued_jobs} more queued); since start: "
        + ", ".join(f"{ended.get(k, 0)} {k}" for k in ("done", "failed", "cancelled", "rejected")),
        f"pending data: {_bytes(status.pending_bytes)}; worker retries after lost workers: {status.worker_retries}",
        "",
    ]
    actors = sum(n.actors for n in status.nodes)
    lines.append(f"nodes: {len(status.nodes)}, {actors} worker actors")
    lines += _table(
        ["NODE", "ADDRESS", "CPUS", "MEMORY", "ACTORS", "BUSY"],
        [
            [
                n.node_id[:16] + ("" if n.alive else " (gone)"),
                n.address or "-",
                f"{n.cpus:g}",
                _bytes(n.memory_bytes) if n.memory_bytes else "-",
                str(n.actors),
                str(n.busy_actors),
            ]
            for n in status.nodes
        ],
    )
    lines.append("")
    if status.jobs:
        lines.append("jobs queued and running:")
        rows = []
        for j in status.jobs:
            steps = f"{j.steps_done}/{j.steps_total}" if j.steps_total else f"{j.steps_done}/?"
            state = j.state + (" (cancel requested)" if j.cancel_requested else "")
            rows.append(
                [j.job_id, j.model_id[:16], state, steps, f"{j.queued_seconds:.1f}s", f"{j.running_seconds:.1f}s"]
            )
        lines += _table(["JOB", "MODEL", "STATE", "STEPS", "QUEUED", "RUNNING"], rows)
    else:
        lines.append("jobs queued and running: none")
    lines.append("")
    lines.append(f"training sessions: {len(status.sessions)} open, {status.session_steps} steps since start")
    if status.sessions:
        lines += _table(
            ["SESSION", "MODEL", "STEPS", "PARTITIONS", "REPLICAS", "IDLE"],
            [
                [
                    t.session_id,
                    t.model_id[:16],
                    str(t.steps),
                    str(t.partitions or "-"),
                    str(t.replicas or "-"),
                    f"{t.idle_seconds:.0f}s",
                ]
                for t in status.sessions
            ],
        )
    lines.append("")
    lines.append(
        f"models: {len(status.models)}, {_bytes(status.model_store_bytes)} of {_bytes(status.model_store_max_bytes)}"
    )
    if status.models:
        lines += _table(
            ["MODEL", "BYTES", "PARAMETERS"],
            [[m.model_id[:16], _bytes(m.bytes), str(m.parameters)] for m in status.models],
        )
    return "\n".join(lines)
