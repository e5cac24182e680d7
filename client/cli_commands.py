"""What each ``gradserve`` command does with its parsed arguments: the ``cmd_*`` functions that
:func:`gradserve.client.cli.build_parser` binds to the subcommands, and how they print and write
their results. A fault in the arguments, the model or the feeds raises :class:`CliError` (or
GraphError, ValueError), which :func:`gradserve.client.cli.main` prints as one line (status 2).
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from gradserve.client.cli_inputs import (
    CliError,
    check_grad_options,
    check_partition_count,
    check_plan_options,
    output_path,
    read_feeds,
    write_npz,
)
from gradserve.worker.graph import Model


def _load_model(args: argparse.Namespace):
    from gradserve.client.local import load_model

    if not Path(args.model).exists():
        raise CliError(f"model file {args.model} does not exist")
    return load_model(args.model, loss=args.loss, batch_norm=args.batch_norm)


@contextlib.contextmanager
def _time_limit(seconds: float | None, message: str):
    """Say what ran out of time when ``--timeout SECONDS`` ends a remote call: ``message`` with
    ``{}`` standing for the seconds (instead of gRPC's "Deadline Exceeded")."""
    from gradserve.client.remote import DeadlineExceeded

    try:
        yield
    except DeadlineExceeded as exc:
        if seconds is None:
            raise
        raise DeadlineExceeded(exc.code, message.format(f"{seconds:g}")) from None


def _split_options(args: argparse.Namespace) -> dict:
    """The --partitions/--micro-batches/--replicas given (the engine's defaults for the rest)."""
    given = {"partitions": args.partitions, "micro_batches": args.micro_batches, "replicas": args.replicas}
    return {k: v for k, v in given.items() if v is not None}


def _input_grads(args: argparse.Namespace) -> list[str]:
    return [s for s in (args.input_grads or "").split(",") if s]


def _feeds(args: argparse.Namespace, model: Model) -> dict[str, np.ndarray]:
    return read_feeds(args.feeds, [s.name for s in model.inputs])


def cmd_grad(args: argparse.Namespace) -> int:
    """The loss and dL/dw of a model on the feeds, computed here, on Ray or by a server; written
    to ``--out`` and summed up on stdout."""
    check_grad_options(args)
    if args.timeout is not None and not args.server:
        raise CliError("--timeout goes with --server")
    out = output_path(args.out)
    model = _load_model(args)
    feeds = _feeds(args, model)
    input_grads = _input_grads(args)
    split = _split_options(args)
    check_partition_count(model, feeds, input_grads, split.get("partitions"))
    if args.server:
        from gradserve.client.remote import Client

        with (
            Client(args.server, token_file=args.token_file, ca_file=args.tls_ca) as client,
            _time_limit(args.timeout, "the job did not finish within --timeout {} s; the server cancels it"),
        ):
            result = client.gradients(
                model, feeds, input_grads=input_grads, progress=not args.quiet, timeout=args.timeout, **split
            )
    else:
        from gradserve.client.local import local

        engine_name = args.engine or "inline"  # options it does not take: refused by check_grad_options
        options = dict(split, ray_address=args.ray_address) if engine_name == "ray" else {}
        with local(engine_name, **options) as engine:
            # inline: one pass each way; ray: a count not given is auto (the engine's default),
            # which the engine decides: the progress line then counts steps without a total
            unset = 1 if engine_name == "inline" else "auto"
            counts = [split.get(k, unset) for k in ("partitions", "micro_batches", "replicas")]
            steps = 2 * (int(np.prod(counts)) if all(isinstance(c, int) for c in counts) else 0)
            with _progress_display(steps, enabled=not args.quiet) as progress:
                result = engine.gradients(model, feeds, input_grads=input_grads, progress=progress)
    _write_result(result, out, args.quiet)
    return 0


def _write_result(result, out: Path, quiet: bool) -> None:
    """Write ``result`` (a :class:`~gradserve.server.result.Result`) to ``out`` and, unless
    ``quiet``, print the loss, each dL/dw's shape and norm, how auto chose and where it ran."""
    write_npz(out, result.to_npz_dict())
    if quiet:
        return
    print(f"loss = {result.loss:.6g}")
    for name, g in result.grads.items():
        print(f"  dL/d{name}: shape {g.shape}, |g| = {float(np.linalg.norm(g)):.6g}")
    for reason in result.info.get("auto") or []:  # how K, M and R came about, as `plan` says it
        print(f"  {reason}")
    _print_placement(result.info)
    print(f"wrote {out}")


@contextlib.contextmanager
def _progress_display(steps: int, enabled: bool):
    """A progress callback for local engines that draws the same line as remote jobs (on stderr,
    only for jobs longer than a second)."""
    from gradserve.client.progress import ProgressLine

    if not enabled:
        yield None
        return
    display, done = ProgressLine(), [0]

    def on_event(event) -> None:
        done[0] += event.done
        display.update(
            SimpleNamespace(steps_total=steps, steps_done=done[0], state="running", event=event, finished=False)
        )

    try:
        yield on_event
    finally:
        display.close()


def _print_placement(info: dict) -> None:
    """Which cluster node ran which partition (engines that partition report it)."""
    for replica, row in enumerate(info.get("placement") or []):
        for partition, where in enumerate(row):
            print(
                f"  replica {replica} partition {partition}: node {where.get('node_id', '?')} ({where.get('ip', '?')})"
            )


def _plan_cluster(args: argparse.Namespace) -> tuple[list, str]:
    """The nodes ``plan`` plans for, and where that description came from."""
    from gradserve.server.planning import memory

    if args.ray_address:
        import ray

        from gradserve.server.ray_engine.connect import connect

        connect(args.ray_address, log_to_driver=False)  # a token the cluster refuses: one line, exit 2
        try:
            nodes = memory.cluster_nodes()
        finally:
            ray.shutdown()
        if not nodes:
            raise CliError(f"the Ray cluster at {args.ray_address} has no alive nodes with CPUs")
        return nodes, f"the Ray cluster at {args.ray_address}"
    if any(v is not None for v in (args.nodes, args.memory_per_node, args.cpus_per_node)):
        size = args.memory_per_node if args.memory_per_node is not None else memory.machine_node().memory_bytes
        return memory.nodes_of(args.nodes or 1, size, args.cpus_per_node or 1.0), "as described"
    return [memory.machine_node()], "this machine (describe another with --nodes/--memory-per-node or --ray-address)"


def cmd_plan(args: argparse.Namespace) -> int:
    """What ``grad --engine ray`` or a server would run with the same options: the Ray engine's own
    choice (:func:`~gradserve.server.planning.auto.choose`), with the same defaults (``auto``)."""
    from gradserve.server.planning.auto import AUTO, Count, choose
    from gradserve.server.planning.memory import describe_nodes
    from gradserve.server.planning.partition import batch_of_one, check_partitions
    from gradserve.server.planning.prepare import prepare

    check_plan_options(args)
    model = _load_model(args)
    feeds = _feeds(args, model) if args.feeds else batch_of_one(model)
    job = prepare(model, feeds, _input_grads(args))
    counts: list[Count] = [AUTO if c is None else c for c in (args.partitions, args.micro_batches, args.replicas)]
    partitions, micro_batches, replicas = counts
    check_partitions(job, partitions)  # before reading a cluster
    split_at = [s for s in (args.split_at or "").split(",") if s]
    nodes, source = _plan_cluster(args) if not split_at else ([], "")
    choice = choose(job, model, feeds, nodes, partitions, micro_batches, replicas, split_at=split_at)
    if source:
        print(f"cluster: {describe_nodes(nodes)}, {source}")
    if not args.feeds:
        print("feeds: none given, so a batch of one (zeros, every symbolic dimension 1)")
    print(choice.describe())
    print(choice.plan.describe())
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the gRPC service until it is stopped."""
    from gradserve.client.serve_args import server_settings
    from gradserve.server.service import serve_forever

    serve_forever(server_settings(args))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Print what a server is doing: a screen of text, or JSON (``--json``)."""
    import dataclasses
    import json

    from gradserve.client.remote import Client
    from gradserve.client.status import format_status, server_status

    with Client(args.server, token_file=args.token_file, ca_file=args.tls_ca, timeout=args.timeout) as client:
        status = server_status(client)
    if args.json:
        print(json.dumps(dataclasses.asdict(status), indent=2))
    else:
        print(format_status(status, args.server))
    return 0


def cmd_job(args: argparse.Namespace) -> int:
    """A job by its id: print its status (``--watch``: each change until it ends), cancel it, or
    wait for its result and write it as ``grad`` does (``--out``)."""
    import time

    from gradserve.client.remote import Client

    if args.cancel and (args.out or args.watch):
        raise CliError("--cancel does not go with --out or --watch")
    out = output_path(args.out) if args.out else None
    end = None if args.timeout is None else time.monotonic() + args.timeout
    left = lambda: None if end is None else max(0.0, end - time.monotonic())  # noqa: E731
    with (
        Client(args.server, token_file=args.token_file, ca_file=args.tls_ca, timeout=args.timeout) as client,
        _time_limit(args.timeout, f"job {args.job_id} did not finish within --timeout {{}} s; it keeps running"),
    ):
        job = client.job(args.job_id)
        if args.cancel:
            _print_job(job.cancel(), args.json)
        elif args.watch:
            for status in job.watch(timeout=left()):
                _print_job(status, args.json)
        elif out is None:
            _print_job(job.status(), args.json)
        if out is not None:
            _write_result(job.result(timeout=left()), out, quiet=args.json)
    return 0


def _print_job(status, as_json: bool) -> None:
    """One line for a :class:`~gradserve.client.remote.JobStatus`: text, or a JSON object."""
    import dataclasses
    import json

    print(json.dumps(dataclasses.asdict(status)) if as_json else status.describe(), flush=True)


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the seed example and an MLP and check their gradients."""
    from gradserve.client.demo import run_demo

    return run_demo(args)
