"""What Ray itself costs a tiny job, beside what the engine costs on top of it (issue 20's latency).

    .venv/bin/python benchmarks/ray_floors.py [--calls 200] [--rounds 3]

One embedded single-node Ray, one process. Rounds alternate, so the machine's drift hits all alike:

- ``one actor call``: a small array to an actor and a small array back (K=1's floor: the engine
  runs a K=1 job as one call);
- ``three chained calls``: actor A, then B on A's result, then A on B's (K=2 M=1's shape through
  the driver: forward of partition 0; forward, backward and dL/dw of partition 1; backward and
  dL/dw of partition 0), submitted by the driver;
- ``a call that makes another``: A, which calls B (found by its name, once) and waits for its
  answer inside its own call (a tiny K=2 job's shape: the engine nests its calls,
  ``server/ray_engine/nested.py``);
- ``engine K=1`` / ``engine K=2``: the Ray engine on the seed example (z = w x + b, sigmoid, squared
  error, batch 4), prepared and with a model key, as a server hands it over; K=2 nests its calls,
  and ``engine K=2, the driver's calls`` is the same job with nesting turned off (the path every
  job too large to nest takes);
- ``session step K=2``: a training session's step on the same model (SGD), whose stages update
  their weights at the end of their nested calls, and the same step through the driver's calls
  (its job's three calls, then an update call per stage);
- ``compiled graph``: the three chained calls as a Ray compiled graph (``ray.dag``), then each of
  its two actors' CPU while the graph sits idle for 2 s: its actors poll their input channels, so
  an idle graph keeps a core busy per actor.

Prints p50 per row and the engine's own part (its p50 minus the matching floor). Issue 20's
targets (through gRPC, which adds the server's own ~1-2 ms): K=1 <= 3 ms, K=2 <= 5 ms.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import ray

from common import cpu_model, proc_cpu_seconds, table
from gradserve.client.demo import seed_example
from gradserve.server.planning.prepare import prepare
from gradserve.server.ray_engine import engine as engine_module
from gradserve.server.ray_engine.engine import RayEngine
from gradserve.worker.optim import SGD

IDLE_SECONDS = 2.0


@ray.remote
class Echo:
    """Returns a small array, as a stage returns a boundary value or a loss."""

    def __init__(self) -> None:
        self.peers: dict[str, Any] = {}

    def step(self, *values: np.ndarray) -> np.ndarray:
        return np.zeros(4)

    def relay(self, peer: str, value: np.ndarray) -> np.ndarray:
        """Calls the actor named ``peer`` and waits for it, as a stage's Relay step does."""
        if peer not in self.peers:
            self.peers[peer] = ray.get_actor(peer)
        return ray.get(self.peers[peer].step.remote(value)) + 1

    def pid(self) -> int:
        return os.getpid()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=200, help="timed calls per row per round (default 200)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, the rows alternating (default 3)")
    args = parser.parse_args()
    engine = RayEngine()  # starts the embedded Ray
    model, feeds = seed_example()
    prepared = prepare(model, feeds)
    a, b = Echo.remote(), Echo.options(name=f"ray-floors-{os.getpid()}").remote()
    x = np.ones(4)

    def one_call() -> object:
        return ray.get(a.step.remote(x))

    def chained_calls() -> object:
        first = a.step.remote(x)
        second = b.step.remote(first)
        third = a.step.remote(second)
        ray.wait([third], fetch_local=False)
        return ray.get(third)

    def nested_call() -> object:
        return ray.get(a.relay.remote(f"ray-floors-{os.getpid()}", x))

    def driver_calls(nested: bool) -> contextlib.AbstractContextManager:
        """Nesting turned off: the same job through the driver's calls, as a larger one would go."""
        return contextlib.nullcontext() if nested else mock.patch.object(engine_module, "nestable", lambda *a: False)

    def engine_job(k: int, nested: bool = True):
        def job() -> object:
            with driver_calls(nested):
                result = engine.gradients(
                    model, feeds, partitions=k, micro_batches=1, replicas=1, prepared=prepared, model_key="seed"
                )
            assert np.isfinite(result.loss) and result.info["nested"] == (k > 1 and nested)
            return result

        return job

    session = engine.session(model, SGD(lr=0.01), partitions=2, micro_batches=1, replicas=1)

    def session_step(nested: bool = True):
        def step() -> object:
            with driver_calls(nested):
                result = session.step(feeds)
            assert np.isfinite(result.loss) and result.info["nested"] == nested
            return result

        return step

    rows = {
        "one actor call": one_call,
        "three chained calls": chained_calls,
        "a call that makes another": nested_call,
        "engine K=1": engine_job(1),
        "engine K=2": engine_job(2),
        "engine K=2, the driver's calls": engine_job(2, nested=False),
        "session step K=2 (SGD)": session_step(),
        "session step K=2, the driver's calls": session_step(nested=False),
    }
    times: dict[str, list[float]] = {name: [] for name in rows}
    for fn in rows.values():  # warm-up: actors started, stages loaded
        for _ in range(20):
            fn()
    for _ in range(args.rounds):
        for name, fn in rows.items():
            for _ in range(args.calls):
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)

    from ray.dag import InputNode  # the compiled graph last: it holds its actors until torn down

    with InputNode() as inp:
        dag = a.step.bind(b.step.bind(a.step.bind(inp)))
    graph = dag.experimental_compile()
    try:
        for _ in range(20):
            ray.get(graph.execute(x))
        compiled = []
        for _ in range(args.calls * args.rounds):
            t = time.perf_counter()
            ray.get(graph.execute(x))
            compiled.append(time.perf_counter() - t)
        pids = [ray.get(actor.pid.remote()) for actor in (a, b)]
        before = [proc_cpu_seconds(Path(f"/proc/{pid}/stat")) for pid in pids]
        time.sleep(IDLE_SECONDS)
        idle = [(proc_cpu_seconds(Path(f"/proc/{pid}/stat")) - b0) / IDLE_SECONDS for pid, b0 in zip(pids, before)]
    finally:
        graph.teardown()
    session.close()
    engine.close()

    p50 = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
    own = {
        "engine K=1": p50["one actor call"],
        "engine K=2": p50["a call that makes another"],
        "engine K=2, the driver's calls": p50["three chained calls"],
    }
    print(
        f"tiny job floors, one embedded Ray; {args.rounds} rounds x {args.calls} per row, alternating; "
        f"{os.cpu_count()} cores, {cpu_model()}"
    )
    body = [(name, f"{p50[name]:.2f}", f"{p50[name] - own[name]:.2f}" if name in own else "") for name in rows] + [
        ("compiled graph (three calls)", f"{statistics.median(compiled) * 1e3:.2f}", "")
    ]
    print(table(body, ("path", "p50 ms", "engine's own ms (p50 - its floor)")))
    print(
        f"an idle compiled graph's actors: {', '.join(f'{c:.2f}' for c in idle)} CPU-seconds per second each "
        f"(an ordinary idle actor: ~0.01)"
    )


if __name__ == "__main__":
    main()
