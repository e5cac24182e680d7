"""The job registry (states, cancellation, expiry, budget release) and the one exception -> gRPC
status mapping, without any sockets."""

import threading
import time

import grpc
import numpy as np
import pytest

from gradserve.proto.chunks import LimitExceeded
from gradserve.proto.tensors import TensorDecodeError
from gradserve.server.errors import BadRequest, NotFound, ServiceError, Unavailable, status_for
from gradserve.server.events import JobCancelled, check_cancelled
from gradserve.server.job import JobOptions
from gradserve.server.jobs import JobRegistry
from gradserve.server.limits import ByteBudget
from gradserve.server.result import Result
from gradserve.worker.graph import GraphError


def _result(job):
    check_cancelled(job.cancelled)
    return Result(1.5, {"w": np.ones(2)})


def test_result_is_handed_out_once_then_the_record_expires():
    registry = JobRegistry(_result, max_concurrent=1, result_ttl=0.2)
    try:
        released = []
        job = registry.submit("m", object(), {}, JobOptions(), on_finish=lambda: released.append(1))
        assert job.wait(5) and job.state == "done" and released == [1]
        assert job.model is None and job.feeds is None  # nothing pinned after the job
        assert registry.take_result(job).loss == 1.5
        with pytest.raises(NotFound, match="already fetched"):
            registry.take_result(job)
        time.sleep(0.3)
        registry.sweep()
        with pytest.raises(NotFound, match="never submitted, or expired"):
            registry.get(job.id)
    finally:
        registry.shutdown(1)


def test_failures_keep_their_status_and_queue_is_bounded():
    gate = threading.Event()

    def runner(job):
        gate.wait(5)
        raise GraphError("node 'n' (Foo): boom")

    registry = JobRegistry(runner, max_concurrent=1, max_queued=1)
    try:
        first = registry.submit("m", object(), {}, JobOptions())
        second = registry.submit("m", object(), {}, JobOptions())
        with pytest.raises(LimitExceeded, match="queues 1 more"):
            registry.submit("m", object(), {}, JobOptions())
        assert registry.cancel(second.id).state == "cancelled"
        gate.set()
        assert first.wait(5) and first.state == "failed"
        with pytest.raises(ServiceError) as info:
            registry.take_result(first)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and "node 'n'" in str(info.value)
        assert first.snapshot().error_code == "INVALID_ARGUMENT"
    finally:
        registry.shutdown(1)
    with pytest.raises(Unavailable):
        registry.submit("m", object(), {}, JobOptions())


def test_a_claimed_job_runs_in_the_callers_thread_only_when_it_can_start_at_once():
    threads = []
    gate = threading.Event()

    def runner(job):
        threads.append(threading.current_thread())
        if job.model == "slow":
            gate.wait(5)
        check_cancelled(job.cancelled)
        return Result(1.0, {})

    registry = JobRegistry(runner, max_concurrent=1)
    try:
        job = registry.submit("m", "fast", {}, JobOptions(), claim=True)
        assert job.claimed and job.state == "queued" and not threads  # admitted, left to the caller
        registry.run_claimed(job)
        assert job.state == "done" and threads == [threading.current_thread()]

        # The one slot is taken: a claiming submit queues like any other and a job thread runs it.
        slow = registry.submit("m", "slow", {}, JobOptions(), claim=True)
        assert slow.claimed
        runs_slow = threading.Thread(target=registry.run_claimed, args=(slow,))
        runs_slow.start()
        queued = registry.submit("m", "fast", {}, JobOptions(), claim=True)
        assert not queued.claimed and queued.state == "queued"
        with pytest.raises(LimitExceeded, match="at most 1 at once"):  # the claimed job counts against the limits
            for _ in range(registry.max_queued):
                registry.submit("m", "fast", {}, JobOptions(), claim=True)
        for other in registry.jobs():
            if other not in (slow, queued):
                registry.cancel(other.id)
        gate.set()
        runs_slow.join(5)
        assert queued.wait(5) and queued.state == "done" and threads[-1] not in (threading.current_thread(), runs_slow)

        # A claimed job cancelled before it runs ends at once and frees its slot.
        again = registry.submit("m", "fast", {}, JobOptions(), claim=True)
        assert again.claimed
        registry.cancel(again.id)
        registry.run_claimed(again)
        assert again.state == "cancelled" and registry._admitted == 0
        last = registry.submit("m", "fast", {}, JobOptions(), claim=True)
        assert last.claimed  # the slot is free again
        registry.run_claimed(last)
        assert last.state == "done"
    finally:
        registry.shutdown(1)


def test_byte_budget():
    budget = ByteBudget(100)
    held = budget.reserve(60, "a")
    with pytest.raises(LimitExceeded, match="b needs 50 bytes"):
        budget.reserve(50, "b")
    budget.release(held)
    budget.reserve(100, "c")


@pytest.mark.parametrize(
    "exc, code",
    [
        (GraphError("node 'x' (Add): bad"), grpc.StatusCode.INVALID_ARGUMENT),
        (TensorDecodeError("parameter 'w': bad"), grpc.StatusCode.INVALID_ARGUMENT),
        (BadRequest("no manifest"), grpc.StatusCode.INVALID_ARGUMENT),
        (NotFound("job 'j' is not known"), grpc.StatusCode.NOT_FOUND),
        (LimitExceeded("too big"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (JobCancelled("job cancelled"), grpc.StatusCode.CANCELLED),
        (TimeoutError("slow"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (Unavailable("shutting down"), grpc.StatusCode.UNAVAILABLE),
        (ServiceError(grpc.StatusCode.ABORTED, "replayed"), grpc.StatusCode.ABORTED),
    ],
)
def test_status_mapping_keeps_the_message(exc, code):
    assert status_for(exc) == (code, str(exc))


def test_unexpected_errors_are_internal_and_short():
    code, message = status_for(KeyError("secret internal detail"))
    assert code == grpc.StatusCode.INTERNAL
    assert "secret" not in message and "KeyError" in message


def test_watch_replays_every_event_before_the_end_and_ends_once():
    """An event and the job's end that both land while a watcher replays the history: the
    watcher still gives every event (as running) first and "done" once, last."""
    from gradserve.server.events import ProgressEvent
    from gradserve.server.job import DONE, RUNNING, Job

    job = Job("j1", "m1", None, None, JobOptions(partitions=1, micro_batches=1, replicas=1))
    job.state, job.started = RUNNING, time.monotonic()
    job.add_event(ProgressEvent("forward", 0, done=False))
    job.add_event(ProgressEvent("forward", 0, done=True))
    given = []
    for snap in job.watch(lambda: True, poll=0.01):
        given.append((snap.state, snap.steps_done))
        if len(given) == 1:  # while the watcher is between its reads: the last event, then the end
            job.add_event(ProgressEvent("backward", 0, done=True))
            with job.cond:
                job.state = DONE
                job.cond.notify_all()
        assert len(given) < 10, given
    assert given == [(RUNNING, 0), (RUNNING, 1), (RUNNING, 2), (DONE, 2)]
