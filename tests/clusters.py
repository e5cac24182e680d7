"""A real multi-node Ray cluster with a gradserve server in front (deploy/local-cluster), for the
slow tests: ``with local_cluster(tmp_path, workers=3) as (address, state): ...``."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
from pathlib import Path
from typing import Iterator

LOCAL_CLUSTER = Path(__file__).resolve().parents[1] / "deploy" / "local-cluster"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_cluster(tmp_path: Path, workers: int, *up_args: str) -> Iterator[tuple[str, Path]]:
    """Bring up ``workers`` one-CPU worker nodes and a server; yield (server address, state dir,
    which holds server.log); take everything down afterwards and check it went."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["GRADSERVE_CLUSTER_DIR"] = str(tmp_path / "cluster")
    up = subprocess.run(
        [
            str(LOCAL_CLUSTER),
            "up",
            "--workers",
            str(workers),
            "--cpus-per-node",
            "1",
            "--port",
            str(free_port()),
            *up_args,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    try:
        assert up.returncode == 0, up.stderr[-4000:]
        yield up.stdout.strip().split("=", 1)[1], tmp_path / "cluster"
    finally:
        down = subprocess.run([str(LOCAL_CLUSTER), "down"], env=env, capture_output=True, text=True, timeout=180)
        assert down.returncode == 0, down.stderr[-3000:]
