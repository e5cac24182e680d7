"""The wire form of a job's status: a :class:`~gradserve.server.job.JobSnapshot` as the
``JobStatus`` message that GetStatus, Watch and Cancel answer and GetServerStatus lists."""

from __future__ import annotations

from gradserve.proto.v1 import service_pb2
from gradserve.server.job import JobSnapshot

_STATES = {
    "queued": service_pb2.QUEUED,
    "running": service_pb2.RUNNING,
    "done": service_pb2.DONE,
    "failed": service_pb2.FAILED,
    "cancelled": service_pb2.CANCELLED,
}


def status_message(snap: JobSnapshot) -> service_pb2.JobStatus:
    """The wire form of a job snapshot."""
    msg = service_pb2.JobStatus(
        job_id=snap.job_id,
        model_id=snap.model_id,
        state=_STATES[snap.state],
        events=snap.events,
        steps_done=snap.steps_done,
        steps_total=snap.steps_total,
        error_code=snap.error_code,
        message=snap.message,
        queued_seconds=snap.queued_seconds,
        running_seconds=snap.running_seconds,
    )
    if snap.event is not None:
        e = snap.event.event
        msg.event.CopyFrom(
            service_pb2.ProgressEvent(
                phase=e.phase,
                partition=e.partition,
                micro_batch=e.micro_batch,
                replica=e.replica,
                done=e.done,
                node=e.node,
                seconds=snap.event.seconds,
            )
        )
    return msg
