"""Ray engine vs inline engine on the same models, in the same run (issue: distributed engine).

    .venv/bin/python benchmarks/ray_vs_inline.py [--repeat 7] [--rounds 3] [--threads N]

Times one gradient job on an already-uploaded model (parameters placed, actors deployed: the
warm-up runs do that; the model is named by its content hash, as the server does) for the inline
engine and for the ray engine with K=1, K=2 M=1, K=2 M=4 and the default options (auto), and the
fixed per-job overhead of the ray engine on a tiny model. Targets (issue 20, on one node): K=1 at
most 1.1x inline's wall time on the 4 x 1024 MLP, K=2 M=1 at most 1.2x, auto no slower than K=2 M=1.
Also prints where the time goes: compute inside ops (per stage) vs the rest (transfer + scheduling).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

import gradserve
from common import WARMUP_WHY, median_seconds, mlp, mlp_feeds, table
from gradserve.server.ray_engine import RayEngine


def case(layers: int, width: int, batch: int):
    """The ``layers`` x ``width`` relu MLP (no relu after the last layer, mse loss) and a batch."""
    return mlp(layers, width, "relu", last_activation=False), mlp_feeds(batch, width)


# The plans timed against inline; "auto" is the engine's default options (it picks K, M and R).
PLANS: dict[str, dict] = {
    "K=1": dict(partitions=1, micro_batches=1, replicas=1),
    "K=2 M=1": dict(partitions=2, micro_batches=1, replicas=1),
    "K=2 M=4": dict(partitions=2, micro_batches=4, replicas=1),
    "auto": {},
}
TARGETS = {"K=1": "<= 1.1 (4x1024)", "K=2 M=1": "<= 1.2 (4x1024)", "auto": "<= K=2 M=1's"}


def tiny():
    m = gradserve.ModelBuilder()
    x = m.input("x", (None, 1), np.float64)
    y = m.input("y", (None, 1), np.float64)
    w, b = m.param("w", np.array([[0.5]])), m.param("b", np.array([0.1]))
    model = m.loss((0.5 * (y - m.sigmoid(x @ w + b)) ** 2).sum())
    return model, {"x": np.ones((4, 1)), "y": np.zeros((4, 1))}


def breakdown(engine, model, feeds, **options) -> str:
    """Where one job's time goes: compute inside each stage's ops, the pipeline's run (compute plus
    activation/error transfers and scheduling), fetching the loss and dL/dw, and submission; and
    the plan the engine ran (what auto chose)."""
    info = engine.gradients(model, feeds, **options).info
    seconds = info["seconds"]
    busy = "/".join(f"{b * 1e3:.0f}" for b in seconds["stage_compute"])
    return (
        f"ran K={info['partitions']} M={info['micro_batches']} R={info['replicas']}: ops {busy} ms per stage; "
        f"run {seconds['run'] * 1e3:.0f}, fetch {seconds['fetch'] * 1e3:.0f}, submit {seconds['submit'] * 1e3:.0f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per configuration (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="BLAS threads per Ray worker (default: all cores)")
    parser.add_argument("--skip-deep", action="store_true", help="skip the 8 x 2048 model")
    parser.add_argument(
        "--warmup", type=int, default=40, help=f"untimed jobs per Ray plan first (default 40): {WARMUP_WHY}"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="times each model's inline/ray comparison is repeated; the ratio shown is the median over "
        "the rounds, with their range (this machine's speed drifts over minutes)",
    )
    args = parser.parse_args()
    inline = gradserve.local()
    rows = []
    cases = [("MLP 4x1024, batch 512", *case(4, 1024, 512))]
    if not args.skip_deep:
        cases.append(("MLP 8x2048, batch 512", *case(8, 2048, 512)))
    with RayEngine(threads_per_worker=args.threads) as engine:
        for name, model, feeds in cases:
            # An already-uploaded model is known by its id (the server passes the content hash it
            # verified at upload), so jobs skip checking the weights against the placed copy.
            key = model.fingerprint()
            inline_times: list[float] = []
            ray_times: dict[str, list[float]] = {label: [] for label in PLANS}
            for plan in PLANS.values():
                for _ in range(args.warmup):
                    engine.gradients(model, feeds, **plan, model_key=key)
            for _ in range(args.rounds):  # inline and ray alternate, so drift hits both alike
                inline_times.append(median_seconds(lambda: inline.gradients(model, feeds), args.repeat))
                for label, plan in PLANS.items():
                    opts = dict(plan, model_key=key)
                    ray_times[label].append(median_seconds(lambda: engine.gradients(model, feeds, **opts), args.repeat))
            t_inline = statistics.median(inline_times)
            rows.append((name, "inline", f"{t_inline * 1e3:.0f}", "1.00", "", ""))
            for label, times in ray_times.items():
                ratios = sorted(t / ti for t, ti in zip(times, inline_times))
                opts = dict(PLANS[label], model_key=key)
                rows.append(
                    (
                        name,
                        f"ray {label}",
                        f"{statistics.median(times) * 1e3:.0f}",
                        f"{statistics.median(ratios):.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f})",
                        breakdown(engine, model, feeds, **opts),
                        TARGETS.get(label, ""),
                    )
                )
        model, feeds = tiny()
        for k in (1, 2):
            times = []
            for _ in range(3):
                engine.gradients(model, feeds, partitions=k)
            for _ in range(max(20, args.repeat)):
                t = time.perf_counter()
                engine.gradients(model, feeds, partitions=k)
                times.append(time.perf_counter() - t)
            rows.append(
                (
                    "tiny (seed example)",
                    f"ray K={k}",
                    f"{statistics.median(times) * 1e3:.1f}",
                    "",
                    "fixed per-job overhead",
                    "",
                )
            )
    threads = args.threads or "per job (all cores for M=1, shared for M>1)"
    print(
        f"median of {args.repeat} runs per round, {args.rounds} rounds, {os.cpu_count()} cores, BLAS threads per stage: {threads}"
    )
    print(table(rows, ("model", "engine", "ms/job", "vs inline (range)", "breakdown of one job", "target")))


if __name__ == "__main__":
    main()
