"""Pipeline and replica scaling of the Ray engine on 2 one-CPU nodes vs the inline engine on one core (issue 11).

    .venv/bin/python benchmarks/pipeline_scaling.py [--rounds 3] [--repeat 3]

Brings up a real multi-node Ray cluster on this machine with ``deploy/local-cluster`` (2 worker
nodes, 1 CPU each, the head has none), joins it as a Ray driver with ``RayEngine(ray_address=...)``
and times gradient jobs of an 8 x 1024 tanh MLP (float32, mse loss, batch 1024) at several
(K partitions, M micro-batches, R replicas). The baseline is the inline engine restricted to one
core, measured in the same run: a subprocess of this script (``--inline-worker``) started with
OPENBLAS/OMP/MKL/... _NUM_THREADS=1, so the limits apply before numpy loads, plus a threadpoolctl
limit. Each round times the baseline and every setup (``--repeat`` jobs each, after an untimed
warm-up job; the order reverses every other round); speedups are inline/setup per round, reported
as the median over rounds with their range. Every job's loss and dL/dw are checked against the
inline engine (within 1e-4 of each gradient's largest entry). Since the 2 nodes share this
machine's cores with everything else, the table shows how many cores other processes took while
each setup was timed (from /proc: the machine's busy time minus this process's, its children's and
the cluster's Ray session's). Targets:

    K=2 M=4 R=1  >= 1.45x inline on one core
    K=1 M=1 R=2  >= 1.75x inline on one core

(K=2 M=1 and K=2 M=8 are reported for information.) A target counts as met only if the jobs used
both worker nodes. The cluster is brought down at the end, whatever happens.
"""

from __future__ import annotations

import os
import sys

ONE_THREAD = {
    name: "1"
    for name in (
        "OPENBLAS_NUM_THREADS",
        "OMP_NUM_THREADS",
        "MKL_NUM_THREADS",
        "BLIS_NUM_THREADS",
        "VECLIB_MAXIMUM_THREADS",
        "NUMEXPR_NUM_THREADS",
    )
}
if "--inline-worker" in sys.argv:  # before numpy loads, even when run by hand
    os.environ.update(ONE_THREAD)

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from common import Cluster, cpu_model, mlp, mlp_feeds, table  # noqa: E402

LAYERS, WIDTH, BATCH, ACTIVATION = 8, 1024, 1024, "tanh"
SETUPS = [  # (label, K, M, R, target speedup vs inline on one core or None)
    ("K=2 M=4 R=1", 2, 4, 1, 1.45),
    ("K=1 M=1 R=2", 1, 1, 2, 1.75),
    ("K=2 M=1 R=1", 2, 1, 1, None),
    ("K=2 M=8 R=1", 2, 8, 1, None),
]
WORKERS = 2


def model_and_feeds():
    """The same model and batch in every process (fixed seeds)."""
    return mlp(LAYERS, WIDTH, ACTIVATION, seed=0), mlp_feeds(BATCH, WIDTH, seed=100)


# -- the baseline: inline engine on one core, in its own process -----------------------------------
def inline_worker(jobs: int, warmup: int) -> None:
    """Time ``jobs`` inline jobs (after ``warmup``) with one BLAS thread; print JSON on stdout."""
    from threadpoolctl import threadpool_info, threadpool_limits

    import gradserve

    model, feeds = model_and_feeds()
    engine = gradserve.local()
    with threadpool_limits(limits=1):
        blas = sorted({(p["internal_api"], p["num_threads"]) for p in threadpool_info()})
        for _ in range(warmup):
            engine.gradients(model, feeds)
        seconds = []
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for _ in range(jobs):
            t = time.perf_counter()
            engine.gradients(model, feeds)
            seconds.append(time.perf_counter() - t)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    print(json.dumps({"seconds": seconds, "cpu_per_wall": cpu / wall, "blas": blas}))


