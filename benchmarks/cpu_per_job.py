"""CPU-seconds per job, by process, for the inline engine and the Ray engine (issue: distributed engine).

    .venv/bin/python benchmarks/cpu_per_job.py [--jobs 10] [--rounds 7] [--layers 4 --width 1024 --batch 512]

Wall-clock speed-ups on a 2-core machine say little: Ray's own processes take part of the same two
cores. What holds on any machine is where the CPU goes. Around ``--jobs`` jobs of each plan this
reads every process's user + system time from /proc and sums it by role:

- ``workers``: the stage actors (``ray::StageHost``) and any other Ray worker process,
- ``driver``: this process (the engine: planning, submitting steps, fetching dL/dw),
- ``ray daemons``: raylet, GCS server and Ray's helper processes (log monitor, agents),

and prints each as milliseconds per job and as a ratio to the inline engine's total CPU per job
(the same arithmetic in one process). A second table splits the workers' CPU (the inline engine's:
its process's) by thread (:func:`by_thread_kind`): the thread the jobs ran on, the compute threads
(BLAS and compiled kernels) and Ray's own threads. The plans are inline, K=1, K=2 M=1 and K=1 R=2, on one
embedded single-node Ray; rounds alternate the plans so that the machine's drift hits all alike.
Targets (issue 20): workers <= 1.05x inline for K=1 and K=2; driver + daemons <= 10% of inline.
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections import defaultdict
from pathlib import Path

from common import WARMUP_WHY, cpu_model, mlp, mlp_feeds, proc_cpu_seconds, table

RAY_DAEMONS = ("raylet", "gcs_server")
SETTLE_SECONDS = 0.5


def role(pid: int, me: int) -> str | None:
    """Which role a process plays, or None for one that is not part of the job's work."""
    if pid == me:
        return "driver"
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    if comm in RAY_DAEMONS:
        return "ray daemons"
    if cmdline.startswith("ray::"):  # actors and idle workers name themselves so
        return "workers" if not cmdline.startswith(("ray::DashboardAgent", "ray::RuntimeEnvAgent")) else "ray daemons"
    if "site-packages/ray/" in cmdline or "-m ray." in cmdline:  # log monitor, client server, dashboard
        return "ray daemons"
    return None


def cpu_by_role() -> dict:
    """CPU-seconds (user + system) every process has used so far, summed by :func:`role`; and for
    the workers' and the driver's processes, by thread: ``(role, pid, tid, name) -> seconds``."""
    me, out = os.getpid(), defaultdict(float)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        which = role(pid, me)
        if which is None:
            continue
        try:
            out[which] += proc_cpu_seconds(Path(f"/proc/{pid}/stat"))
            if which in ("workers", "driver"):
                for task in Path(f"/proc/{pid}/task").iterdir():
                    name = (task / "comm").read_text().strip()
                    out[(which, pid, int(task.name), name)] += proc_cpu_seconds(task / "stat")
        except OSError:
            continue  # gone meanwhile
    return out


def by_thread_kind(threads: dict, whose: str) -> dict[str, float]:
    """CPU by kind of thread of ``whose`` processes: in each process its busiest thread, where the
    jobs ran (the driver's main thread for the inline engine; a worker's task thread: the ops'
    Python, Ray's task execution and (de)serialization), the ``compute`` threads (BLAS's and the
    compiled kernels' pools, named like the process: ``ray::...`` in a worker), and Ray's own
    threads (io loop, gRPC pollers, event buffers)."""
    out: dict[str, float] = defaultdict(float)
    by_pid: dict[int, list] = defaultdict(list)
    for (which, pid, tid, name), seconds in threads.items():
        if which == whose:
            by_pid[pid].append((seconds, tid, name))
    for pid, rows in by_pid.items():
        rows.sort(reverse=True)
        busiest = rows[0]
        out["jobs"] += busiest[0]
        main_name = next((name for _, tid, name in rows if tid == pid), "")
        for seconds, tid, name in rows[1:]:
            ours = name.startswith("ray::") if main_name.startswith("ray::") else name == main_name
            out["compute" if ours else "ray"] += seconds
    return out


