"""A training step through a server: a session's step against a job per step (issue 22).

    .venv/bin/python benchmarks/session_steps.py [--steps 8] [--rounds 3] [--layers 8 --width 1024 --batch 256]

Starts ``gradserve serve --engine ray`` (embedded single-node Ray) and trains a ``--layers`` x
``--width`` tanh MLP (float32) with SGD two ways, alternating rounds so that the machine's drift
hits both alike:

- **jobs**: the client holds the weights; each step sends the model (changed weights: a new model
  to hash and upload), runs a job at K=1, gets all of dL/dw back and applies SGD itself: what a
  training loop built on ``Client.gradients`` (or ``gradserve.torch.backward``) does;
- **session**: ``Client.session(model, SGD(...), partitions=1)``; each step sends the batch only,
  and the workers apply SGD to the weights they keep.

Both train the same model on the same batches; the losses are checked to agree. Prints the median
seconds per step of each and their ratio, and the bytes each step sends (feeds, and the model for jobs).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np

from common import cpu_model, free_port, mlp, mlp_feeds, start_server, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="steps per way per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, the two ways alternating")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=0.01)
    args = parser.parse_args()

    import gradserve
    from gradserve.optim import SGD

    model = mlp(args.layers, args.width, "tanh")
    batches = [mlp_feeds(args.batch, args.width, seed=100 + i) for i in range(args.steps)]
    address = f"127.0.0.1:{free_port()}"
    log = tempfile.NamedTemporaryFile("w+", prefix="gradserve-server-", suffix=".log")
    server = start_server(address, log, "--log-level", "warning", "--state-dir", "none")
    seconds: dict[str, list[float]] = {"jobs": [], "session": []}
    try:
        with gradserve.Client(address, timeout=600) as client:

            def by_jobs() -> list[float]:
                weights = {k: v.copy() for k, v in model.params.items()}
                losses = []
                for feeds in batches:
                    t = time.perf_counter()
                    step_model = gradserve.Model(
                        model.nodes, model.inputs, weights, model.loss, model.constants, model.opset
                    )
                    result = client.gradients(step_model, feeds, partitions=1, micro_batches=1, replicas=1)
                    weights = {k: w - args.lr * result.grads[k] for k, w in weights.items()}
                    seconds["jobs"].append(time.perf_counter() - t)
                    losses.append(result.loss)
                return losses

            def by_session() -> list[float]:
                losses = []
                with client.session(model, SGD(lr=args.lr), partitions=1, micro_batches=1, replicas=1) as session:
                    for feeds in batches:
                        t = time.perf_counter()
                        losses.append(session.step(feeds).loss)
                        seconds["session"].append(time.perf_counter() - t)
                return losses

            for way in (by_jobs, by_session):  # warm-up: actors, kernels, plans
                way()
            seconds = {"jobs": [], "session": []}
            for _ in range(args.rounds):
                a, b = by_jobs(), by_session()
                np.testing.assert_allclose(a, b, rtol=1e-4)  # the same training, two ways
    finally:
        server.terminate()
        server.wait(30)
    model_bytes = sum(v.nbytes for v in model.params.values())
    feed_bytes = sum(v.nbytes for v in batches[0].values())
    jobs, session = statistics.median(seconds["jobs"]), statistics.median(seconds["session"])
    print(
        f"MLP {args.layers}x{args.width} tanh, batch {args.batch}, SGD; {args.steps} steps x {args.rounds} rounds "
        f"per way, medians; {cpu_model()}"
    )
    print(
        table(
            [
                ("job per step", f"{jobs * 1e3:.0f}", f"{(model_bytes + feed_bytes) / 2**20:.1f}", "1.00"),
                ("session step", f"{session * 1e3:.0f}", f"{feed_bytes / 2**20:.1f}", f"{jobs / session:.2f}"),
            ],
            ("way", "ms per step", "MiB sent per step", "speed-up"),
        )
    )


if __name__ == "__main__":
    main()
