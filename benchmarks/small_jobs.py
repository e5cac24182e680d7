"""Client-measured latency of small models through gRPC and the Ray engine when the partitions (K)
and the model change from one job to the next (issue 19).

    .venv/bin/python benchmarks/small_jobs.py [--rounds 20]

Starts ``gradserve serve --engine ray`` (embedded single-node Ray) on a free port and uploads two
small float32 tanh MLPs with a mean-squared-error loss: 5 x 32 (21 KB of parameters) and 3 x 40
(20 KB), batch 16. Then cycles through the six (model, K=3/2/1) pairs in an order where every job
changes both the model and K. The first job of each pair is "cold" (its plan is made, its stages are
loaded on the actors); every later job is "warm". Reports the cold jobs, the warm jobs' p50/p90/max,
and the worker processes started after the cold jobs: the server's log lines of actors started and
retired, and the worker pids seen in the results' placement; and how many warm K>1 jobs nested
their calls (``info["nested"]``). Every result is checked against the
inline engine. Target (issue 19): every warm job < 50 ms, no worker started once warm.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import gradserve
from common import cpu_model, free_port, mlp, mlp_feeds, start_server

TARGET_MS = 50.0
MODELS = {"5x32": (5, 32), "3x40": (3, 40)}
# Model and K both change every job; starting with K=3 is the order that made the old pool (each
# actor reserving exactly its first stage's need) retire and start actors when warm.
PAIRS = [("3x40", 3), ("5x32", 2), ("3x40", 1), ("5x32", 3), ("3x40", 2), ("5x32", 1)]


def _check(result, expected) -> None:
    assert abs(result.loss - expected.loss) <= 1e-5 * max(1.0, abs(expected.loss)), (result.loss, expected.loss)
    for name, want in expected.grads.items():
        assert np.allclose(result.grads[name], want, rtol=1e-4, atol=1e-6), name


def _pool_lines(text: str) -> tuple[int, int]:
    """(actors started, actors retired) in a stretch of the server's log (the pool's lines)."""
    started = sum(int(n) for n in re.findall(r"worker pool: started (\d+)", text))
    retired = sum(int(n) for n in re.findall(r"worker pool: retired[^;]*? (\d+) actors \(nodes", text))
    return started, retired


class _Jobs:
    """One client's jobs on the two models through the server, timed by the client and checked."""

    def __init__(self, client: gradserve.Client, models: dict, feeds: dict) -> None:
        inline = gradserve.local()
        self.client, self.feeds = client, feeds
        self.expected = {name: inline.gradients(models[name], feeds[name]) for name in models}
        self.ids = {name: client.upload(model) for name, model in models.items()}
        self.pids: set[int] = set()  # worker processes the results name
        self.nested: dict[int, int] = {}  # per K: jobs whose calls nested (server/ray_engine/nested.py)

    def run(self, name: str, k: int) -> float:
        t = time.perf_counter()
        result = self.client.gradients(self.ids[name], self.feeds[name], partitions=k, micro_batches=1, replicas=1)
        seconds = time.perf_counter() - t
        _check(result, self.expected[name])
        self.pids |= {w["pid"] for row in result.info["placement"] for w in row}
        self.nested[k] = self.nested.get(k, 0) + bool(result.info.get("nested"))
        return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--rounds", type=int, default=20, help="warm rounds through the six (model, K) pairs (default 20)"
    )
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    models = {name: mlp(layers, width, seed=i) for i, (name, (layers, width)) in enumerate(MODELS.items())}
    feeds = {name: mlp_feeds(16, width) for name, (_, width) in MODELS.items()}
    address = f"127.0.0.1:{free_port()}"
    log = tempfile.NamedTemporaryFile("w+", prefix="gradserve-server-", suffix=".log")
    server = start_server(address, log, "--log-level", "info")
    warm: dict[int, list[float]] = {1: [], 2: [], 3: []}  # per K
    try:
        with gradserve.Client(address) as client:
            jobs = _Jobs(client, models, feeds)
            cold = [(name, k, jobs.run(name, k)) for name, k in PAIRS]
            cold_pids, warm_from = set(jobs.pids), Path(log.name).stat().st_size
            jobs.nested.clear()
            for _ in range(args.rounds):
                for name, k in PAIRS:
                    warm[k].append(jobs.run(name, k))
    finally:
        server.terminate()
        server.wait(30)
    text = Path(log.name).read_text()
    log.close()
    pools = _pool_lines(text[:warm_from]), _pool_lines(text[warm_from:])
    _report(cold, warm, *pools, len(jobs.pids - cold_pids), jobs.nested)


def _report(
    cold: list,
    warm: dict[int, list[float]],
    cold_pool: tuple[int, int],
    warm_pool: tuple[int, int],
    new_pids: int,
    nested: dict[int, int],
) -> None:
    ms = sorted(t * 1e3 for times in warm.values() for t in times)
    p50, p90 = statistics.median(ms), ms[int(0.9 * len(ms))]
    print(
        f"small models (5x32 and 3x40 tanh MLPs, 21 and 20 KB, batch 16) through gRPC + the Ray engine, "
        f"model and K changing every job; {os.cpu_count()} cores, {cpu_model()}"
    )
    print(
        "cold (first job of each pair): "
        + ", ".join(f"{n} K={k} {s * 1e3:.0f} ms" for n, k, s in cold)
        + f"; actors started {cold_pool[0]}, retired {cold_pool[1]}"
    )
    verdict = "met" if ms[-1] < TARGET_MS else "MISSED"
    print(
        f"warm: {len(ms)} jobs, p50 {p50:.2f} ms, p90 {p90:.2f} ms, max {ms[-1]:.2f} ms "
        f"(target: every job < {TARGET_MS:.0f} ms: {verdict}); jobs over it: {sum(t >= TARGET_MS for t in ms)}; p50 "
        + ", ".join(f"K={k} {statistics.median(times) * 1e3:.2f} ms" for k, times in warm.items())
    )
    print(
        f"once warm: actors started {warm_pool[0]}, retired {warm_pool[1]}; "
        f"worker processes not seen in the cold jobs: {new_pids}; calls nested: "
        + ", ".join(f"K={k} {nested.get(k, 0)}/{len(times)}" for k, times in warm.items() if k > 1)
    )


if __name__ == "__main__":
    main()
