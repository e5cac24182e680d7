"""A stage worker that cannot start fails the job at once, in one line naming the node and the cause
(FAILED_PRECONDITION through a server), keeps no actor in the pool, and the next job, once the cause
is gone, runs on fresh workers.

First how the cause is read from Ray's error (its objects, built as Ray builds them, no cluster);
then real Ray actors whose constructor raises, or whose class cannot be imported on the worker (a
module only the driver has: gradserve missing or of another version on a node), started by an engine
with a pool of its own on the session's Ray, directly and through an in-process gRPC server.
"""

from __future__ import annotations

import functools
import importlib.util
import pickle
import sys
import traceback
from pathlib import Path

import grpc
import pytest
import ray
from ray import exceptions as rx

import gradserve
from borrowed import Borrowed
from gradcheck import assert_same_result
from gradserve.client.errors import FailedPrecondition
from gradserve.server.errors import WorkersCannotStart, retry_after_for, status_for
from gradserve.server.ray_engine import RayEngine, is_worker_loss, pool
from gradserve.server.ray_engine.worker_loss import start_failure
from gradserve.worker.actor import StageActor, StageHost
from gradserve.worker.graph import GraphError
from serving import batch, check_still_serving, mlp, serving

CAUSE = "numba cache unwritable"
INLINE = gradserve.local()


# -- the cause, read from Ray's error (no cluster) -------------------------------------------------


def creation_failure(raise_it) -> rx.ActorDiedError:
    """The error Ray gives the calls of an actor whose constructor ran ``raise_it``: an
    ActorDiedError made from the creation task's RayTaskError, with the worker's real traceback."""
    try:
        raise_it()
    except Exception as exc:  # noqa: BLE001 -- whatever it raised is the cause
        task = rx.RayTaskError(
            "StageHost.__init__",
            traceback.format_exc(),
            exc,
            proctitle="ray::StageHost.__init__",
            pid=4242,
            ip="10.0.0.7",
            actor_repr="<StageHost object at 0x7f00>",
            actor_id="ab" * 16,
        )
        return rx.ActorDiedError(task)
    raise AssertionError("raise_it did not raise")


def _raise(exc: BaseException) -> None:
    raise exc


def _chained() -> None:
    try:
        _raise(OSError(30, "Read-only file system", "/opt/kernels"))
    except OSError as exc:
        raise RuntimeError(CAUSE) from exc


def test_the_cause_is_the_constructors_error_on_one_line_with_the_node():
    failure = start_failure(creation_failure(functools.partial(_raise, RuntimeError(f"{CAUSE}\nsee the docs"))))
    assert isinstance(failure, WorkersCannotStart)
    assert str(failure) == f"stage workers cannot start on node 10.0.0.7: RuntimeError: {CAUSE}"
    assert (failure.node, failure.reason) == ("10.0.0.7", f"RuntimeError: {CAUSE}")


def test_a_chained_cause_is_the_last_exception_raised():
    assert start_failure(creation_failure(_chained)).reason == f"RuntimeError: {CAUSE}"


def test_a_long_cause_is_cut_and_a_missing_node_said_so():
    failure = start_failure(creation_failure(functools.partial(_raise, ImportError("x" * 1000))))
    assert "\n" not in str(failure) and len(failure.reason) == 300 and failure.reason.endswith("...")
    assert failure.reason.startswith("ImportError: xxx")
    bare = rx.RayActorError(
        error_msg="The actor died because of an error raised in its creation task, ValueError: v",
        actor_init_failed=True,
    )
    assert str(start_failure(bare)) == "stage workers cannot start on node (unknown): ValueError: v"


def test_a_cause_behind_a_task_that_needed_the_actor_is_found():
    died = creation_failure(functools.partial(_raise, ModuleNotFoundError("No module named 'gradserve'")))
    nested = rx.RayTaskError("StageHost.run", "Traceback (most recent call last): ...", died, "ray::run", 1, "10.0.0.7")
    failure = start_failure(nested.as_instanceof_cause())
    assert failure is not None and failure.reason == "ModuleNotFoundError: No module named 'gradserve'"


@pytest.mark.parametrize(
    "exc",
    [rx.ActorDiedError(), rx.WorkerCrashedError(), rx.GetTimeoutError(), GraphError("node 'mm' (MatMul): bad")],
    ids=["actor died", "worker crashed", "timed out", "the model's fault"],
)
def test_other_failures_are_not_start_failures(exc):
    assert start_failure(exc) is None


