"""deploy/local-cluster: a real multi-node Ray cluster on this machine behind a gradserve server,
serving jobs spread over its nodes, and leaving no process behind (after `down`, or a failed `up`).
The deployment files (Dockerfile, launcher config, KubeRay) are checked in test_deploy.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from clusters import LOCAL_CLUSTER, free_port


def _bin(name: str) -> str:
    """An entry point of the environment running the tests (the venv's), else from PATH."""
    path = Path(sys.executable).parent / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed")
    return found


def test_local_cluster_script_basics(tmp_path):
    assert os.access(LOCAL_CLUSTER, os.X_OK), "deploy/local-cluster must be executable"
    subprocess.run(["bash", "-n", str(LOCAL_CLUSTER)], check=True)
    env = {**os.environ, "GRADSERVE_CLUSTER_DIR": str(tmp_path / "none")}
    down = subprocess.run([str(LOCAL_CLUSTER), "down"], env=env, capture_output=True, text=True, timeout=30)
    assert down.returncode == 0 and down.stdout == "", down.stderr
    bad = subprocess.run(
        [str(LOCAL_CLUSTER), "up", "--workers", "x"], env=env, capture_output=True, text=True, timeout=30
    )
    assert bad.returncode != 0 and bad.stdout == "" and "--workers" in bad.stderr
    # port 0 would let the server pick one the script could not health-check or print
    zero = subprocess.run(
        [str(LOCAL_CLUSTER), "up", "--port", "0"], env=env, capture_output=True, text=True, timeout=30
    )
    assert zero.returncode != 0 and "--port must be a port number (1-65535), got 0" in zero.stderr


def _pgrep(*args: str) -> list[int]:
    """Live (not zombie) processes matching ``pgrep ARGS``."""
    out = subprocess.run(["pgrep", *args], capture_output=True, text=True)
    live = []
    for pid in map(int, out.stdout.split()):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue  # gone meanwhile
        if state != "Z":
            live.append(pid)
    return live


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _export_models(tmp_path: Path):
    """The MLP and the Transformer block, float64, WithMSE (the graph's output is the loss),
    exported with a dynamic batch axis; feeds with a batch size other than the export's."""
    torch = pytest.importorskip("torch")
    import models as M

    gen = torch.Generator().manual_seed(5)
    cases = []
    mlp = M.WithMSE(M.make_mlp(seed=1).double())
    x = torch.randn(4, 8, generator=gen, dtype=torch.float64)
    t = torch.rand(4, 4, generator=gen, dtype=torch.float64)
    path = M.export(mlp, (x, t), tmp_path / "mlp.onnx", ["x", "target"], ["loss"], dynamic_batch=True)
    cases.append(
        (
            "mlp",
            path,
            {
                "x": np.random.default_rng(1).standard_normal((10, 8)),
                "target": np.random.default_rng(2).random((10, 4)),
            },
        )
    )
    block = M.WithMSE(M.make_transformer(seed=2).double())
    tokens = torch.randint(0, 20, (3, 6), generator=gen)
    t = torch.randn(3, 3, generator=gen, dtype=torch.float64)
    path = M.export(
        block, (tokens, t), tmp_path / "transformer.onnx", ["tokens", "target"], ["loss"], dynamic_batch=True
    )
    cases.append(
        (
            "transformer",
            path,
            {
                "tokens": np.random.default_rng(3).integers(0, 20, (8, 6)),
                "target": np.random.default_rng(4).standard_normal((8, 3)),
            },
        )
    )
    return cases


def _assert_same(got_loss: float, got: dict, want) -> None:
    assert got_loss == pytest.approx(want.loss, rel=1e-10, abs=1e-14)
    assert set(got) == set(want.grads)
    for name, g in want.grads.items():
        np.testing.assert_allclose(got[name], g, rtol=1e-10, atol=1e-14, err_msg=name)


@pytest.mark.slow
def test_local_cluster_up_cleans_up_when_a_step_fails(tmp_path):
    """The server refuses its options after Ray is up: `up` fails and leaves no process behind."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["GRADSERVE_CLUSTER_DIR"] = str(tmp_path / "cluster")
    up = subprocess.run(
        [str(LOCAL_CLUSTER), "up", "--workers", "1", "--port", str(free_port()), "--", "--no-such-option"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert up.returncode != 0 and up.stdout == ""
    assert "no-such-option" in up.stderr and "cleaning up" in up.stderr
    temp_dir = re.search(r"temp dir (\S+)\)", up.stderr).group(1)
    assert not _pgrep("-f", re.escape(temp_dir)), "Ray processes left after a failed `up`"
    assert not Path(temp_dir).exists()


@pytest.mark.slow
def test_local_cluster_serves_jobs_spread_over_nodes(tmp_path):
    """`local-cluster up --workers 2`: 3 raylets with token auth and a server; `gradserve grad
    --server --partitions 3` equals the inline engine for an MLP and a Transformer block; the
    partitions ran on >= 2 of the cluster's nodes; `down` leaves no process of the cluster."""
    import gradserve

    cases = _export_models(tmp_path)
    state = tmp_path / "cluster"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["GRADSERVE_CLUSTER_DIR"] = str(state)
    t0 = time.monotonic()
    up = subprocess.run(
        [str(LOCAL_CLUSTER), "up", "--workers", "2", "--port", str(port)],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    cluster_tmp = sid = server_pid = None
    try:
        assert up.returncode == 0, up.stderr[-4000:]
        lines = up.stdout.splitlines()
        assert len(lines) == 1 and lines[0].startswith("GRADSERVE_ADDRESS="), up.stdout
        address = lines[0].split("=", 1)[1]
        assert address == f"127.0.0.1:{port}"
        cluster_tmp = (state / "ray_temp_dir").read_text().strip()
        sid = (state / "ray.sid").read_text().strip()
        server_pid = int((state / "server.pid").read_text())
        ray_address = (state / "ray_address").read_text().strip()
        assert len(_pgrep("-f", f"/raylet .*{re.escape(cluster_tmp)}")) == 3, "a head and two worker raylets"
        assert len(_pgrep("-f", f"/gcs_server .*{re.escape(cluster_tmp)}")) == 1
        print(f"up in {time.monotonic() - t0:.1f}s")

        # Token authentication is on: without the token the GCS refuses; with it, it answers.
        ray_cli = _bin("ray")
        refused = subprocess.run(
            [ray_cli, "health-check", "--address", ray_address],
            env={**env, "RAY_AUTH_MODE": "disabled"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert refused.returncode != 0
        token_env = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(state / "ray_auth_token")}
        subprocess.run([ray_cli, "health-check", "--address", ray_address], env=token_env, check=True, timeout=60)

        nodes_used: set[str] = set()
        for name, path, feeds in cases:
            want = gradserve.local().gradients(gradserve.load_model(path), feeds)
            feeds_file, out = tmp_path / f"{name}-feeds.npz", tmp_path / f"{name}-grads.npz"
            np.savez(feeds_file, **feeds)
            cli = subprocess.run(
                [
                    _bin("gradserve"),
                    "grad",
                    str(path),
                    "--feeds",
                    str(feeds_file),
                    "--out",
                    str(out),
                    "--server",
                    address,
                    "--partitions",
                    "3",
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=180,
            )
            assert cli.returncode == 0, f"{name}: {cli.stderr[-3000:]}"
            with np.load(out) as got:
                _assert_same(float(got["loss"]), {k: got[k] for k in got.files if k != "loss"}, want)

            # The result says where each partition ran: "replica 0 partition P: node ID (IP)".
            ran_on = re.findall(r"replica 0 partition \d+: node (\w+)", cli.stdout)
            assert len(ran_on) == 3, cli.stdout
            assert len(set(ran_on)) >= 2, f"{name}: all partitions on one node: {cli.stdout}"
            nodes_used |= set(ran_on)

        # ... and those are nodes of this cluster.
        listing = subprocess.run(
            [
                sys.executable,
                "-c",
                "import json, sys; from ray._raylet import GcsClient; "
                "print(json.dumps([i.node_id.hex() for i in GcsClient(address=sys.argv[1]).get_all_node_info(timeout=30).values()]))",
                ray_address,
            ],
            env=token_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert listing.returncode == 0, listing.stderr[-2000:]
        cluster_nodes = set(json.loads(listing.stdout.strip().splitlines()[-1]))
        assert len(cluster_nodes) == 3 and nodes_used <= cluster_nodes
    finally:
        down = subprocess.run([str(LOCAL_CLUSTER), "down"], env=env, capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stderr[-3000:]
    assert down.stdout == ""
    left = []
    if cluster_tmp:
        left += _pgrep("-f", re.escape(cluster_tmp))
    if sid:
        left += _pgrep("-s", sid)
    assert not left, subprocess.run(
        ["ps", "-o", "pid,args", "-p", ",".join(map(str, left))], capture_output=True, text=True
    ).stdout
    assert server_pid is None or not _alive(server_pid)
    assert not (state / "server.pid").exists() and not (state / "ray.sid").exists()
    print(f"whole test {time.monotonic() - t0:.1f}s")
