"""The command line's first five minutes (issue 19): every mistake is one line and exit status 2,
found before any work starts; ``plan`` plans what ``grad`` and the server run."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import gradserve
from gradserve.client.cli import main
from gradserve.client.demo import mlp_example
from gradserve.client.onnx_import import load_onnx
from gradserve.worker.graph import GraphError


@pytest.fixture
def onnx_model(tmp_path):
    """A one-input ONNX model of two nodes (MatMul, ReduceSum) whose weight lives in m.onnx.data,
    and an .npy of its input."""
    w = numpy_helper.from_array(np.linspace(-1, 1, 64 * 8, dtype=np.float32).reshape(64, 8), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("ReduceSum", ["h"], ["loss"], keepdims=0)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("loss", TensorProto.FLOAT, [])],
        [w],
    )
    path = tmp_path / "m.onnx"
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
        path,
        save_as_external_data=True,
        location="m.onnx.data",
        size_threshold=0,
    )
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    return path, tmp_path / "x.npy", x


@pytest.fixture
def mlp_files(tmp_path):
    """A two-input model (x, y) saved by gradserve, with its feeds."""
    model, feeds = mlp_example()
    model.save(tmp_path / "mlp.gsm")
    np.savez(tmp_path / "feeds.npz", **feeds)
    return model, feeds, str(tmp_path / "mlp.gsm"), str(tmp_path / "feeds.npz")


@pytest.fixture
def no_engine(monkeypatch):
    """Fails the test if the CLI starts an engine (what "before any work starts" means for grad)."""
    started = []
    monkeypatch.setattr(
        "gradserve.client.local.local", lambda *a, **k: started.append(a) or pytest.fail("engine started")
    )
    return started


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("gradserve: error: ") and err.count("\n") == 1, err
    return err


# -- feeds -----------------------------------------------------------------------------------------
def test_npy_feeds_are_the_one_input_of_a_one_input_model(onnx_model, tmp_path, capsys):
    path, npy, x = onnx_model
    out = tmp_path / "g.npz"
    assert main(["grad", str(path), "--feeds", str(npy), "--out", str(out), "-q"]) == 0
    reference = gradserve.local().gradients(load_onnx(path), {"x": x})
    with np.load(out) as g:
        np.testing.assert_array_equal(g["W"], reference.grads["W"])
        assert float(g["loss"]) == pytest.approx(reference.loss)


def test_npy_feeds_for_a_model_with_several_inputs_name_them(mlp_files, tmp_path, capsys, no_engine):
    _, feeds, model_path, _ = mlp_files
    np.save(tmp_path / "x.npy", feeds["x"])
    assert main(["grad", model_path, "--feeds", str(tmp_path / "x.npy"), "--out", str(tmp_path / "g.npz")]) == 2
    err = one_line_error(capsys)
    assert "holds one array, but the model has 2 inputs (x, y)" in err and ".npz" in err


# -- --out -----------------------------------------------------------------------------------------
def test_unwritable_out_is_refused_before_the_engine_starts(mlp_files, tmp_path, capsys, no_engine):
    _, _, model_path, feeds_path = mlp_files
    before = sorted(p.name for p in tmp_path.iterdir())
    args = ["grad", model_path, "--feeds", feeds_path, "--engine", "ray", "--out"]
    assert main([*args, str(tmp_path / "missing" / "g.npz")]) == 2
    assert f"directory {tmp_path / 'missing'} does not exist" in one_line_error(capsys)
    (tmp_path / "dir.npz").mkdir()
    assert main([*args, str(tmp_path / "dir.npz")]) == 2
    assert "is a directory" in one_line_error(capsys)
    assert not no_engine
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, "dir.npz"])  # no probe left behind


@pytest.mark.skipif(
    not hasattr(__import__("os"), "geteuid") or __import__("os").geteuid() == 0, reason="root writes anywhere"
)
def test_out_in_a_read_only_directory_is_refused(mlp_files, tmp_path, capsys, no_engine):
    _, _, model_path, feeds_path = mlp_files
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    assert main(["grad", model_path, "--feeds", feeds_path, "--out", str(locked / "g.npz")]) == 2
    assert "cannot write in" in one_line_error(capsys)


def test_out_is_written_whole_or_not_at_all(mlp_files, tmp_path, capsys):
    model, feeds, model_path, _ = mlp_files
    out = tmp_path / "g.npz"
    out.write_bytes(b"the previous result")
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=feeds["x"][:, :3], y=feeds["y"])
    assert main(["grad", model_path, "--feeds", str(bad), "--out", str(out)]) == 2
    assert "feed 'x' has shape (256, 3)" in one_line_error(capsys)
    assert out.read_bytes() == b"the previous result"
    # numpy's rule: an --out without .npz gets it; the result replaces the old file, nothing else is left
    np.savez(tmp_path / "good.npz", **feeds)
    assert main(["grad", model_path, "--feeds", str(tmp_path / "good.npz"), "--out", str(tmp_path / "g")]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    with np.load(out) as g:
        assert set(g.files) == {"loss", *model.params}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["bad.npz", "feeds.npz", "g.npz", "good.npz", "mlp.gsm"]
    )


# -- ONNX external data ----------------------------------------------------------------------------
def test_missing_external_data_names_the_file_and_the_tensor(onnx_model, tmp_path, capsys):
    path, npy, _ = onnx_model
    (tmp_path / "m.onnx.data").unlink()
    with pytest.raises(GraphError) as info:
        load_onnx(path)
    message = str(info.value)
    assert f"external data file {tmp_path / 'm.onnx.data'} is missing" in message
    assert "tensor 'W'" in message and "not an ONNX model" not in message
    assert main(["plan", str(path)]) == 2
    assert "m.onnx.data is missing (tensor 'W' needs it" in one_line_error(capsys)


def test_truncated_external_data_is_one_line_naming_the_tensor(onnx_model, tmp_path, capsys):
    path, _, _ = onnx_model
    data = tmp_path / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:100])
    assert main(["plan", str(path)]) == 2
    err = one_line_error(capsys)
    assert "cannot read its external data" in err and "'W'" in err


# -- partition counts the graph cannot give ----------------------------------------------------------
def test_more_partitions_than_the_graph_can_give_is_refused(onnx_model, tmp_path, capsys, no_engine):
    path, npy, _ = onnx_model
    grad = ["grad", str(path), "--feeds", str(npy), "--out", str(tmp_path / "g.npz"), "--engine", "ray"]
    assert main([*grad, "--partitions", "9"]) == 2
    assert "9 partitions asked for, but the graph can be cut into at most 2 partitions" in one_line_error(capsys)
    assert not no_engine and not (tmp_path / "g.npz").exists()
    assert main(["plan", str(path), "--feeds", str(npy), "--partitions", "3"]) == 2
    assert "at most 2 partitions" in one_line_error(capsys)
    assert main(["plan", str(path), "--feeds", str(npy), "--partitions", "2"]) == 0  # the most it can give
    assert "plan: 2 partitions" in capsys.readouterr().out


def test_plan_job_no_longer_clamps_an_explicit_count(onnx_model):
    from gradserve.server.planning.partition import plan_model

    path, _, x = onnx_model
    with pytest.raises(GraphError, match="at most 2 partitions"):
        plan_model(load_onnx(path), {"x": x}, partitions=4)


@pytest.mark.slow
def test_local_ray_engine_refuses_before_any_worker_starts(ray_engine, onnx_model):
    path, _, x = onnx_model
    with gradserve.local("ray", partitions=9) as engine:
        with pytest.raises(GraphError, match="at most 2 partitions"):
            engine.gradients(load_onnx(path), {"x": x})
        assert engine._pool.actors == []  # refused while choosing, before deploying


@pytest.mark.slow
def test_server_refuses_at_submit_with_invalid_argument(ray_engine, onnx_model):
    from gradserve.client.remote import Client, InvalidArgument
    from serving import serving

    path, _, x = onnx_model
    calls = []

    class Shared:  # the session's engine, closed by its fixture; counts the jobs that reach it
        name = "ray"
        splits = True

        def gradients(self, model, feeds, *, partitions=None, **options):
            calls.append(partitions)
            return ray_engine.gradients(model, feeds, partitions=partitions, **options)

    model = load_onnx(path)
    with serving(Shared) as srv, Client(srv.address, timeout=60) as client:
        with pytest.raises(InvalidArgument) as info:
            client.submit(model, {"x": x}, partitions=9)
        assert info.value.code.name == "INVALID_ARGUMENT" and "at most 2 partitions" in str(info.value)
        assert calls == []
        assert client.gradients(model, {"x": x}, partitions=2).info["partitions"] == 2  # the most is fine


# -- options that contradict each other ------------------------------------------------------------
@pytest.mark.parametrize(
    "extra, fault",
    [
        (["--server", "127.0.0.1:9", "--engine", "ray"], "--engine ray runs the job in this process and --server"),
        (["--server", "127.0.0.1:9", "--engine", "inline"], "--engine inline runs the job in this process"),
        (["--server", "127.0.0.1:9", "--ray-address", "auto"], "--ray-address does not go with --server"),
        (["--token-file", "t"], "--token-file goes with --server"),
        (["--engine", "ray", "--tls-ca", "ca.pem"], "--tls-ca goes with --server"),
        (["--ray-address", "auto"], "--ray-address needs --engine ray"),
        (["--micro-batches", "2"], "need --engine ray or --server"),
    ],
)
def test_grad_options_that_contradict_each_other(mlp_files, tmp_path, capsys, no_engine, extra, fault):
    _, _, model_path, feeds_path = mlp_files
    assert main(["grad", model_path, "--feeds", feeds_path, "--out", str(tmp_path / "g.npz"), *extra]) == 2
    assert fault in one_line_error(capsys)
    assert not no_engine


@pytest.mark.parametrize(
    "extra, fault",
    [
        (["--ray-address", "auto", "--nodes", "2"], "--ray-address reads the cluster; --nodes describes one"),
        (["--ray-address", "auto", "--cpus-per-node", "2"], "--cpus-per-node describes one"),
        (["--split-at", "n", "--partitions", "2"], "give it or --partitions, not both"),
        (["--split-at", "n", "--memory-per-node", "1G"], "--split-at plans without a cluster"),
        (["--nodes", "0"], "--nodes must be at least 1"),
    ],
)
def test_plan_options_that_contradict_each_other(mlp_files, capsys, extra, fault):
    _, _, model_path, feeds_path = mlp_files
    assert main(["plan", model_path, "--feeds", feeds_path, *extra]) == 2  # before Ray is joined
    assert fault in one_line_error(capsys)


# -- plan plans what grad and the server run ---------------------------------------------------------
def test_plan_defaults_to_auto_and_says_so(mlp_files, capsys):
    _, _, model_path, feeds_path = mlp_files
    assert main(["plan", model_path, "--feeds", feeds_path]) == 0
    out = capsys.readouterr().out
    assert "as asked" not in out  # nothing was asked (it said "replicas: 1, as asked")
    for count in ("partitions", "micro-batches", "replicas"):
        assert f"\n{count}: 1, auto: " in out
    assert main(["plan", model_path, "--feeds", feeds_path, "--replicas", "1", "--partitions", "2"]) == 0
    out = capsys.readouterr().out
    assert "replicas: 1, as asked" in out and "partitions: 2, as asked" in out
    assert "micro-batches: 1, auto: " in out


def test_plan_without_feeds_plans_a_batch_of_one_and_says_so(mlp_files, capsys):
    _, _, model_path, _ = mlp_files
    assert main(["plan", model_path]) == 0
    out = capsys.readouterr().out
    assert "feeds: none given, so a batch of one" in out
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    assert "Default: zeros with every symbolic dimension 1, a batch of one" in " ".join(capsys.readouterr().out.split())
    assert main(["plan", model_path, "--micro-batches", "2"]) == 2  # a batch of one does not split
    assert "a batch of 1 cannot be split into 2" in one_line_error(capsys)


@pytest.mark.slow
def test_plan_shows_the_choice_the_ray_engine_makes(ray_engine, tmp_path, capsys):
    from graphs import deep_mlp

    model, feeds, _ = deep_mlp(layers=4, width=256, batch=512)
    model.save(tmp_path / "deep.gsm")
    np.savez(tmp_path / "feeds.npz", **feeds)
    assert main(["plan", str(tmp_path / "deep.gsm"), "--feeds", str(tmp_path / "feeds.npz"), "--partitions", "2"]) == 0
    planned = capsys.readouterr().out.splitlines()
    info = ray_engine.gradients(model, feeds, partitions=2).info
    # auto chose (on one node: no pipelining); plan used to say "micro-batches: 1, as asked"
    assert any(r.startswith(f"micro-batches: {info['micro_batches']}, auto: ") for r in info["auto"])
    assert f"auto: 2 partitions, {info['micro_batches']} micro-batches, {info['replicas']} replicas" in planned
    assert all(reason in planned for reason in info["auto"]), (info["auto"], planned)


def test_progress_without_a_known_total_counts_steps():
    """grad on the Ray engine with counts left to auto does not know how many steps there will be:
    the line counts them instead of showing a made-up total."""
    import io
    from types import SimpleNamespace

    from gradserve.client.progress import ProgressLine

    out = io.StringIO()
    ProgressLine(out, delay=0).update(
        SimpleNamespace(steps_total=0, steps_done=5, state="running", event=None, finished=False)
    )
    assert out.getvalue().startswith("[5 steps] running")
