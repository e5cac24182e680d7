"""The server's state directory (server/state.py): models, accepted jobs and results on disk."""

from __future__ import annotations

import multiprocessing as mp
import threading

import numpy as np
import pytest

import gradserve
from gradserve.client.demo import mlp_example
from gradserve.server.errors import LimitExceeded
from gradserve.server.events import JobCancelled
from gradserve.server.job import JobOptions
from gradserve.server.jobs import JobRegistry
from gradserve.server.models import ModelStore
from gradserve.server.result import Result
from gradserve.server.state import StateDir, StateDirInUse


@pytest.fixture
def state(tmp_path):
    s = StateDir(tmp_path / "state", max_bytes=50 << 20)
    yield s
    s.close()


def test_models_come_back_and_a_damaged_file_is_dropped(tmp_path) -> None:
    model, _ = mlp_example()
    model_id = model.fingerprint()
    s = StateDir(tmp_path, 50 << 20)
    s.save_model(model_id, model)
    s.save_model(model_id, model)  # kept once
    s.close()
    again = StateDir(tmp_path, 50 << 20)
    [(got_id, got)] = list(again.models())
    assert got_id == model_id and got.fingerprint() == model_id
    # A file whose bytes no longer hash to its name is not served: it is dropped.
    path = tmp_path / "models" / f"{model_id}.model"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    assert list(again.models()) == [] and not path.exists()
    again.close()


def test_jobs_feeds_and_results_survive_a_reopen(tmp_path) -> None:
    s = StateDir(tmp_path, 50 << 20)
    feeds = {"x": np.arange(6, dtype=np.float32).reshape(2, 3), "idx": np.array([1, 2])}
    s.add_job("job-1", "a" * 64, {"partitions": 2, "input_grads": ["x"]}, "ipv4:1.2.3.4:5", feeds)
    s.add_job("job-2", "a" * 64, {}, "", feeds)
    s.set_state("job-1", "running")
    result = Result(1.5, {"w": np.ones((3, 2), np.float32)}, {"x": np.zeros((2, 3))}, {"engine": "inline"})
    s.save_result("job-2", result)
    s.close()

    again = StateDir(tmp_path, 50 << 20)
    records = {r.job_id: r for r in again.jobs()}
    assert records["job-1"].state == "running" and records["job-1"].options == {"partitions": 2, "input_grads": ["x"]}
    assert records["job-1"].client == "ipv4:1.2.3.4:5"
    loaded = again.load_feeds("job-1")
    assert loaded.keys() == feeds.keys() and all(np.array_equal(loaded[k], feeds[k]) for k in feeds)
    assert records["job-2"].state == "done"
    got = again.load_result("job-2")
    assert got.loss == 1.5 and np.array_equal(got.grads["w"], result.grads["w"])
    assert got.grads["w"].dtype == np.float32 and np.array_equal(got.input_grads["x"], result.input_grads["x"])
    assert got.info == {"engine": "inline"}
    # A finished job's feeds are gone; a forgotten job leaves nothing.
    assert not (tmp_path / "jobs" / "job-2.feeds.npz").exists()
    again.forget_job("job-2")
    again.forget_job("job-1")
    assert again.jobs() == [] and list((tmp_path / "jobs").iterdir()) == [] and again.nbytes == 0
    again.close()


def test_failures_are_recorded_with_their_code(state) -> None:
    state.add_job("j", "b" * 64, {}, "", {"x": np.ones(3)})
    state.set_state("j", "failed", "INVALID_ARGUMENT", "node 'embed' (Gather): index 7 out of range")
    [record] = state.jobs()
    assert (record.state, record.error_code) == ("failed", "INVALID_ARGUMENT") and "embed" in record.message
    assert record.finished is not None


def test_the_byte_budget_refuses_a_write_and_leaves_nothing(tmp_path) -> None:
    s = StateDir(tmp_path, max_bytes=10_000)
    with pytest.raises(LimitExceeded, match="--max-state-bytes"):
        s.add_job("big", "c" * 64, {}, "", {"x": np.zeros(10_000)})
    assert s.nbytes == 0 and list((tmp_path / "jobs").iterdir()) == [] and s.jobs() == []
    s.add_job("small", "c" * 64, {}, "", {"x": np.zeros(10)})
    assert 0 < s.nbytes <= 10_000
    s.close()


def test_path_like_ids_are_refused(state) -> None:
    with pytest.raises(ValueError):
        state.add_job("../escape", "d" * 64, {}, "", {})
    with pytest.raises(ValueError):
        state.drop_model("../../etc/passwd")


def _try_open(path: str, queue) -> None:
    try:
        StateDir(path, 1 << 20)
        queue.put("opened")
    except StateDirInUse as exc:
        queue.put(str(exc))


def test_a_second_server_cannot_use_the_same_directory(state) -> None:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_try_open, args=(str(state.path), queue))
    proc.start()
    proc.join(60)
    message = queue.get(timeout=5)
    assert "in use by pid" in message and "--state-dir" in message


def test_a_graceful_shutdown_keeps_accepted_jobs_for_the_next_start(tmp_path) -> None:
    model, feeds = mlp_example()
    model_id = model.fingerprint()
    started = threading.Event()

    def stuck(job):  # runs until cancelled
        started.set()
        job.cancelled.wait(30)
        raise JobCancelled("job cancelled")

    state = StateDir(tmp_path, 50 << 20)
    store = ModelStore(1 << 30, state)
    store.put(model_id, model)
    registry = JobRegistry(stuck, max_concurrent=1, state=state)
    ids = [registry.submit(model_id, model, feeds, JobOptions(), durable=True).id for _ in range(3)]
    synchronous = registry.submit(model_id, model, feeds, JobOptions())  # not durable: not kept
    assert started.wait(10)
    registry.shutdown(grace=0.1)  # cancels the running job and the queued ones
    assert {r.job_id: r.state for r in state.jobs()} == dict.fromkeys(ids, "queued")
    assert synchronous.id not in {r.job_id for r in state.jobs()}
    state.close()

    # The next start: the model is back, the three jobs run again under their ids.
    state = StateDir(tmp_path, 50 << 20)
    store = ModelStore(1 << 30, state)
    assert store.has(model_id)
    registry = JobRegistry(lambda job: gradserve.local().gradients(job.model, job.feeds), max_concurrent=1, state=state)
    assert registry.recover(store) == 3
    expected = gradserve.local().gradients(model, feeds)
    for job_id in ids:
        job = registry.get(job_id)
        assert job.wait(30) and job.state == "done"
        assert np.allclose(registry.take_result(job).grads["layer0.weight"], expected.grads["layer0.weight"])
    assert state.jobs() == []  # fetched: forgotten on disk
    registry.shutdown(0)
    state.close()
