"""Client-measured latency of a tiny job through gRPC and the Ray engine (issue 11).

    .venv/bin/python benchmarks/job_latency.py [--jobs 200] [--rounds 3]

Starts ``gradserve serve --engine ray`` (embedded single-node Ray) on a free port, uploads the seed
example (z = w x + b, y_hat = sigmoid(z), L = 1/2 (y - y_hat)^2, batch 4) once, then times one
client's ``Client.gradients`` calls at K=1 and K=2, the two alternating over rounds. Every result is
checked against the closed form. Reports p50/p90 per K and where a job's time goes: the server's
queue, the engine's own phases, and the rest (gRPC, parsing, the client).
Targets (issue 20): p50 <= 3 ms at K=1, <= 5 ms at K=2.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np

import gradserve
from common import free_port, start_server
from gradserve.client.demo import seed_closed_form, seed_example

TARGETS = {1: 3.0, 2: 5.0}  # issue 20 (issue 11 asked 5 and 8)


def _check(result, expected) -> None:
    for name, g in expected.items():
        assert np.allclose(result.grads[name], g, rtol=1e-9, atol=1e-12), (name, result.grads[name], g)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=200, help="jobs per K per round (default 200)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, K=1 and K=2 alternating (default 3)")
    args = parser.parse_args()
    model, feeds = seed_example()
    expected = seed_closed_form(feeds)
    address = f"127.0.0.1:{free_port()}"
    log = tempfile.NamedTemporaryFile("w+", prefix="gradserve-server-", suffix=".log")
    server = start_server(address, log, "--log-level", "warning")
    times: dict[int, list[float]] = {1: [], 2: []}
    parts: dict[int, dict[str, list[float]]] = {1: {}, 2: {}}
    try:
        with gradserve.Client(address) as client:
            model_id = client.upload(model)
            for k in (1, 2):  # warm-up: actors started, stages loaded
                for _ in range(20):
                    client.gradients(model_id, feeds, partitions=k, micro_batches=1, replicas=1)
            for _ in range(args.rounds):
                for k in (1, 2):
                    for _ in range(args.jobs):
                        t = time.perf_counter()
                        result = client.gradients(model_id, feeds, partitions=k, micro_batches=1, replicas=1)
                        times[k].append(time.perf_counter() - t)
                        _check(result, expected)
                        info = result.info
                        seconds = {
                            "queued": info["server"]["queued_seconds"],
                            "running": info["server"]["running_seconds"],
                            **{f"engine {n}": v for n, v in info["seconds"].items() if isinstance(v, float)},
                        }
                        for name, v in seconds.items():
                            parts[k].setdefault(name, []).append(v)
    finally:
        server.terminate()
        server.wait(30)
        log.close()
    print(
        f"tiny job (seed example) through gRPC + the Ray engine, one client, model uploaded; "
        f"{args.rounds} rounds x {args.jobs} jobs per K; {os.cpu_count()} cores"
    )
    for k in (1, 2):
        ms = sorted(t * 1e3 for t in times[k])
        p50, p90 = statistics.median(ms), ms[int(0.9 * len(ms))]
        verdict = "met" if p50 <= TARGETS[k] else "MISSED"
        where = ", ".join(f"{n} {statistics.median(v) * 1e3:.2f}" for n, v in parts[k].items())
        print(
            f"K={k}: p50 {p50:.2f} ms, p90 {p90:.2f} ms (target p50 <= {TARGETS[k]:.0f} ms: {verdict}); "
            f"medians (ms): {where}"
        )


if __name__ == "__main__":
    main()
