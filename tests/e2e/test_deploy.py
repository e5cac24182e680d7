"""Cluster deployment files (deploy/): the Dockerfile, the Ray cluster launcher config and the KubeRay
manifests hold what the server needs. A real multi-node cluster on this machine (deploy/local-cluster)
is in test_deploy_local_cluster.py."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERAY = DEPLOY / "kuberay"


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
