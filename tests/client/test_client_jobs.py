"""Jobs by id: ``Client.job(job_id)`` and ``gradserve job ID`` find a job that another client
submitted -- after that client closed, from another process -- and show, follow, cancel or fetch it.

Real gRPC servers on the inline engine in this process (gated where a job must stay unfinished),
the CLI in this process and, across the restart, in a subprocess.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from gradserve.client.cli import main as cli_main
from gradserve.client.remote import Cancelled, Client, Job, JobStatus, NotFound
from gradserve.server.events import ProgressEvent
from gradserve.worker.graph import GraphError
from serving import REFERENCE, GatedEngine, batch, mlp, same, serving


def _cli_process(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gradserve.client.cli", *argv], capture_output=True, text=True, timeout=120
    )


def _npz_equals(path, reference) -> None:
    with np.load(path) as got:
        assert sorted(got.files) == sorted(["loss", *reference.grads])
        assert float(got["loss"]) == pytest.approx(reference.loss, rel=1e-6)
        for name, g in reference.grads.items():
            np.testing.assert_allclose(got[name], g, rtol=1e-5, atol=1e-6, err_msg=name)


def _submit_and_close(address: str, model, *feeds) -> list[str]:
    """Submit one job per feeds with a client that is then closed: only the ids survive it."""
    with Client(address, timeout=30) as first:
        return [first.submit(model, f).id for f in feeds]


def test_a_job_is_fetched_by_id_after_its_client_is_gone():
    model, feeds = mlp(60), [batch(60), batch(61), batch(62)]
    references = [REFERENCE.gradients(model, f) for f in feeds]
    with serving() as srv:
        ids = _submit_and_close(srv.address, model, *feeds)
        with Client(srv.address, timeout=30) as second:
            job = second.job(ids[0])
            assert isinstance(job, Job) and job.id == ids[0]
            assert job.model_id == model.fingerprint()  # from the server's JobStatus
            assert same(job.result(timeout=30), references[0])
            assert job.status().state == "done" and job.status().model_id == model.fingerprint()
            assert [s.state for s in second.job(ids[1]).watch(timeout=30)][-1] == "done"


def test_the_cli_fetches_a_job_by_id_in_another_process(tmp_path):
    model, feeds = mlp(63), [batch(63), batch(64)]
    references = [REFERENCE.gradients(model, f) for f in feeds]
    with serving() as srv:
        ids = _submit_and_close(srv.address, model, *feeds)
        fetched = _cli_process("job", ids[0], "--server", srv.address, "--out", str(tmp_path / "g0.npz"))
        assert fetched.returncode == 0, fetched.stderr
        assert "loss = " in fetched.stdout and f"wrote {tmp_path / 'g0.npz'}" in fetched.stdout
        _npz_equals(tmp_path / "g0.npz", references[0])

        status = _cli_process("job", ids[1], "--server", srv.address, "--watch", "--json")
        assert status.returncode == 0, status.stderr
        lines = [json.loads(line) for line in status.stdout.splitlines()]
        assert lines[-1]["state"] == "done" and lines[-1]["job_id"] == ids[1]
        assert lines[-1]["model_id"] == model.fingerprint()
        assert (
            _cli_process("job", ids[1], "--server", srv.address, "--out", str(tmp_path / "g1.npz"), "--json").stdout
            == ""
        )  # --json: the result is written quietly
        _npz_equals(tmp_path / "g1.npz", references[1])


def test_an_unknown_job_id_is_named(capsys):
    with serving() as srv, Client(srv.address, timeout=30) as c:
        with pytest.raises(NotFound, match="job 'job-404-nope' is not known to this server"):
            c.job("job-404-nope")  # checked at once, with one GetStatus call
        with pytest.raises(ValueError, match="job id"):
            c.job("")
        assert cli_main(["job", "job-404-nope", "--server", srv.address]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "job 'job-404-nope' is not known" in err


def test_watch_a_job_by_id_as_it_runs():
    engine = GatedEngine()
    with serving(lambda: engine) as srv:
        (job_id,) = _submit_and_close(srv.address, mlp(65), batch(65))
        assert engine.started.wait(30)
        watcher = subprocess.Popen(
            [sys.executable, "-m", "gradserve.client.cli", "job", job_id, "--server", srv.address, "--watch"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            first = watcher.stdout.readline()  # the job's state when the watch began: held at the gate
            assert first.startswith(f"job {job_id}: running, "), first
            engine.gate.set()
            rest, err = watcher.communicate(timeout=60)
        finally:
            watcher.kill()
        assert watcher.returncode == 0, err
        assert rest.splitlines()[-1].startswith(f"job {job_id}: done, ")


def test_cancel_a_job_by_id(capsys):
    engine = GatedEngine()
    with serving(lambda: engine) as srv:
        (job_id,) = _submit_and_close(srv.address, mlp(66), batch(66))
        assert engine.started.wait(30)
        assert cli_main(["job", job_id, "--server", srv.address, "--cancel"]) == 0
        assert capsys.readouterr().out.startswith(f"job {job_id}: ")
        with Client(srv.address, timeout=30) as c:
            job = c.job(job_id)
            with pytest.raises(Cancelled):
                job.result(timeout=30)
            assert job.status().state == "cancelled"
        assert cli_main(["job", job_id, "--server", srv.address, "--cancel", "--out", "x.npz"]) == 2
        assert capsys.readouterr().err == "gradserve: error: --cancel does not go with --out or --watch\n"


def test_job_timeout_gives_up_waiting_and_the_job_keeps_running(tmp_path, capsys):
    engine = GatedEngine()
    model, feeds = mlp(67), batch(67)
    out = str(tmp_path / "g.npz")
    with serving(lambda: engine) as srv:
        (job_id,) = _submit_and_close(srv.address, model, feeds)
        assert cli_main(["job", job_id, "--server", srv.address, "--out", out, "--timeout", "0.5"]) == 1
        assert capsys.readouterr().err == (
            f"gradserve: error: DeadlineExceeded: job {job_id} did not finish "
            "within --timeout 0.5 s; it keeps running\n"
        )
        with Client(srv.address, timeout=30) as c:
            assert c.job(job_id).status().state == "running"
        engine.gate.set()
        assert cli_main(["job", job_id, "--server", srv.address, "--out", out]) == 0
        _npz_equals(out, REFERENCE.gradients(model, feeds))


class FailingEngine:
    """Fails every job as a bad model would."""

    name = "failing"

    def gradients(self, model, feeds, *, input_grads=(), progress=None, cancelled=None, prepared=None):
        raise GraphError("node 'boom': this job fails on purpose")

    def close(self) -> None:
        pass


def test_a_failed_job_says_why_and_fetching_it_fails_like_grad(tmp_path, capsys):
    with serving(FailingEngine) as srv:
        (job_id,) = _submit_and_close(srv.address, mlp(68), batch(68))
        with Client(srv.address, timeout=30) as c:
            assert [s.state for s in c.job(job_id).watch(timeout=30)][-1] == "failed"
        assert cli_main(["job", job_id, "--server", srv.address]) == 0  # the status was shown
        assert re.fullmatch(
            rf"job {job_id}: failed, 0/2 steps, queued [0-9.]+ s(, running [0-9.]+ s)?: "
            r"INVALID_ARGUMENT node 'boom': this job fails on purpose\n",
            capsys.readouterr().out,
        )
        assert cli_main(["job", job_id, "--server", srv.address, "--out", str(tmp_path / "g.npz")]) == 2
        assert capsys.readouterr().err == "gradserve: error: node 'boom': this job fails on purpose\n"
        assert not (tmp_path / "g.npz").exists()


def test_status_lines():
    event = ProgressEvent("backward", 1, done=False)
    running = JobStatus("j1", "running", 3, 8, event, queued_seconds=0.04, running_seconds=1.26)
    assert running.describe() == "job j1: running, 3/8 steps (backward p1), queued 0.0 s, running 1.3 s"
    asked = JobStatus("j2", "queued", 0, 0, message="cancel requested", queued_seconds=2.0)
    assert asked.describe() == "job j2: queued, 0/? steps, queued 2.0 s (cancel requested)"