def run_inline(jobs: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(ONE_THREAD)
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--inline-worker", "--repeat", str(jobs)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if out.returncode != 0:
        raise RuntimeError(f"the inline worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- the Ray side ----------------------------------------------------------------------------------
def check(result, reference) -> None:
    """Loss and every dL/dw equal the inline engine's up to float32 rounding (relative to each
    gradient's largest entry)."""
    assert abs(result.loss - reference.loss) <= 1e-5 * max(1.0, abs(reference.loss)), (result.loss, reference.loss)
    assert result.grads.keys() == reference.grads.keys(), sorted(set(result.grads) ^ set(reference.grads))
    for name, g in reference.grads.items():
        worst = float(np.max(np.abs(result.grads[name] - g)))
        assert worst <= 1e-4 * float(np.max(np.abs(g))) + 1e-7, f"{name}: differs from the inline engine by {worst}"


def _total(value) -> float:
    """Seconds in a number or a (nested) dict/list of them, summed."""
    if isinstance(value, dict):
        return sum(_total(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_total(v) for v in value)
    return float(value)


def breakdown(infos: list[dict], wall: list[float]) -> str:
    """Medians over jobs of where a job's time goes (``info["seconds"]``)."""
    med = lambda xs: statistics.median(xs) * 1e3  # noqa: E731
    secs = [i["seconds"] for i in infos]
    stages = len(secs[0].get("stage_compute", []))
    ops = "/".join(f"{med([_total(s['stage_compute'][j]) for s in secs]):.0f}" for j in range(stages))
    phases_of = [s.get("stage_phases") or [] for s in secs]
    if all(len(p) == stages and all(isinstance(d, dict) for d in p) for p in phases_of):  # forward/backward/weights
        present = {n for p in phases_of for d in p for n in d}
        names = [n for n in ("forward", "backward", "weights") if n in present]
        names += sorted(present - set(names))
        split = " / ".join(
            "+".join(f"{med([_total(p[j].get(n, 0.0)) for p in phases_of]):.0f}" for n in names) for j in range(stages)
        )
        ops += f" ({'+'.join(names)}: {split})"
    phases = []
    for key in ("prepare_and_deploy", "submit", "run", "fetch"):
        if key in secs[0]:
            phases.append(f"{key.replace('prepare_and_deploy', 'deploy')} {med([s[key] for s in secs]):.0f}")
    accounted = [sum(s.get(k, 0.0) for k in ("prepare_and_deploy", "submit", "run", "fetch")) for s in secs]
    rest = med([w - a for w, a in zip(wall, accounted)])
    return f"ops {ops} ms per stage; {', '.join(phases)}, rest {rest:.0f} ms (of {med(wall):.0f} ms)"


# -- other users of the machine -----------------------------------------------------------------
def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (all cores; steal time counts: a VM's host took it)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu(session: int) -> float:
    """CPU seconds used by this benchmark: this process (and its waited-for children, the inline
    baseline) plus every process of the cluster's Ray session (nodes, raylets, actors)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if int(pid) == os.getpid():
            total += sum(int(v) for v in fields[11:15]) / tick  # utime stime cutime cstime
        elif int(fields[3]) == session:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


class Others:
    """Cores used by other processes on the machine while a block of jobs ran (``with``)."""

    def __init__(self, session: int) -> None:
        self.session, self.cores = session, 0.0

    def __enter__(self) -> "Others":
        self.start = (time.perf_counter(), machine_busy(), own_cpu(self.session))
        return self

    def __exit__(self, *exc: object) -> None:
        wall, busy, own = time.perf_counter(), machine_busy(), own_cpu(self.session)
        self.cores = max(0.0, (busy - self.start[1]) - (own - self.start[2])) / (wall - self.start[0])


def nodes_of(info: dict) -> set[str]:
    return {w["node_id"] for row in info["placement"] for w in row}


def time_setup(engine, model, feeds, key: str, reference, k: int, m: int, r: int, repeat: int):
    """One untimed job (actors and parameters in place), then ``repeat`` timed ones, each checked
    after its clock stopped. (wall seconds, infos)."""
    opts = dict(partitions=k, micro_batches=m, replicas=r, model_key=key)
    check(engine.gradients(model, feeds, **opts), reference)
    wall, infos = [], []
    for _ in range(repeat):
        t = time.perf_counter()
        result = engine.gradients(model, feeds, **opts)
        wall.append(time.perf_counter() - t)
        check(result, reference)
        got = (result.info["partitions"], result.info["micro_batches"], result.info["replicas"])
        assert got == (k, m, r), f"asked for K={k} M={m} R={r}, ran {got}"
        infos.append(result.info)
    return wall, infos


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="rounds, alternating baseline and setups (default 3)")
    parser.add_argument(
        "--only", metavar="LABELS", help='comma-separated setups to run, e.g. "K=1 M=1 R=2" (default: all)'
    )
    parser.add_argument("--repeat", type=int, default=3, help="timed jobs per setup per round (default 3)")
    parser.add_argument("--inline-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inline_worker:
        inline_worker(args.repeat, warmup=1)
        return

    setups = [s for s in SETUPS if not args.only or s[0] in args.only.split(",")]
    import gradserve

    model, feeds = model_and_feeds()
    reference = gradserve.local().gradients(model, feeds)
    key = model.fingerprint()  # as the server passes its verified model id
    inline_rounds: list[float] = []
    inline_notes: list[dict] = []
    times: dict[str, list[float]] = {label: [] for label, *_ in setups}
    infos: dict[str, list[dict]] = {label: [] for label, *_ in setups}
    walls: dict[str, list[float]] = {label: [] for label, *_ in setups}
    others: dict[str, list[float]] = {label: [] for label in ("inline", *(s[0] for s in setups))}
    with Cluster(WORKERS, Path(tempfile.mkdtemp(prefix="gs-pipeline-")) / "cluster") as cluster:
        os.environ.update({k: v for k, v in cluster.ray_env().items() if k.startswith("RAY_")})
        session = int((cluster.state / "ray.sid").read_text())
        from gradserve.server.ray_engine import RayEngine

        with RayEngine(ray_address=os.environ["RAY_ADDRESS"]) as engine:
            for label, k, m, r, _ in setups:  # actors started, parameters placed
                for _ in range(2):
                    check(
                        engine.gradients(model, feeds, partitions=k, micro_batches=m, replicas=r, model_key=key),
                        reference,
                    )
            for round_ in range(args.rounds):
                order = ["inline", *(s[0] for s in setups)]
                for name in order if round_ % 2 == 0 else order[::-1]:
                    if name == "inline":
                        with Others(session) as other:
                            out = run_inline(args.repeat)
                        others[name].append(other.cores)
                        inline_rounds.append(statistics.median(out["seconds"]))
                        inline_notes.append(out)
                        print(
                            f"  round {round_ + 1}: inline 1 core {inline_rounds[-1] * 1e3:.0f} ms",
                            file=sys.stderr,
                            flush=True,
                        )
                        continue
                    _, k, m, r, _ = next(s for s in setups if s[0] == name)
                    with Others(session) as other:
                        wall, got = time_setup(engine, model, feeds, key, reference, k, m, r, args.repeat)
                    others[name].append(other.cores)
                    times[name].append(statistics.median(wall))
                    walls[name] += wall
                    infos[name] += got
                    print(f"  round {round_ + 1}: {name} {times[name][-1] * 1e3:.0f} ms", file=sys.stderr, flush=True)

    t_inline = statistics.median(inline_rounds)
    load = lambda name: f"{statistics.median(others[name]):.1f} ({min(others[name]):.1f}-{max(others[name]):.1f})"  # noqa: E731
    rows = [("inline, 1 core", f"{t_inline * 1e3:.0f}", "1.00", "", "", "", load("inline"))]
    lines = []
    for label, k, m, r, target in setups:
        ratios = sorted(ti / t for ti, t in zip(inline_rounds, times[label]))
        speedup = statistics.median(ratios)
        used = set().union(*(nodes_of(i) for i in infos[label]))
        if target is None:
            verdict = "(info)"
        else:
            verdict = "met" if speedup >= target and len(used) >= WORKERS else "MISSED"
        rows.append(
            (
                label,
                f"{statistics.median(times[label]) * 1e3:.0f}",
                f"{speedup:.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f})",
                f">= {target}" if target else "",
                verdict,
                len(used),
                load(label),
            )
        )
        lines.append(
            f"  {label}: {breakdown(infos[label], walls[label])}; nodes {', '.join(sorted(n[:8] for n in used))}"
        )
    blas = sorted({tuple(b) for note in inline_notes for b in note["blas"]})
    cpu_wall = statistics.median(n["cpu_per_wall"] for n in inline_notes)
    print(
        f"{LAYERS} x {WIDTH} {ACTIVATION} MLP (float32, mse, batch {BATCH}); {WORKERS} worker nodes x 1 CPU; "
        f"{args.rounds} rounds x {args.repeat} jobs, medians; {os.cpu_count()} cores, {cpu_model()}; every result "
        f"checked against the inline engine"
    )
    print(
        f"baseline: inline engine in a subprocess, BLAS threads {', '.join(f'{a}={n}' for a, n in blas)}, "
        f"CPU/wall {cpu_wall:.2f}"
    )
    print(
        table(
            rows,
            (
                "setup",
                "ms/job (median)",
                "speedup vs inline-1-core (range)",
                "target",
                "result",
                "nodes",
                "other load, cores (range)",
            ),
        )
    )
    if max(max(v) for v in others.values()) > 0.2:
        print(
            "note: other processes used this machine's cores while jobs were timed (last column): the ratios are "
            "not clean"
        )
    print("where a job's time goes (medians; ops = compute inside each stage's ops, per replica x partition):")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
