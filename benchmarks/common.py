"""Shared benchmark plumbing: timing medians, the MLP the benchmarks time, exporting torch models,
starting a local server, bringing a local multi-node cluster up and down, printing a table.

Importing this module is cheap: torch is imported only by :func:`export_onnx` and gradserve only
by :func:`mlp`, so cluster and client processes (and single-threaded baselines that must set their
thread limits before numpy loads) can import it freely.
"""

from __future__ import annotations

import io
import os
import socket
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import IO, TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

    from gradserve import Model

ROOT = Path(__file__).resolve().parents[1]
LOCAL_CLUSTER = ROOT / "deploy" / "local-cluster"


# Why the Ray benchmarks run tens of untimed jobs per plan before timing any: every Ray process
# page-faults each page of the object store the first time it writes or maps it, and the store's
# allocator hands out fresh pages to a new process's objects for its first tens of jobs (an actor
# returning the 4 x 1024 MLP's 16 MB of dL/dw faulted ~1,500 pages per job over jobs 6-25, ~220 over
# jobs 21-40, at ~3-5 us a fault on this VM). A server lives for thousands of jobs: time that state.
WARMUP_WHY = "Ray processes page-fault the object store's pages over their first tens of jobs"


def proc_cpu_seconds(stat: Path) -> float:
    """User + system CPU seconds from a ``/proc/PID/stat`` (or ``/proc/PID/task/TID/stat``) file."""
    fields = stat.read_text().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def median_seconds(fn: Callable[[], object], repeat: int, warmup: int = 2) -> float:
    """Median wall time of ``fn`` over ``repeat`` runs after ``warmup`` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def mlp(layers: int, width: int, activation: str = "tanh", last_activation: bool = True, seed: int = 0) -> "Model":
    """A ``layers`` x ``width`` MLP (float32) with a mean-squared-error loss: inputs ``x`` and ``y``
    of shape (batch, width), parameters ``w{i}`` (width x width, scaled 1/sqrt(width)) and ``b{i}``
    (zeros); ``activation`` ("tanh" or "relu") after every layer, or all but the last if not
    ``last_activation``. The same seed gives the same weights in every process."""
    import numpy as np

    import gradserve

    rng = np.random.default_rng(seed)
    m = gradserve.ModelBuilder()
    act = {"tanh": m.tanh, "relu": m.relu}[activation]
    x = m.input("x", (None, width))
    y = m.input("y", (None, width))
    h = x
    for i in range(layers):
        w = m.param(f"w{i}", (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32))
        b = m.param(f"b{i}", np.zeros(width, np.float32))
        h = h @ w + b
        if last_activation or i < layers - 1:
            h = act(h)
    return m.loss(m.mse(h, y))


def mlp_feeds(batch: int, width: int, seed: int = 100) -> "dict[str, np.ndarray]":
    """Feeds ``x`` and ``y`` for :func:`mlp`: standard normal, float32, (batch, width)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal((batch, width)).astype(np.float32) for k in ("x", "y")}


def export_onnx(
    model: "torch.nn.Module", inputs: "Sequence[torch.Tensor]", names: Sequence[str], dynamic_batch: bool = False
) -> bytes:
    """ONNX bytes of ``model`` (TorchScript exporter, opset 17), with the batch axis symbolic if asked."""
    import torch

    f = io.BytesIO()
    axes = {n: {0: "batch"} for n in names} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            tuple(inputs),
            f,
            input_names=list(names),
            output_names=["loss"],
            opset_version=17,
            dynamo=False,
            training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=False,
            dynamic_axes=axes,
        )
    return f.getvalue()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(address: str, log: "IO[str]", *args: str) -> subprocess.Popen:
    """``gradserve serve --engine ray`` (embedded single-node Ray, no state dir) on ``address``, its
    log written to ``log`` (a file: a pipe nobody reads would fill up and stall the server), extra
    ``args`` appended; returns once it answers. Exits the benchmark if it does not start in 120 s."""
    import gradserve

    # "local": a Ray of its own, even while a cluster started with `ray start` runs on this machine
    # (Ray would join that one: another benchmark's or test's deploy/local-cluster).
    env = {**os.environ, "RAY_ADDRESS": "local"}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gradserve.client.cli",
            "serve",
            "--engine",
            "ray",
            "--address",
            address,
            "--state-dir",
            "none",
            *args,
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log,
        text=True,
    )
    deadline = time.monotonic() + 120
    with gradserve.Client(address, timeout=2) as client:
        while time.monotonic() < deadline:
            if server.poll() is not None:
                log.flush()
                sys.exit(f"the server exited:\n{Path(log.name).read_text()[-3000:]}")
            try:
                client.has_model("0" * 64)
                return server
            except Exception:  # noqa: BLE001 -- not listening yet
                time.sleep(0.2)
    server.kill()
    sys.exit("the server did not start within 120 s")


def cpu_model() -> str:
    """The CPU's "model name" from /proc/cpuinfo ("unknown CPU" elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


class Cluster:
    """``deploy/local-cluster`` with ``workers`` one-CPU worker nodes (the head has none) and its
    own state dir; ``down`` on exit, whatever happened. ``address``: the gradserve server's;
    ``ray_env()``: what a Ray driver needs to join it (RAY_ADDRESS, RAY_AUTH_MODE, RAY_AUTH_TOKEN_PATH)."""

    def __init__(self, workers: int, state: Path, cpus_per_node: int = 1) -> None:
        self.workers, self.state, self.cpus = workers, Path(state), cpus_per_node
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env["GRADSERVE_CLUSTER_DIR"] = str(self.state)
        self.address = ""

    def __enter__(self) -> "Cluster":
        try:
            up = subprocess.run(
                [
                    str(LOCAL_CLUSTER),
                    "up",
                    "--workers",
                    str(self.workers),
                    "--cpus-per-node",
                    str(self.cpus),
                    "--port",
                    str(free_port()),
                ],
                env=self.env,
                capture_output=True,
                text=True,
                timeout=300,
            )
        except BaseException:
            self.__exit__()
            raise
        if up.returncode != 0:
            self.__exit__()
            sys.exit(f"local-cluster up --workers {self.workers} failed:\n{up.stderr[-3000:]}")
        self.address = up.stdout.strip().split("=", 1)[1]
        return self

    def ray_env(self) -> dict[str, str]:
        """The ``export NAME=VALUE`` lines of the cluster's env file (``source "$GRADSERVE_CLUSTER_DIR/env"``)."""
        out = {}
        for line in (self.state / "env").read_text().splitlines():
            if line.startswith("export ") and "=" in line:
                name, value = line[len("export ") :].split("=", 1)
                out[name.strip()] = value.strip()
        return out

    def __exit__(self, *exc: object) -> None:
        down = subprocess.run([str(LOCAL_CLUSTER), "down"], env=self.env, capture_output=True, text=True, timeout=180)
        if down.returncode != 0:
            print(f"local-cluster down failed ({self.state}):\n{down.stderr[-2000:]}", file=sys.stderr)


def table(rows: list[tuple], header: tuple) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(header), line(tuple("-" * w for w in widths)), *map(line, rows)])
