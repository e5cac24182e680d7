"""Jobs/s of a gradserve server on a 1-node and on a 2-node cluster, in the same run (issue 10).

    .venv/bin/python benchmarks/cluster_throughput.py [--rounds 3] [--seconds 20] [--clients 4] [--model mlp|cnn]

Brings up two real multi-node Ray clusters on this machine with ``deploy/local-cluster`` (one
with 1 worker node, one with 2; 1 CPU per node, the head has none; each with its own server, state
dir and ports), then alternates rounds between them: in each round ``--clients`` client processes
send jobs (``--plan k1``: K=1; ``--plan auto``: default options) to the server for ``--seconds`` seconds, each job's loss and dL/dw checked against the
inline engine. ``--model mlp`` (the issue's setup): a 4 x 512 tanh MLP (float32, batch 1024), 8 MB of
feeds and gradients moved per job for ~80 ms of compute; ``--model cnn``: a small CNN on 32 x 32
images (float32, batch 64), compute-bound, with under 1 MB moved per job. Reports jobs/s per cluster (median
over rounds) and the ratio 2 nodes / 1 node per round (median and range). Target: >= 1.7.
Both clusters are brought down at the end, whatever happens.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import Cluster, mlp, mlp_feeds, proc_cpu_seconds, table

WIDTH, LAYERS, BATCH = 512, 4, 1024  # --model mlp
IMAGES, CHANNELS = 64, (3, 32, 64, 64)  # --model cnn: batch, channels per conv layer


def cnn(seed: int = 0):
    """Three 3x3 convolutions (3-32-64-64 channels, ReLU, 2x2 max pools after the first two) on
    32 x 32 images, global average pooling, a 64 x 10 linear layer, mean-squared error; float32."""
    import gradserve

    rng = np.random.default_rng(seed)
    m = gradserve.ModelBuilder()
    h = m.input("x", (None, CHANNELS[0], 32, 32))
    y = m.input("y", (None, 10))
    for i, (cin, cout) in enumerate(zip(CHANNELS, CHANNELS[1:])):
        w = m.param(f"conv{i}.weight", (rng.standard_normal((cout, cin, 3, 3)) / np.sqrt(9 * cin)).astype(np.float32))
        h = m.relu(m.op("Conv", h, w, pads=[1, 1, 1, 1]))
        if i < 2:
            h = m.op("MaxPool", h, kernel_shape=[2, 2], strides=[2, 2])
    h = m.op("Flatten", m.op("GlobalAveragePool", h))
    out = h @ m.param("fc.weight", (rng.standard_normal((CHANNELS[-1], 10)) / 8).astype(np.float32))
    return m.loss(m.mse(out, y))


def model_for(kind: str):
    return mlp(LAYERS, WIDTH, "tanh") if kind == "mlp" else cnn()


def feeds_for(kind: str, client: int) -> dict[str, np.ndarray]:
    if kind == "mlp":
        return mlp_feeds(BATCH, WIDTH, seed=100 + client)
    rng = np.random.default_rng(100 + client)
    return {
        "x": rng.standard_normal((IMAGES, CHANNELS[0], 32, 32)).astype(np.float32),
        "y": rng.standard_normal((IMAGES, 10)).astype(np.float32),
    }


# -- client processes -------------------------------------------------------------------------------
_state: dict = {}


PLANS = {"k1": {"partitions": 1}, "auto": {}}  # auto: the server chooses everything (the default)


def _init(kind: str, plan: str) -> None:
    import gradserve

    _state["kind"] = kind
    _state["options"] = PLANS[plan]
    _state["model"] = model_for(kind)
    _state["cases"] = {}
    _state["clients"] = {}
    _state["gradserve"] = gradserve


def _check(result, reference) -> None:
    """The job's loss and dL/dw equal the inline engine's (float32: up to rounding, relative to
    each gradient's largest entry; one pass per array, so checking costs the clients little)."""
    assert abs(result.loss - reference.loss) <= 1e-5 * max(1.0, abs(reference.loss)), (result.loss, reference.loss)
    assert result.grads.keys() == reference.grads.keys()
    for name, g in reference.grads.items():
        worst = float(np.max(np.abs(result.grads[name] - g)))
        assert worst <= 1e-4 * float(np.max(np.abs(g))) + 1e-7, f"{name}: differs from the inline engine by {worst}"


def _ensure(index: int, address: str):
    """Client ``index``'s connection to ``address``, feeds and inline reference (made once per process)."""
    gradserve, model = _state["gradserve"], _state["model"]
    if index not in _state["cases"]:
        feeds = feeds_for(_state["kind"], index)
        _state["cases"][index] = (feeds, gradserve.local().gradients(model, feeds))
    if address not in _state["clients"]:
        _state["clients"][address] = gradserve.Client(address)
    return (_state["clients"][address], *_state["cases"][index])


def _warm_up(args: tuple[int, str]) -> None:
    """Two jobs of client ``index`` on ``address``: the model uploaded, its parameters placed, actors started."""
    client, feeds, reference = _ensure(*args)
    for _ in range(2):
        _check(client.gradients(_state["model"], feeds, **_state["options"]), reference)


def _client_round(args: tuple[int, str, float, float]) -> tuple[int, float, list[str]]:
    """Send jobs until ``start + seconds``; (jobs done, when the last ended, nodes they ran on)."""
    index, address, start, seconds = args
    client, feeds, reference = _ensure(index, address)
    model = _state["model"]
    while time.time() < start:
        time.sleep(0.001)
    done, last, nodes = 0, start, []
    while time.time() < start + seconds:
        result = client.gradients(model, feeds, **_state["options"])
        last = time.time()
        _check(result, reference)
        done += 1
        nodes.append(result.info["placement"][0][0]["node_id"])
    return done, last, nodes


# -- where the CPU goes ------------------------------------------------------------------------------
_KINDS = (
    ("ray::StageHost", "workers (stage actors)"),
    ("gradserve serve", "servers"),
    ("spawn_main", "clients"),
    ("/raylet ", "raylets (object transfers)"),
)


def cpu_seconds() -> dict[str, float]:
    """CPU seconds used so far by each kind of process on this machine (Linux /proc; the rest,
    other users of the machine included, is "other")."""
    out: dict[str, float] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            seconds = proc_cpu_seconds(Path(f"/proc/{pid}/stat"))
        except OSError:
            continue  # gone meanwhile
        kind = next((name for key, name in _KINDS if key in cmd), "other")
        out[kind] = out.get(kind, 0.0) + seconds
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="rounds per cluster, alternating (default 3)")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of one round (default 20)")
    parser.add_argument("--clients", type=int, default=4, help="client processes sending jobs (default 4)")
    parser.add_argument(
        "--model",
        choices=["mlp", "cnn"],
        default="mlp",
        help="mlp: the issue's 4 x 512 MLP (data-heavy); cnn: a compute-bound CNN (default mlp)",
    )
    parser.add_argument(
        "--plan",
        choices=sorted(PLANS),
        default="k1",
        help="k1: partitions=1, the rest auto; auto: default options, the server chooses all (default k1)",
    )
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="gs-throughput-"))
    ctx = mp.get_context("spawn")
    rates: dict[int, list[float]] = {1: [], 2: []}
    spread: dict[int, set[str]] = {1: set(), 2: set()}
    cpu: dict[int, dict[str, float]] = {1: {}, 2: {}}  # CPU seconds per process kind, over the rounds
    done = {1: 0, 2: 0}
    with (
        Cluster(1, base / "one") as one,
        Cluster(2, base / "two") as two,
        ctx.Pool(args.clients, initializer=_init, initargs=(args.model, args.plan)) as pool,
    ):
        for cluster in (one, two):
            pool.map(_warm_up, [(i, cluster.address) for i in range(args.clients)])
        for _ in range(args.rounds):
            for nodes, cluster in ((1, one), (2, two)):
                start = time.time() + 3.0  # every client starts together
                before = cpu_seconds()
                runs = pool.map(_client_round, [(i, cluster.address, start, args.seconds) for i in range(args.clients)])
                after = cpu_seconds()
                jobs = sum(r[0] for r in runs)
                for kind, seconds in after.items():
                    cpu[nodes][kind] = cpu[nodes].get(kind, 0.0) + max(0.0, seconds - before.get(kind, 0.0))
                done[nodes] += jobs
                rates[nodes].append(jobs / (max(r[1] for r in runs) - start))
                for r in runs:
                    spread[nodes] |= set(r[2])
                print(f"  {nodes} node(s): {jobs} jobs, {rates[nodes][-1]:.2f} jobs/s", file=sys.stderr, flush=True)
    ratios = sorted(b / a for a, b in zip(rates[1], rates[2]))
    rows = [
        (
            f"{n} worker node{'s' if n > 1 else ''}",
            f"{statistics.median(rates[n]):.2f}",
            " ".join(f"{r:.2f}" for r in rates[n]),
            len(spread[n]),
        )
        for n in (1, 2)
    ]
    what = (
        f"a {LAYERS} x {WIDTH} tanh MLP (float32, batch {BATCH})"
        if args.model == "mlp"
        else f"a CNN ({'-'.join(map(str, CHANNELS))} channels, 32 x 32, float32, batch {IMAGES})"
    )
    plan = "K=1 jobs" if args.plan == "k1" else "jobs with default options (auto)"
    print(
        f"{args.clients} clients, {plan} of {what}, every result "
        f"checked against the inline engine; {args.rounds} rounds of {args.seconds:.0f} s, alternating; "
        f"{os.cpu_count()} cores"
    )
    print(table(rows, ("cluster (1 CPU per node)", "jobs/s (median)", "per round", "nodes used")))
    kinds = [name for _, name in _KINDS] + ["other"]
    print(f"CPU per job (ms), by process, on this machine's {os.cpu_count()} cores:")
    print(
        table(
            [
                (
                    f"{n} worker node{'s' if n > 1 else ''}",
                    *(f"{cpu[n].get(k, 0.0) / max(1, done[n]) * 1e3:.0f}" for k in kinds),
                )
                for n in (1, 2)
            ],
            ("cluster", *kinds),
        )
    )
    verdict = "met" if statistics.median(ratios) >= 1.7 else "MISSED"
    print(
        f"2 nodes / 1 node: {statistics.median(ratios):.2f} (range {ratios[0]:.2f}-{ratios[-1]:.2f}); "
        f"target >= 1.7: {verdict}"
    )


if __name__ == "__main__":
    main()