def test_it_is_failed_precondition_without_a_retry_hint_and_no_worker_loss():
    failure = start_failure(creation_failure(functools.partial(_raise, RuntimeError(CAUSE))))
    assert status_for(failure) == (grpc.StatusCode.FAILED_PRECONDITION, str(failure))
    assert retry_after_for(failure) is None  # the client raises it at once
    assert not is_worker_loss(failure) and not is_worker_loss(creation_failure(_chained))
    assert str(pickle.loads(pickle.dumps(failure))) == str(failure)


# -- real actors that cannot start -----------------------------------------------------------------


def raising_actor(record: Path):
    """A stage actor class whose constructor appends a line to ``record`` (one per start, from the
    worker process) and raises RuntimeError(CAUSE). Made here so that Ray sends the class by value."""

    class NoCache(StageHost):
        def __init__(self) -> None:
            with open(record, "a") as f:
                f.write("started\n")
            raise RuntimeError(CAUSE)

    return ray.remote(concurrency_groups={"control": 1})(NoCache)


def driver_only_actor(tmp_path: Path, monkeypatch):
    """A stage actor class from a module only this process has: Ray sends it by reference, and the
    worker fails to import it, as one would on a node without gradserve (or with another version)."""
    source = tmp_path / "gradserve_driver_only.py"
    source.write_text("from gradserve.worker.actor import StageHost\n\n\nclass Elsewhere(StageHost):\n    pass\n")
    spec = importlib.util.spec_from_file_location("gradserve_driver_only", source)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(sys.modules, "gradserve_driver_only", module)
    return ray.remote(concurrency_groups={"control": 1})(module.Elsewhere)


@pytest.fixture
def engine(ray_engine):
    own = RayEngine(threads_per_worker=1, max_retries=3)  # joins the session's Ray: its own, empty pool
    yield own
    own.close()  # kills its actors only: the session's Ray and pool stay


def node_addresses(engine: RayEngine) -> set[str]:
    return {n["address"] for n in engine.status()["nodes"]}


@pytest.mark.slow  # starts Ray worker processes
def test_a_constructor_that_raises_fails_the_job_once_and_leaves_no_actor(engine, monkeypatch, tmp_path):
    record = tmp_path / "starts"
    monkeypatch.setattr(pool, "StageActor", raising_actor(record))
    model, feeds = mlp(3), batch(3)
    with pytest.raises(WorkersCannotStart) as info:
        engine.gradients(model, feeds, partitions=1, micro_batches=1, replicas=1)
    assert info.value.reason == f"RuntimeError: {CAUSE}"
    assert info.value.node in node_addresses(engine)
    assert str(info.value) == f"stage workers cannot start on node {info.value.node}: RuntimeError: {CAUSE}"
    # One actor started once: a retry (max_retries=3) would have started it up to 4 times.
    assert record.read_text().splitlines() == ["started"]
    assert engine.status()["actors"] == 0

    monkeypatch.setattr(pool, "StageActor", StageActor)  # the cause is gone
    result = engine.gradients(model, feeds, partitions=1, micro_batches=1, replicas=1)
    assert_same_result(result, INLINE.gradients(model, feeds), rtol=1e-5)
    assert result.info["retries"] == 0 and engine.status()["actors"] == 1


@pytest.mark.slow  # starts Ray worker processes
def test_a_worker_that_cannot_import_the_actor_names_the_missing_module(engine, monkeypatch, tmp_path):
    monkeypatch.setattr(pool, "StageActor", driver_only_actor(tmp_path, monkeypatch))
    model, feeds = mlp(4), batch(4)
    with pytest.raises(WorkersCannotStart) as info:
        engine.gradients(model, feeds, partitions=2, micro_batches=1, replicas=1)
    assert info.value.reason == "ModuleNotFoundError: No module named 'gradserve_driver_only'"
    assert info.value.node in node_addresses(engine)
    assert engine.status()["actors"] == 0

    monkeypatch.setattr(pool, "StageActor", StageActor)
    result = engine.gradients(model, feeds, partitions=2, micro_batches=1, replicas=1)
    assert_same_result(result, INLINE.gradients(model, feeds), rtol=1e-5)


@pytest.mark.slow  # starts Ray worker processes and a gRPC server
def test_the_client_gets_failed_precondition_and_the_server_keeps_serving(engine, monkeypatch, tmp_path):
    monkeypatch.setattr(pool, "StageActor", raising_actor(tmp_path / "starts"))
    with serving(lambda: Borrowed(engine)) as srv, gradserve.Client(srv.address, timeout=120) as client:
        with pytest.raises(FailedPrecondition) as info:
            client.gradients(mlp(5), batch(5), partitions=1)
        assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert info.value.details.startswith("stage workers cannot start on node ")
        assert info.value.details.endswith(f": RuntimeError: {CAUSE}")
        assert client.retries == 0  # raised at once, not retried

        monkeypatch.setattr(pool, "StageActor", StageActor)
        check_still_serving(client)
