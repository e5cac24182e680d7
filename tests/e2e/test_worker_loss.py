"""Every loss of a worker is a retry, never an INTERNAL error.

Which failures are losses (Ray's exception objects, no cluster); then jobs on the session's Ray
engine whose worker is killed (SIGKILL by pid) at a chosen moment -- during the forward steps, the
backward steps, a replica's reduce of kept dL/dw, the weight step -- run again and give the inline
engine's gradients; the same through a server's Compute call; and a job that keeps losing workers
fails UNAVAILABLE, which the client retries, with the retries counted by the server.

The moments are made certain as tests/ambush.py says: one worker is held back, and the victim is
killed from the job's progress callback.
"""

from __future__ import annotations

import functools

import grpc
import numpy as np
import pytest
from ray import exceptions as rx

import gradserve
from gradserve.server.errors import ServiceError, WorkerLost, retry_after_for, status_for
from gradserve.server.events import JobCancelled
from gradserve.server.job import JobOptions
from gradserve.server.jobs import JobRegistry
from gradserve.server.planning.schedule import reduction_parent
from gradserve.server.ray_engine import is_worker_loss
from gradserve.worker.graph import GraphError

from ambush import Ambush, backward_of, forward_of
from gradcheck import assert_same_result

INLINE = gradserve.local()


# -- which failures are losses (no cluster) --------------------------------------------------------


def task_error(cause: BaseException) -> rx.RayTaskError:
    """The error of an actor call that failed with ``cause`` (or read a result that did)."""
    return rx.RayTaskError(
        "StageHost.run",
        "Traceback (most recent call last): ...",
        cause,
        proctitle="ray::StageHost.run",
        pid=4242,
        ip="127.0.0.1",
    )


OBJECT = "c8ef45ccd0112571ffffffffffffffffffffffff0100000001000000"

LOSSES = {
    "actor died": rx.ActorDiedError(),
    "actor unavailable": rx.ActorUnavailableError("connection reset", None),
    "actor error": rx.RayActorError(),
    "worker crashed": rx.WorkerCrashedError(),
    "node died": rx.NodeDiedError("node 3f2a went away"),
    "object lost": rx.ObjectLostError(OBJECT, None, ""),
    "owner died": rx.OwnerDiedError(OBJECT, None, ""),
    "reconstruction failed": rx.ObjectReconstructionFailedError(OBJECT),
    "fetch timed out": rx.ObjectFetchTimedOutError(OBJECT, None, ""),
    "a call that read a dead actor's result": task_error(rx.ActorDiedError()),
    "as ray.get raises it": task_error(rx.ActorDiedError()).as_instanceof_cause(),
    "a call that read a lost object": task_error(rx.ObjectReconstructionFailedError(OBJECT)).as_instanceof_cause(),
    "through two calls": task_error(task_error(rx.OwnerDiedError(OBJECT, None, ""))),
    "the engine's own verdict": WorkerLost("lost a worker on each of 4 runs", 3),
}

NOT_LOSSES = {
    "the model's fault": GraphError("node 'mm' (MatMul): shapes (2, 3) and (4, 5)"),
    "a step that raised": task_error(GraphError("node 'mm' (MatMul): bad")).as_instanceof_cause(),
    "a bug in a step": task_error(KeyError("stage")),
    "an actor whose constructor raised": rx.ActorDiedError(task_error(ImportError("no module named numba"))),
    "a control call that timed out": rx.GetTimeoutError(),
    "an object freed by hand": rx.ObjectFreedError(OBJECT, None, ""),
    "reference counting gone wrong": rx.ReferenceCountingAssertionError(OBJECT, None, ""),
    "a cancelled Ray task": rx.TaskCancelledError(),
    "a cancelled job": JobCancelled("job cancelled"),
    "anything else": ValueError("x"),
}


@pytest.mark.parametrize("exc", LOSSES.values(), ids=LOSSES.keys())
def test_losses(exc):
    assert is_worker_loss(exc)


