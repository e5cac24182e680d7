"""Jobs that lose a stage worker at a random moment still succeed, and the pool heals (issue 20, item 5).

    .venv/bin/python benchmarks/fault_probe.py [--jobs 20] [--seed 0] [--kills 1] [--layers 8] [--width 512] [--batch 2048]

Brings up a real 3-worker-node Ray cluster on this machine with ``deploy/local-cluster`` (1 CPU per
node, the head has none, its own state dir and ports, a gradserve server in front), then runs
``--jobs`` jobs of a ``--layers`` x ``--width`` tanh MLP (float32), alternating K=3 M=4 and K=1 R=3
(``--plans``: also K=3 M=1, whose calls nest when the model is tiny),
and the three ways a job reaches the server in turn: Compute (``Client.gradients`` with feeds of up
to 1 MiB: the batch is cut to fit), Run (``Client.gradients`` with bigger feeds: they stream) and
Submit (``Client.submit(...).result()``). During each job one stage worker process of the cluster
(a ``ray::StageHost`` process of this cluster's Ray session, chosen at random) is SIGKILLed at a
random moment: 5-80% of that kind of job's time without a kill, measured first. With ``--kills N``,
N-1 more workers die 0.2-3 s apart while the job still runs (its rerun placing stages on fresh
workers: those can be the victims). Every seed gives the same choices of victims and moments.

Each result is checked against the inline engine's (``np.allclose``, float32 tolerances); any
exception that reaches the client counts as a failed job. Afterwards the server's status says on
which nodes the pool's actors live. Prints a table of the jobs and exits with status 1 if any job
failed, was wrong, or the pool is not spread over the 3 nodes; the cluster is always torn down.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common import Cluster, cpu_model, mlp, mlp_feeds, table

NODES = 3
PLANS = {
    "K=3 M=4": dict(partitions=3, micro_batches=4, replicas=1),
    "K=1 R=3": dict(partitions=1, micro_batches=1, replicas=3),
    # With a tiny model (e.g. --layers 3 --width 8 --batch 4), the calls nest: stage to stage.
    "K=3 M=1": dict(partitions=3, micro_batches=1, replicas=1),
}
DEFAULT_PLANS = "K=3 M=4,K=1 R=3"
WAYS = ("compute", "run", "submit")
COMPUTE_BYTES = 1 << 20  # feeds up to this size go in one Compute request (client/remote.py's _COMPUTE_FEED_BYTES)


@dataclass
class Outcome:
    """One job of the probe: how it ran, what was killed when, and what the client saw."""

    index: int
    plan: str
    way: str
    batch: int
    victims: list[int] = field(default_factory=list)  # pids SIGKILLed
    kills_at: list[float] = field(default_factory=list)  # seconds after the job started
    killed_during: bool = False  # a kill happened before the job ended
    seconds: float = 0.0
    retries: int = 0
    nested: bool = False  # the job's calls nested (a tiny job: server/ray_engine/nested.py)
    error: str = ""  # what reached the client, or why the result is wrong
    raised: bool = False  # the error reached the client as an exception


def stage_workers(state: Path) -> list[int]:
    """Pids of this cluster's stage worker processes: ``ray::StageHost`` processes whose session
    is the one ``deploy/local-cluster up`` started its Ray nodes in (never another cluster's)."""
    sid = int((state / "ray.sid").read_text())
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
            if cmd.startswith(b"ray::StageHost") and os.getsid(int(pid)) == sid:
                pids.append(int(pid))
        except OSError:
            continue  # gone meanwhile
    return sorted(pids)


def check(result, reference) -> str:
    """'' if ``result`` equals the inline engine's ``reference`` up to float32 rounding, else why not."""
    if not np.allclose(result.loss, reference.loss, rtol=1e-4, atol=1e-6):
        return f"loss {result.loss} != {reference.loss}"
    if result.grads.keys() != reference.grads.keys():
        return f"parameters {sorted(result.grads)} != {sorted(reference.grads)}"
    for name, g in reference.grads.items():
        if not np.allclose(result.grads[name], g, rtol=1e-3, atol=1e-4 * float(np.max(np.abs(g))) + 1e-7):
            return f"dL/d{name} differs from the inline engine's by {float(np.max(np.abs(result.grads[name] - g)))}"
    return ""


class Prober:
    """Runs the probe's jobs against one cluster's server (``address``), killing its workers."""

    def __init__(self, address: str, state: Path, args: argparse.Namespace) -> None:
        import gradserve

        self.state, self.args = state, args
        self.model = mlp(args.layers, args.width, "tanh")
        self.client = gradserve.Client(address, timeout=args.timeout)
        self.rng = random.Random(args.seed)
        compute_batch = max(1, min(args.batch, COMPUTE_BYTES // (2 * 4 * args.width)))
        self.batches = {"compute": compute_batch, "run": max(args.batch, compute_batch + 1), "submit": args.batch}
        self.cases = {}  # batch -> (feeds, inline reference)
        for batch in set(self.batches.values()):
            feeds = mlp_feeds(batch, args.width, seed=batch)
            self.cases[batch] = (feeds, gradserve.local().gradients(self.model, feeds))
        self.typical: dict[tuple[str, str], float] = {}  # (plan, way) -> seconds of a job without a kill
        self.plans = args.plans

    def job(self, plan: str, way: str):
        """One job as the client sends it ``way``: its Result; raises whatever the client raises."""
        feeds, _ = self.cases[self.batches[way]]
        if way == "submit":
            return self.client.submit(self.model, feeds, **PLANS[plan]).result()
        return self.client.gradients(self.model, feeds, **PLANS[plan])

    def warm_up(self) -> None:
        """Every (plan, way) three times without a kill: actors started and their stages loaded,
        and the median time of the last two runs, which the kills' moments are drawn from."""
        for plan in self.plans:
            for way in WAYS:
                times = []
                for _ in range(3):
                    t = time.perf_counter()
                    result = self.job(plan, way)
                    times.append(time.perf_counter() - t)
                    wrong = check(result, self.cases[self.batches[way]][1])
                    if wrong:
                        sys.exit(f"warm-up {plan} via {way}: {wrong}")
                self.typical[plan, way] = statistics.median(times[1:])
                print(
                    f"  warm-up {plan} via {way}: {self.typical[plan, way] * 1e3:.0f} ms", file=sys.stderr, flush=True
                )

    def run(self, index: int) -> Outcome:
        """Job ``index`` with ``--kills`` stage workers SIGKILLed at random moments of it: the first
        within the job's usual time, each further one 0.2-3 s later (while the job, now running
        again, places its stages on fresh workers), the victim chosen among the workers alive then."""
        plan, way = self.plans[index % len(self.plans)], WAYS[index % len(WAYS)]
        out = Outcome(index, plan, way, self.batches[way])
        moments = [self.rng.uniform(0.05, 0.8) * self.typical[plan, way]]
        moments += [self.rng.uniform(0.2, 3.0) for _ in range(self.args.kills - 1)]
        picks = [self.rng.random() for _ in moments]
        box: dict = {}
        done = threading.Event()

        def send() -> None:
            try:
                box["result"] = self.job(plan, way)
            except BaseException as exc:  # noqa: BLE001 -- whatever reaches the client is the finding
                box["error"] = exc
            finally:
                box["end"] = time.perf_counter()
                done.set()

        start = time.perf_counter()
        threading.Thread(target=send, daemon=True).start()
        self._kill(out, done, start, moments, picks)
        done.wait()
        out.seconds = box["end"] - start
        if "error" in box:
            out.raised = True
            out.error = f"{type(box['error']).__name__}: {(str(box['error']).splitlines() or [''])[0]}"
        else:
            out.retries = int(box["result"].info.get("retries", 0))
            out.nested = bool(box["result"].info.get("nested"))
            out.error = check(box["result"], self.cases[out.batch][1])
        return out

    def _kill(
        self, out: Outcome, done: threading.Event, start: float, moments: list[float], picks: list[float]
    ) -> None:
        """SIGKILL a stage worker after each of ``moments`` (seconds, each after the previous),
        the one at fraction ``pick`` of those alive then; later kills only while the job runs."""
        for n, (wait, pick) in enumerate(zip(moments, picks)):
            if done.wait(wait) and n:
                return
            workers = stage_workers(self.state)
            if not workers:
                continue
            out.killed_during = out.killed_during or not done.is_set()
            victim = workers[int(pick * len(workers))]
            with contextlib.suppress(ProcessLookupError):  # gone meanwhile: still a kill tried
                os.kill(victim, signal.SIGKILL)
            out.victims.append(victim)
            out.kills_at.append(time.perf_counter() - start)

    def healed(self) -> dict[str, int]:
        """Pool actors per alive node (short node ids), from the server's status, after a last job
        without a kill (which finds any dead worker still in the pool and replaces it); {} if that
        job fails."""
        from gradserve.client.status import server_status

        try:
            self.job(self.plans[0], "compute")
        except Exception as exc:  # noqa: BLE001 -- reported; the pool counts as not spread
            print(f"the last job, without a kill, failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            return {}
        return {n.node_id[:8]: n.actors for n in server_status(self.client).nodes if n.alive}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=20, help="jobs, each with --kills kills (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the victims and moments (default 0)")
    parser.add_argument("--layers", type=int, default=8, help="MLP layers (default 8)")
    parser.add_argument("--width", type=int, default=512, help="MLP width (default 512)")
    parser.add_argument(
        "--batch",
        type=int,
        default=2048,
        help="batch of the Run and Submit jobs (default 2048; Compute jobs get what fits 1 MiB)",
    )
    parser.add_argument(
        "--kills",
        type=int,
        default=1,
        help="stage workers killed per job (default 1; more: the later ones hit the job's rerun)",
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a job may take (default 600)")
    parser.add_argument(
        "--plans",
        default=DEFAULT_PLANS,
        help=f"comma-separated plans the jobs alternate (default {DEFAULT_PLANS!r}; also 'K=3 M=1', which "
        "a tiny model runs as nested calls)",
    )
    args = parser.parse_args()
    args.plans = [p.strip() for p in args.plans.split(",")]
    unknown = [p for p in args.plans if p not in PLANS]
    if unknown:
        parser.error(f"--plans: unknown {unknown}; known: {', '.join(PLANS)}")
    for name in ("jobs", "layers", "width", "batch", "kills"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.timeout <= 0:
        parser.error(f"--timeout must be positive, got {args.timeout}")
    return args


def report(args: argparse.Namespace, outcomes: list[Outcome], spread: dict[str, int]) -> bool:
    """Print the jobs' table and the verdict; True if every job was correct and the pool spread."""
    rows = [
        (
            o.index,
            o.plan,
            o.way,
            o.batch,
            " ".join(map(str, o.victims)),
            " ".join(f"{t * 1e3:.0f}" for t in o.kills_at),
            "yes" if o.killed_during else "no",
            o.retries,
            "yes" if o.nested else "no",
            f"{o.seconds:.2f}",
            o.error or "correct",
        )
        for o in outcomes
    ]
    print(
        f"{args.jobs} jobs of a {args.layers} x {args.width} tanh MLP (float32) on {NODES} one-CPU worker nodes, "
        f"{args.kills} stage worker(s) SIGKILLed per job (seed {args.seed}); {os.cpu_count()} cores, {cpu_model()}"
    )
    print(
        table(
            rows,
            (
                "job",
                "plan",
                "way",
                "batch",
                "killed pids",
                "at ms",
                "mid-job",
                "retries",
                "nested",
                "seconds",
                "result",
            ),
        )
    )
    good = sum(not o.error for o in outcomes)
    during = sum(o.killed_during for o in outcomes)
    spread_ok = len([n for n, actors in spread.items() if actors]) >= NODES
    print(
        f"correct: {good}/{len(outcomes)} ({during} jobs had a worker killed before they ended); "
        f"errors reaching the client: {sum(o.raised for o in outcomes)}"
    )
    print(
        f"pool actors per node afterwards: {spread} ({'spread over' if spread_ok else 'NOT spread over'} {NODES} nodes)"
    )
    return good == len(outcomes) and spread_ok


def main() -> None:
    args = parse_args()
    state = Path(tempfile.mkdtemp(prefix="gs-faults-")) / "cluster"
    with Cluster(NODES, state) as cluster:  # brought down on the way out, whatever happens
        prober = Prober(cluster.address, state, args)
        try:
            prober.warm_up()
            outcomes = []
            for i in range(args.jobs):
                o = prober.run(i)
                outcomes.append(o)
                print(
                    f"  job {i}: {o.plan} via {o.way}, killed {o.victims} at {[round(t * 1e3) for t in o.kills_at]} ms: "
                    f"{o.error or 'correct'} (retries {o.retries}, {o.seconds:.2f} s)",
                    file=sys.stderr,
                    flush=True,
                )
            spread = prober.healed()
        finally:
            prober.client.close()
    sys.exit(0 if report(args, outcomes, spread) else 1)


if __name__ == "__main__":
    main()