def measure(run, jobs: int) -> tuple[dict, float]:
    """CPU-seconds per job by role (and by thread), and wall seconds per job, over ``jobs`` runs of ``run``."""
    import time

    # Idle OpenBLAS threads spin for ~0.1 s after their last product (the driver's, after inline
    # jobs): let them stop, so that one plan's spinning is not counted in the next plan's window.
    time.sleep(SETTLE_SECONDS)
    before, t = cpu_by_role(), time.perf_counter()
    for _ in range(jobs):
        run()
    wall = (time.perf_counter() - t) / jobs
    after = cpu_by_role()
    per_job = {k: max(0.0, after.get(k, 0.0) - before.get(k, 0.0)) / jobs for k in set(before) | set(after)}
    threads = {k: v for k, v in per_job.items() if isinstance(k, tuple)}
    out = {k: v for k, v in per_job.items() if isinstance(k, str)}
    for whose in ("workers", "driver"):
        out.update({f"{whose}/{kind}": v for kind, v in by_thread_kind(threads, whose).items()})
    return out, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=10, help="jobs per plan per round")
    parser.add_argument(
        "--rounds",
        type=int,
        default=7,
        help="rounds over all plans (medians reported, and the range of the workers ratio)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=40,
        help=f"untimed jobs per plan first (default 40): {WARMUP_WHY}",
    )
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=512)
    args = parser.parse_args()

    import gradserve
    from gradserve.server.ray_engine import RayEngine

    model, feeds = mlp(args.layers, args.width, "relu", last_activation=False), mlp_feeds(args.batch, args.width)
    key = model.fingerprint()  # as the server passes it: the weights are not checked again per job
    inline = gradserve.local()
    plans = {
        "inline": None,
        "K=1": dict(partitions=1, micro_batches=1, replicas=1),
        "K=2 M=1": dict(partitions=2, micro_batches=1, replicas=1),
        "K=1 R=2": dict(partitions=1, micro_batches=1, replicas=2),
    }
    cpu: dict[str, list[dict[str, float]]] = defaultdict(list)
    wall: dict[str, list[float]] = defaultdict(list)
    with RayEngine() as engine:
        runs = {
            name: (lambda: inline.gradients(model, feeds))
            if opts is None
            else (lambda opts=opts: engine.gradients(model, feeds, model_key=key, **opts))
            for name, opts in plans.items()
        }
        for run in runs.values():  # warm-up: kernels loaded, actors deployed, parameters placed,
            for _ in range(args.warmup):  # and the object store's pages mapped (common.WARMUP_WHY)
                run()
        for _ in range(args.rounds):
            for name, run in runs.items():
                by_role, seconds = measure(run, args.jobs)
                cpu[name].append(by_role)
                wall[name].append(seconds)

    def med(name: str, which: str) -> float:
        return statistics.median(r.get(which, 0.0) for r in cpu[name])

    inline_total = med("inline", "driver")  # the inline engine's work: all of it in this process

    def ratio_range(name: str) -> str:
        """The workers' ratio to inline round by round (each against the same round's inline run):
        how far the machine's drift moves it."""
        ratios = [
            (r["driver" if name == "inline" else "workers"]) / i["driver"] for r, i in zip(cpu[name], cpu["inline"])
        ]
        return f"{min(ratios):.2f}-{max(ratios):.2f}"

    rows = []
    for name in plans:
        workers, driver, daemons = med(name, "workers"), med(name, "driver"), med(name, "ray daemons")
        if name == "inline":  # the inline engine's work is all in this process
            workers, driver = driver, 0.0
        rows.append(
            (
                name,
                f"{statistics.median(wall[name]) * 1e3:.0f}",
                f"{workers * 1e3:.0f}",
                f"{driver * 1e3:.0f}",
                f"{daemons * 1e3:.0f}",
                f"{workers / inline_total:.2f} ({ratio_range(name)})",
                f"{(driver + daemons) / inline_total:.2f}",
            )
        )
    print(
        f"MLP {args.layers}x{args.width}, batch {args.batch}; {args.jobs} jobs x {args.rounds} rounds per plan, "
        f"medians; {os.cpu_count()} cores, {cpu_model()}"
    )
    print(
        table(
            rows,
            (
                "plan",
                "wall ms/job",
                "workers CPU ms",
                "driver CPU ms",
                "ray daemons CPU ms",
                "workers / inline (range over rounds)",
                "driver+daemons / inline",
            ),
        )
    )
    # Where the workers' CPU goes, thread by thread (the inline engine's: its process's threads).
    split = []
    for name in plans:
        whose = "driver" if name == "inline" else "workers"
        split.append((name, *(f"{med(name, f'{whose}/{kind}') * 1e3:.0f}" for kind in ("jobs", "compute", "ray"))))
    print()
    print(table(split, ("plan", "busiest thread CPU ms", "compute threads CPU ms", "Ray's threads CPU ms")))


if __name__ == "__main__":
    main()