@pytest.mark.parametrize("exc", NOT_LOSSES.values(), ids=NOT_LOSSES.keys())
def test_not_losses(exc):
    assert not is_worker_loss(exc)


def test_a_job_that_kept_losing_workers_is_unavailable_with_a_hint():
    exc = WorkerLost("the job lost a Ray worker on each of its 4 runs", 3)
    assert status_for(exc) == (grpc.StatusCode.UNAVAILABLE, "the job lost a Ray worker on each of its 4 runs")
    assert retry_after_for(exc) > 0  # the client's synchronous call runs it again after the hint


def test_the_registry_counts_the_retries_of_a_job_that_failed_and_replays_the_failure_as_final():
    def runner(job):
        raise WorkerLost("the job lost a Ray worker on each of its 3 runs", 2)

    registry = JobRegistry(runner, max_concurrent=1)
    try:
        job = registry.submit("m", object(), {}, JobOptions())
        assert job.wait(5) and job.state == "failed"
        assert registry.retries == 2
        assert job.snapshot().error_code == "UNAVAILABLE"
        with pytest.raises(ServiceError) as stored:  # FetchResult: fetching again cannot change it
            registry.peek_result(job)
        assert stored.value.code == grpc.StatusCode.UNAVAILABLE and retry_after_for(stored.value) < 0
        with pytest.raises(ServiceError) as synchronous:  # Compute/Run: the client runs it again
            registry.take_result(job)
        assert synchronous.value.code == grpc.StatusCode.UNAVAILABLE and retry_after_for(synchronous.value) is None
    finally:
        registry.shutdown(1)


class LosingEngine:
    """An engine whose every job ends as a Ray engine's job that kept losing workers."""

    name = "losing"

    def gradients(self, model, feeds, *, input_grads=(), progress=None, cancelled=None, prepared=None):
        raise WorkerLost("the job lost a Ray worker on each of its 4 runs", 3)

    def close(self) -> None:
        pass


def test_over_the_wire_a_synchronous_call_is_retried_and_a_stored_failure_is_not():
    from gradserve.client.remote import Client, RemoteError
    from gradserve.client.retry import RetryPolicy
    from serving import batch, mlp as small_mlp, serving

    model, feeds = small_mlp(5), batch(5)
    policy = RetryPolicy(initial_backoff=0.01, max_backoff=0.01, max_attempts=3)
    with serving(LosingEngine) as srv, Client(srv.address, timeout=60, retry=policy) as c:
        with pytest.raises(RemoteError) as synchronous:  # Compute: each try runs the job again
            c.gradients(model, feeds)
        assert synchronous.value.code == grpc.StatusCode.UNAVAILABLE and c.retries == 2
        job = c.submit(model, feeds)
        before = c.retries
        with pytest.raises(RemoteError) as stored:  # FetchResult: the same answer, at once
            job.result()
        assert stored.value.code == grpc.StatusCode.UNAVAILABLE and "lost a Ray worker" in str(stored.value)
        assert c.retries == before


# -- jobs that lose a worker at a chosen moment (the session's Ray engine) --------------------------


def mlp(seed: int = 0):
    rng = np.random.default_rng(seed)
    m = gradserve.ModelBuilder()
    h = m.input("x", (None, 6), np.float64)
    y = m.input("y", (None, 2), np.float64)
    sizes = [6, 16, 16, 16, 2]
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        h = h @ m.param(f"w{i}", rng.standard_normal((a, b)) / np.sqrt(a)) + m.param(f"b{i}", np.zeros(b))
        h = m.tanh(h) if i < len(sizes) - 2 else h
    model = m.loss(m.mse(h, y))
    return model, {"x": rng.standard_normal((8, 6)), "y": rng.standard_normal((8, 2))}


def placement(result) -> list[list[int]]:
    """The pid of each (replica, partition) a job ran on."""
    return [[w["pid"] for w in row] for row in result.info["placement"]]


