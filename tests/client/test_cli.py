"""The gradserve command line: grad (inline and ray), plan, errors without tracebacks, --help."""

import re
import subprocess
import sys

import numpy as np
import pytest

import gradserve
from gradserve.client.cli import main
from gradserve.client.demo import mlp_example


@pytest.fixture
def saved_model(tmp_path):
    model, feeds = mlp_example()
    path = tmp_path / "mlp.gsm"
    model.save(path)
    np.savez(tmp_path / "feeds.npz", **feeds)
    return model, feeds, path, tmp_path / "feeds.npz"


def test_grad_inline_writes_loss_and_every_parameter(saved_model, tmp_path, capsys):
    model, feeds, path, feeds_path = saved_model
    out = tmp_path / "grads.npz"
    assert main(["grad", str(path), "--feeds", str(feeds_path), "--out", str(out)]) == 0
    reference = gradserve.local().gradients(model, feeds)
    with np.load(out) as g:
        assert set(g.files) == {"loss", *model.params}
        assert float(g["loss"]) == pytest.approx(reference.loss, rel=1e-7)
        for name in model.params:
            np.testing.assert_array_equal(g[name], reference.grads[name])
    assert "loss =" in capsys.readouterr().out


@pytest.mark.slow
def test_grad_ray_engine_in_a_fresh_process(saved_model, tmp_path):
    model, feeds, path, feeds_path = saved_model
    out = tmp_path / "grads.npz"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gradserve.client.cli",
            "grad",
            str(path),
            "--feeds",
            str(feeds_path),
            "--out",
            str(out),
            "--engine",
            "ray",
            "--partitions",
            "2",
            "--micro-batches",
            "2",
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    reference = gradserve.local().gradients(model, feeds)
    with np.load(out) as g:
        for name in model.params:
            np.testing.assert_allclose(
                g[name], reference.grads[name], rtol=1e-4, atol=1e-4 * np.abs(reference.grads[name]).max()
            )


def test_plan_prints_partitions_and_boundaries(saved_model, capsys):
    _, _, path, feeds_path = saved_model
    assert main(["plan", str(path), "--partitions", "3", "--feeds", str(feeds_path)]) == 0
    text = capsys.readouterr().out
    assert "plan: 3 partitions" in text and "boundary tensors:" in text and "FLOPs" in text


def test_bad_feeds_exit_2_with_one_line_naming_the_tensor(saved_model, tmp_path, capsys):
    _, feeds, path, _ = saved_model
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=feeds["x"][:, :3], y=feeds["y"])
    assert main(["grad", str(path), "--feeds", str(bad), "--out", str(tmp_path / "g.npz")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gradserve: error: feed 'x' has shape (256, 3)") and "Traceback" not in err


def test_missing_files_and_options_misuse(saved_model, tmp_path, capsys):
    _, _, path, feeds_path = saved_model
    assert main(["grad", str(tmp_path / "nope.onnx"), "--feeds", str(feeds_path), "--out", "g.npz"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["grad", str(path), "--feeds", str(feeds_path), "--out", "g.npz", "--partitions", "2"]) == 2
    assert "--engine ray" in capsys.readouterr().err


def test_console_script_help():
    proc = subprocess.run([sys.executable, "-m", "gradserve.client.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for command in ("grad", "plan", "serve", "demo"):
        assert command in proc.stdout


@pytest.mark.slow
def test_demo_through_a_local_server():
    proc = subprocess.run(
        [sys.executable, "-m", "gradserve.client.cli", "demo"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "server listening on 127.0.0.1:" in proc.stdout
    assert "all gradients match their references" in proc.stdout
    assert "server stopped" in proc.stdout


def test_plan_shows_memory_per_partition(saved_model, capsys):
    _, _, path, feeds_path = saved_model
    assert main(["plan", str(path), "--partitions", "2", "--feeds", str(feeds_path)]) == 0
    assert capsys.readouterr().out.count("  memory: ~") == 2


def test_plan_auto_explains_its_choice_for_a_described_cluster(tmp_path, capsys):
    from graphs import deep_mlp

    model, feeds, _ = deep_mlp(layers=6, width=512, batch=1024)
    model.save(tmp_path / "deep.gsm")
    np.savez(tmp_path / "feeds.npz", **feeds)
    args = [
        "plan",
        str(tmp_path / "deep.gsm"),
        "--feeds",
        str(tmp_path / "feeds.npz"),
        "--nodes",
        "3",
        "--memory-per-node",
        "160M",
    ]
    assert main([*args, "--partitions", "auto", "--micro-batches", "auto", "--replicas", "auto"]) == 0
    out = capsys.readouterr().out
    assert "cluster: 3 nodes with 160.0 MiB of memory" in out
    assert re.search(r"auto: 2 partitions, [2-8] micro-batches, 1 replicas", out)
    assert re.search(r"micro-batches: [2-8], auto: pipelining 2 partitions idles", out)
    assert "partitions: 2, auto: the whole job needs" in out and "the largest node has 160.0 MiB" in out
    assert "plan: 2 partitions" in out and out.count("  memory: ~") == 2
    # one partition does not fit: refused with the need and the largest node, exit status 2
    assert main([*args, "--partitions", "1"]) == 2
    err = capsys.readouterr().err
    assert "partition 0 of 1 needs" in err and "the largest node has 160.0 MiB" in err


def test_counts_accept_auto_and_refuse_nonsense(saved_model, capsys):
    _, _, path, feeds_path = saved_model
    with pytest.raises(SystemExit):
        main(["plan", str(path), "--partitions", "zero"])
    assert "'auto' or a whole number" in capsys.readouterr().err
    assert main(["grad", str(path), "--feeds", str(feeds_path), "--out", "g.npz", "--partitions", "auto"]) == 2
    assert "--engine ray" in capsys.readouterr().err


def test_version_is_the_packages(capsys):
    import tomllib
    from pathlib import Path

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    declared = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]["version"]
    assert capsys.readouterr().out.strip() == f"gradserve {declared}" == f"gradserve {gradserve.__version__}"
