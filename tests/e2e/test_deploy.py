"""Cluster deployment (deploy/): a real multi-node Ray cluster on this machine behind a gradserve
server (deploy/local-cluster), and the Dockerfile, cluster launcher config and KubeRay manifests
holding what the server needs."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERAY = DEPLOY / "kuberay"
LOCAL_CLUSTER = DEPLOY / "local-cluster"


def _bin(name: str) -> str:
    """An entry point of the environment running the tests (the venv's), else from PATH."""
    path = Path(sys.executable).parent / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed")
    return found


def _yaml():
    return pytest.importorskip("yaml", reason="PyYAML (a Ray dependency) is not installed: cannot parse the manifests")


def _load_all(path: Path) -> list[dict]:
    return [doc for doc in _yaml().safe_load_all(path.read_text()) if doc]


def _load(path: Path, kind: str | None = None) -> dict:
    docs = _load_all(path)
    if kind:
        docs = [d for d in docs if d.get("kind") == kind]
    assert len(docs) == 1, f"{path.name}: expected one {kind or 'document'}, found {len(docs)}"
    return docs[0]


# -- Dockerfile ------------------------------------------------------------------------------------
def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = (DEPLOY / "Dockerfile").read_text()
    lines, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        instr, _, args = current.partition(" ")
        lines.append((instr.upper(), args.strip()))
        current = ""
    return lines


def _ray_version_of_dockerfile() -> str:
    args = [a for i, a in _dockerfile() if i == "ARG" and a.startswith("RAY_VERSION=")]
    assert args, "the Dockerfile pins the Ray version with ARG RAY_VERSION=..."
    return args[0].split("=", 1)[1]


def test_dockerfile_base_is_pinned():
    froms = [a for i, a in _dockerfile() if i == "FROM"]
    assert froms, "no FROM"
    for image in froms:
        image = image.split()[0]
        name, _, tag = image.split("@")[0].partition(":")
        assert tag and tag != "latest", f"FROM {image}: pin a tag"
        assert re.match(r"\d+\.\d+\.\d+", tag), f"FROM {image}: the tag must carry a full version (x.y.z)"


def test_dockerfile_runs_gradserve_as_non_root():
    instructions = _dockerfile()
    users = [a for i, a in instructions if i == "USER"]
    assert users, "the image must switch to a non-root USER"
    assert users[-1].split(":")[0] not in ("root", "0")
    entrypoint = [json.loads(a) for i, a in instructions if i == "ENTRYPOINT"]
    assert entrypoint and entrypoint[-1] == ["gradserve"]
    cmd = [json.loads(a) for i, a in instructions if i == "CMD"][-1]
    assert cmd[0] == "serve" and "--ray-address" in cmd and "--address" in cmd
    assert cmd[cmd.index("--address") + 1] == "0.0.0.0:50051"
    assert any(i == "EXPOSE" and "50051" in a.split() for i, a in instructions)


def test_dockerfile_installs_the_package_without_test_extras():
    runs = " ".join(a for i, a in _dockerfile() if i == "RUN")
    install = re.search(r"pip install [^&]*?(?<![\w/.-])\"?\.(\[[^\]]*\])?\"?(?=\s|$)", runs)
    assert install, "installs the package with `pip install .` (or `.[extras]`)"
    assert "torch" not in runs and "test" not in (install.group(1) or "") and "dev" not in (install.group(1) or "")


def test_dockerfile_copies_only_what_exists_and_is_not_ignored():
    copies = [a for i, a in _dockerfile() if i in ("COPY", "ADD")]
    assert copies
    ignored = (
        [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")]
        if (ROOT / ".dockerignore").exists()
        else []
    )
    sources = []
    for args in copies:
        words = [w for w in shlex.split(args) if not w.startswith("--")]
        sources += words[:-1]
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
        top = src.rstrip("/").split("/")[0]
        assert not any(fnmatch.fnmatch(top, pat) for pat in ignored), f"COPY {src}: excluded by .dockerignore"
    # Everything `pip install .` builds from is copied: pyproject.toml, its readme, the packages.
    copied = {s.rstrip("/") for s in sources}
    assert {"pyproject.toml", "README.md", "__init__.py", "proto", "worker", "server", "client"} <= copied


# -- the Ray cluster launcher config -----------------------------------------------------------------
def test_cluster_yaml_is_a_valid_launcher_config():
    config = _load(DEPLOY / "cluster.yaml")
    try:
        from ray.autoscaler._private.util import validate_config
    except ImportError as exc:  # jsonschema comes with Ray; without it the schema cannot be checked
        pytest.skip(f"cannot validate against Ray's schema: {exc}")
    validate_config(config)  # Ray's own JSON schema for `ray up` files

    head = config["head_start_ray_commands"]
    joined = "\n".join(head)
    start = next(i for i, c in enumerate(head) if "ray start --head" in c)
    serve = next(i for i, c in enumerate(head) if "gradserve serve" in c)
    assert start < serve, "the server starts after the head"
    assert "--ray-address auto" in head[serve] and "50051" in head[serve] and "--auth-token-file" in head[serve]
    for cmd in [*head, *config["worker_start_ray_commands"]]:
        if "ray start" in cmd:
            assert "RAY_AUTH_MODE=token" in cmd, f"token auth on every node: {cmd}"
    assert "RAY_AUTH_MODE=token" in head[serve]
    assert "~/.ray/auth_token" in config["file_mounts"], "the Ray token reaches every node"
    assert any("gradserve" in c and "pip install" in c for c in config["setup_commands"])
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert workers and all(0 <= t["min_workers"] <= t["max_workers"] <= config["max_workers"] for t in workers)
    assert "ray start --head" in joined


# -- KubeRay -----------------------------------------------------------------------------------------
def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def _env(container: dict) -> dict:
    return {e["name"]: e for e in container.get("env", [])}


def _assert_ray_token_env(container: dict, secrets: dict[str, dict]) -> None:
    env = _env(container)
    assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{container['name']}: RAY_AUTH_MODE=token"
    ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref["key"] in secrets[ref["name"]]["stringData"], f"{container['name']}: {ref} not in secret.example.yaml"


def _secrets() -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in _load_all(KUBERAY / "secret.example.yaml") if d["kind"] == "Secret"}


def _serve_container(cluster: dict) -> dict:
    head = cluster["spec"]["headGroupSpec"]["template"]
    found = [c for c in _containers(head) if " serve " in " ".join(c.get("command", []) + c.get("args", [])) + " "]
    assert len(found) == 1, "exactly one container runs `gradserve serve`"
    return found[0]


def test_raycluster_runs_the_server_with_what_it_needs():
    cluster = _load(KUBERAY / "raycluster.yaml", "RayCluster")
    secrets = _secrets()
    assert cluster["spec"]["rayVersion"] == _ray_version_of_dockerfile()
    head = cluster["spec"]["headGroupSpec"]["template"]
    containers = _containers(head)
    assert containers[0]["name"] == "ray-head", "KubeRay takes the first container as the Ray one"
    server = _serve_container(cluster)
    assert server["image"] == containers[0]["image"], "driver and head: same image, same Ray and Python"

    words = " ".join(server.get("command", []) + server.get("args", [])).split()
    assert "gradserve" in words and "serve" in words
    assert words[words.index("--ray-address") + 1] == "auto"
    assert words[words.index("--address") + 1] == "0.0.0.0:50051"
    assert any(p["containerPort"] == 50051 for p in server["ports"])
    for probe in ("readinessProbe", "livenessProbe"):
        assert server[probe]["grpc"]["port"] == 50051, f"{probe}: gRPC health check on 50051"
    for part in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(server["resources"][part])

    # The API token: a Secret mounted as a file, passed with --auth-token-file.
    token_file = words[words.index("--auth-token-file") + 1]
    volumes = {v["name"]: v for v in head["spec"]["volumes"]}
    mount = next(m for m in server["volumeMounts"] if token_file.startswith(m["mountPath"].rstrip("/") + "/"))
    secret = volumes[mount["name"]]["secret"]
    assert secret["secretName"] in secrets
    key = next(i["key"] for i in secret["items"] if token_file.endswith("/" + i["path"]))
    assert key in secrets[secret["secretName"]]["stringData"]

    # A driver in a sibling container: shared /tmp/ray and process namespace, the Ray token.
    assert head["spec"].get("shareProcessNamespace") is True
    tmp_mounts = {
        c["name"]: [m["name"] for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp/ray"]
        for c in (containers[0], server)
    }
    assert all(tmp_mounts.values()) and tmp_mounts["ray-head"] == tmp_mounts[server["name"]]
    assert "emptyDir" in volumes[tmp_mounts["ray-head"][0]]
    assert cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"

    _assert_ray_token_env(containers[0], secrets)
    _assert_ray_token_env(server, secrets)
    if cluster["spec"].get("enableInTreeAutoscaling"):
        _assert_ray_token_env({"name": "autoscaler", **cluster["spec"]["autoscalerOptions"]}, secrets)
    for group in cluster["spec"]["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        worker = _containers(group["template"])[0]
        assert worker["image"] == containers[0]["image"]
        _assert_ray_token_env(worker, secrets)
        for part in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(worker["resources"][part])


def test_service_selects_the_server():
    cluster = _load(KUBERAY / "raycluster.yaml", "RayCluster")
    service = _load(KUBERAY / "gradserve.yaml", "Service")
    assert service["spec"]["selector"] == {"ray.io/cluster": cluster["metadata"]["name"], "ray.io/node-type": "head"}
    port = next(p for p in service["spec"]["ports"] if p["port"] == 50051)
    named = {p.get("name"): p["containerPort"] for p in _serve_container(cluster)["ports"]}
    assert named.get(port["targetPort"], port["targetPort"]) == 50051


def test_rayjob_runs_a_one_off_grad_job():
    job = _load(KUBERAY / "rayjob.yaml", "RayJob")
    secrets = _secrets()
    words = job["spec"]["entrypoint"].split()
    assert words[:2] == ["gradserve", "grad"]
    assert words[words.index("--engine") + 1] == "ray" and "--ray-address" in words and "--partitions" in words
    spec = job["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == _ray_version_of_dockerfile()
    containers = [
        _containers(spec["headGroupSpec"]["template"])[0],
        *[_containers(g["template"])[0] for g in spec["workerGroupSpecs"]],
        _containers(job["spec"]["submitterPodTemplate"])[0],
    ]
    for container in containers:
        assert container["image"] == containers[0]["image"]
        _assert_ray_token_env(container, secrets)
        assert {"cpu", "memory"} <= set(container["resources"]["limits"])


# -- deploy/local-cluster ----------------------------------------------------------------------------
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


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
        [str(LOCAL_CLUSTER), "up", "--workers", "1", "--port", str(_free_port()), "--", "--no-such-option"],
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
    port = _free_port()
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