def check_recovered(engine, result, reference, victim: int, ambush: Ambush) -> None:
    import ray

    assert ambush.killed.is_set(), f"the moment never came: {ambush.events}"
    assert_same_result(result, reference)
    assert result.info["retries"] >= 1, result.info
    assert victim not in [pid for row in placement(result) for pid in row]
    assert victim not in [w["pid"] for w in engine._pool.where], "the dead actor left the pool"  # noqa: SLF001
    assert sum(ray.get([a.job_count.remote() for a in engine._pool.actors])) == 0  # noqa: SLF001


def root_replica(r: int) -> int:
    return next(i for i in range(r) if reduction_parent(i, r) is None)


# (name, options, (replica, partition) held back, (replica, partition) killed, the moment)
MOMENTS = {
    # The last partition has run nothing when the first forward step is done: its forwards are lost.
    "forward": (dict(partitions=3, micro_batches=4), (0, 2), (0, 2), forward_of(0, 0)),
    # The first partition ran three forwards and holds their activations; every backward step waits
    # on the held last partition.
    "backward": (dict(partitions=3, micro_batches=4), (0, 2), (0, 0), forward_of(0, 2)),
    # K=1 R=2: the root replica has computed its dL/dw and keeps it on its actor for the reduce that
    # adds the other replica's (held back).
    "reduce": (
        dict(partitions=1, micro_batches=1, replicas=2),
        (1 - root_replica(2), 0),
        (root_replica(2), 0),
        backward_of(0, 0, root_replica(2)),
    ),
    # K=2 M=2 R=2: the root replica's last partition finished its backward steps; its weight step runs
    # (or its result waits, kept, for the reduce) while the other replica is held back.
    "weights": (
        dict(partitions=2, micro_batches=2, replicas=2),
        (1 - root_replica(2), 0),
        (root_replica(2), 1),
        backward_of(1, 1, root_replica(2)),
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("moment", MOMENTS)
def test_a_job_survives_losing_a_worker(ray_engine, moment):
    options, (hold_r, hold_p), (kill_r, kill_p), when = MOMENTS[moment]
    model, feeds = mlp(seed=len(moment))
    reference = INLINE.gradients(model, feeds)
    warm = ray_engine.gradients(model, feeds, **options)  # the next job runs on the same actors: they hold its stages
    pids = placement(warm)
    victim = pids[kill_r][kill_p]
    with Ambush(ray_engine, hold=pids[hold_r][hold_p], kill=victim, when=when) as ambush:
        result = ray_engine.gradients(model, feeds, progress=ambush, **options)
    check_recovered(ray_engine, result, reference, victim, ambush)
    # The held worker had run none of the job's steps when the victim died (what makes the moment certain).
    assert not [e for e in ambush.before_kill if (e.replica, e.partition) == (hold_r, hold_p)], ambush.before_kill


@pytest.mark.slow
def test_a_job_that_keeps_losing_workers_fails_unavailable(ray_engine, monkeypatch):
    options, (hold_r, hold_p), (kill_r, kill_p), when = MOMENTS["forward"]
    model, feeds = mlp(seed=21)
    pids = placement(ray_engine.gradients(model, feeds, **options))
    monkeypatch.setattr(ray_engine, "max_retries", 0)
    with Ambush(ray_engine, hold=pids[hold_r][hold_p], kill=pids[kill_r][kill_p], when=when) as ambush:
        with pytest.raises(WorkerLost, match=r"lost a Ray worker on each of its 1 runs") as info:
            ray_engine.gradients(model, feeds, progress=ambush, **options)
    assert info.value.retries == 0 and status_for(info.value)[0] == grpc.StatusCode.UNAVAILABLE
    monkeypatch.undo()
    after = ray_engine.gradients(model, feeds, **options)  # the pool has replaced the worker
    assert_same_result(after, INLINE.gradients(model, feeds))
    assert after.info["retries"] == 0


# -- through a server: the Compute call's thread runs the job ----------------------------------------


class Watched:
    """The session's Ray engine behind a server, each job's progress also shown to ``self.watch``
    (a test's :class:`Ambush`); the server does not close it."""

    name = "ray"
    splits = True

    def __init__(self, engine) -> None:
        self.engine, self.watch = engine, None
        self.capacity, self.status = engine.capacity, engine.status

        @functools.wraps(engine.gradients)  # its signature: the server passes K, M, R and the model id
        def gradients(model, feeds, *, progress=None, **kwargs):
            def both(event):
                if progress is not None:
                    progress(event)
                if self.watch is not None:
                    self.watch(event)

            return engine.gradients(model, feeds, progress=both, **kwargs)

        self.gradients = gradients

    @property
    def max_retries(self) -> int:
        return self.engine.max_retries

    def close(self) -> None:
        pass


@pytest.mark.slow
def test_through_the_servers_compute_call(ray_engine, monkeypatch):
    from gradserve.client.remote import Client, RemoteError
    from gradserve.client.status import server_status
    from serving import serving

    options, (hold_r, hold_p), (kill_r, kill_p), when = MOMENTS["forward"]
    model, feeds = mlp(seed=31)
    reference = INLINE.gradients(model, feeds)
    watched = Watched(ray_engine)
    with (
        serving(lambda: watched) as srv,
        Client(srv.address, timeout=120) as client,
        Client(srv.address, timeout=120, retry=None) as impatient,
    ):

        def ambushed(c, pids):
            """The job through ``c`` (small feeds: one Compute call), a worker killed mid-way."""
            with Ambush(ray_engine, hold=pids[hold_r][hold_p], kill=pids[kill_r][kill_p], when=when) as ambush:
                watched.watch = ambush
                try:
                    return c.gradients(model, feeds, **options), ambush
                finally:
                    watched.watch = None

        pids = placement(client.gradients(model, feeds, **options))
        result, ambush = ambushed(client, pids)
        check_recovered(ray_engine, result, reference, pids[kill_r][kill_p], ambush)
        assert server_status(client).worker_retries == result.info["retries"]

        # Out of retries: UNAVAILABLE (never INTERNAL); a client that retries runs the job again.
        monkeypatch.setattr(ray_engine, "max_retries", 0)
        pids = placement(result)
        with pytest.raises(RemoteError) as failed:
            ambushed(impatient, pids)
        assert failed.value.code == grpc.StatusCode.UNAVAILABLE and "lost a Ray worker" in str(failed.value)
        pids = placement(client.gradients(model, feeds, **options))
        before = client.retries
        again, ambush = ambushed(client, pids)
        assert ambush.killed.is_set() and client.retries > before
        assert_same_result(again, reference)


@pytest.mark.slow
def test_through_the_servers_submit_call(ray_engine):
    """A submitted job runs on the registry's own thread, not the call's: a worker lost there is a
    retry too, and the client fetches the job's correct result, never an error."""
    from gradserve.client.remote import Client
    from gradserve.client.status import server_status
    from serving import serving

    options, (hold_r, hold_p), (kill_r, kill_p), when = MOMENTS["backward"]
    model, feeds = mlp(seed=41)
    reference = INLINE.gradients(model, feeds)
    watched = Watched(ray_engine)
    with serving(lambda: watched) as srv, Client(srv.address, timeout=120, retry=None) as client:
        pids = placement(client.submit(model, feeds, **options).result())
        victim = pids[kill_r][kill_p]
        with Ambush(ray_engine, hold=pids[hold_r][hold_p], kill=victim, when=when) as ambush:
            watched.watch = ambush
            try:
                result = client.submit(model, feeds, **options).result()
            finally:
                watched.watch = None
        check_recovered(ray_engine, result, reference, victim, ambush)
        assert server_status(client).worker_retries == result.info["retries"]
