"""CPU-seconds per job, by process, for the inline engine and the Ray engine (issue: distributed engine).

    .venv/bin/python benchmarks/cpu_per_job.py [--jobs 10] [--rounds 3] [--layers 4 --width 1024 --batch 512]

Wall-clock speed-ups on a 2-core machine say little: Ray's own processes take part of the same two
cores. What holds on any machine is where the CPU goes. Around ``--jobs`` jobs of each plan this
reads every process's user + system time from /proc and sums it by role:

- ``workers``: the stage actors (``ray::StageHost``) and any other Ray worker process,
- ``driver``: this process (the engine: planning, submitting steps, fetching dL/dw),
- ``ray daemons``: raylet, GCS server and Ray's helper processes (log monitor, agents),

and prints each as milliseconds per job and as a ratio to the inline engine's total CPU per job
(the same arithmetic in one process). The plans are inline, K=1, K=2 M=1 and K=1 R=2, on one
embedded single-node Ray; rounds alternate the plans so that the machine's drift hits all alike.
Targets (issue 20): workers <= 1.05x inline for K=1 and K=2; driver + daemons <= 10% of inline.
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections import defaultdict
from pathlib import Path

from common import cpu_model, mlp, mlp_feeds, table

TICKS = os.sysconf("SC_CLK_TCK")
RAY_DAEMONS = ("raylet", "gcs_server")


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


def cpu_by_role() -> dict[str, float]:
    """CPU-seconds (user + system) every process has used so far, summed by :func:`role`."""
    me, out = os.getpid(), defaultdict(float)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        which = role(pid, me)
        if which is None:
            continue
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        out[which] += (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime
    return out


def measure(run, jobs: int) -> tuple[dict[str, float], float]:
    """CPU-seconds per job by role, and wall seconds per job, over ``jobs`` runs of ``run``."""
    import time

    before, t = cpu_by_role(), time.perf_counter()
    for _ in range(jobs):
        run()
    wall = (time.perf_counter() - t) / jobs
    after = cpu_by_role()
    return {k: max(0.0, after.get(k, 0.0) - before.get(k, 0.0)) / jobs for k in set(before) | set(after)}, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=10, help="jobs per plan per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all plans (medians reported)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=512)
    args = parser.parse_args()

    import gradserve
    from gradserve.server.ray_engine import RayEngine

    model, feeds = mlp(args.layers, args.width, "relu", last_activation=False), mlp_feeds(args.batch, args.width)
    key = model.fingerprint()  # as the server passes it: the weights are not checked again per job
    inline = gradserve.local()
    plans = {"inline": None, "K=1": dict(partitions=1, micro_batches=1, replicas=1),
             "K=2 M=1": dict(partitions=2, micro_batches=1, replicas=1),
             "K=1 R=2": dict(partitions=1, micro_batches=1, replicas=2)}
    cpu: dict[str, list[dict[str, float]]] = defaultdict(list)
    wall: dict[str, list[float]] = defaultdict(list)
    with RayEngine() as engine:
        runs = {name: (lambda: inline.gradients(model, feeds)) if opts is None
                else (lambda opts=opts: engine.gradients(model, feeds, model_key=key, **opts))
                for name, opts in plans.items()}
        for run in runs.values():  # warm-up: kernels loaded, actors deployed, parameters placed
            run(), run()
        for _ in range(args.rounds):
            for name, run in runs.items():
                by_role, seconds = measure(run, args.jobs)
                cpu[name].append(by_role)
                wall[name].append(seconds)

    def med(name: str, which: str) -> float:
        return statistics.median(r.get(which, 0.0) for r in cpu[name])

    inline_total = med("inline", "driver")  # the inline engine's work: all of it in this process
    rows = []
    for name in plans:
        workers, driver, daemons = med(name, "workers"), med(name, "driver"), med(name, "ray daemons")
        if name == "inline":  # the inline engine's work is all in this process
            workers, driver = driver, 0.0
        rows.append((name, f"{statistics.median(wall[name]) * 1e3:.0f}", f"{workers * 1e3:.0f}",
                     f"{driver * 1e3:.0f}", f"{daemons * 1e3:.0f}", f"{workers / inline_total:.2f}",
                     f"{(driver + daemons) / inline_total:.2f}"))
    print(f"MLP {args.layers}x{args.width}, batch {args.batch}; {args.jobs} jobs x {args.rounds} rounds per plan, "
          f"medians; {os.cpu_count()} cores, {cpu_model()}")
    print(table(rows, ("plan", "wall ms/job", "workers CPU ms", "driver CPU ms", "ray daemons CPU ms",
                       "workers / inline", "driver+daemons / inline")))


if __name__ == "__main__":
    main()
