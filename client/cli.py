"""The ``gradserve`` command line.

    gradserve grad MODEL --feeds FEEDS.npz --out GRADS.npz        loss and dL/dw of a model
    gradserve plan MODEL --partitions K|auto --feeds FEEDS.npz     how a model would be split
    gradserve serve [--address HOST:PORT]                         run the gRPC service
    gradserve status --server HOST:PORT                           what a server is doing
    gradserve job ID --server HOST:PORT [--out GRADS.npz]         a job's status, or its result
    gradserve demo                                                the seed example and an MLP

Errors in the model or feeds print one line naming the culprit and exit with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import numpy as np

import gradserve
from gradserve.client.cli_inputs import (
    CliError,
    check_grad_options,
    check_partition_count,
    check_plan_options,
    memory_size,
    output_path,
    read_feeds,
    seconds,
    server_address,
    split_count,
    write_npz,
)
from gradserve.worker.graph import GraphError, Model

log = logging.getLogger("gradserve")

__all__ = ["CliError", "build_parser", "main"]


def _load_model(args: argparse.Namespace):
    from gradserve.client.local import load_model

    if not Path(args.model).exists():
        raise CliError(f"model file {args.model} does not exist")
    return load_model(args.model, loss=args.loss, batch_norm=args.batch_norm)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="an .onnx file, or a model saved by gradserve (Model.save)")
    p.add_argument(
        "--loss",
        metavar="SPEC",
        help="for ONNX models whose output is not a scalar loss: 'mse' or 'cross_entropy', optionally "
        "with the output and target names, e.g. 'cross_entropy:logits:labels' (default target: 'target')",
    )
    p.add_argument(
        "--batch-norm",
        choices=["as-exported", "batch"],
        default="as-exported",
        help="ONNX models: 'batch' normalises every BatchNormalization with the batch's statistics (training "
        "mode). torch's dynamo exporter writes inference-mode BatchNormalization even for a model in train "
        "mode: export it with optimize=False and pass --batch-norm batch (default: as-exported)",
    )


def _add_input_grads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input-grads", metavar="NAMES", help="comma-separated inputs whose dL/dx to return too")


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("where to compute")
    g.add_argument(
        "--engine",
        choices=["inline", "ray"],
        help="inline: this process; ray: partitions on Ray worker actors (default: inline; not with --server)",
    )
    g.add_argument(
        "--partitions",
        type=split_count,
        metavar="K|auto",
        help="ray engine or server: split the graph into K partitions; auto: the fewest that fit in memory "
        "(default: auto)",
    )
    g.add_argument(
        "--micro-batches",
        type=split_count,
        metavar="M|auto",
        help="ray engine or server: pipeline M micro-batches through the partitions (GPipe); auto: where "
        "pipelining pays",
    )
    g.add_argument(
        "--replicas",
        type=split_count,
        metavar="R|auto",
        help="ray engine or server: R data-parallel copies of the pipeline, each on a slice of the batch; "
        "auto: on spare nodes",
    )
    g.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="join this Ray cluster (e.g. 'auto' or HOST:PORT); default: start an embedded one",
    )
    g.add_argument(
        "--server",
        type=server_address,
        metavar="HOST:PORT",
        help="send the job to a gradserve server instead (port 50051 unless given)",
    )
    g.add_argument("--token-file", metavar="FILE", help="with --server: file holding the bearer token")
    g.add_argument(
        "--tls-ca", metavar="FILE", help="with --server: CA certificate to verify the server's TLS certificate"
    )
    g.add_argument(
        "--timeout",
        type=seconds,
        metavar="SECONDS",
        help="with --server: fail if the job has not finished after this long; the server cancels it "
        "(default: no limit)",
    )


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
    from gradserve.client.serve_args import server_settings
    from gradserve.server.service import serve_forever

    serve_forever(server_settings(args))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
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


def _add_server_args(p: argparse.ArgumentParser) -> None:
    """Where the server of ``status`` and ``job`` is, and how to talk to it."""
    p.add_argument(
        "--server",
        type=server_address,
        default="127.0.0.1:50051",
        metavar="HOST:PORT",
        help="the server (default 127.0.0.1:50051; port 50051 unless given)",
    )
    p.add_argument("--token-file", metavar="FILE", help="file holding the bearer token")
    p.add_argument("--tls-ca", metavar="FILE", help="CA certificate to verify the server's TLS certificate")


def cmd_demo(args: argparse.Namespace) -> int:
    from gradserve.client.demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradserve",
        description="Compute the loss and dL/dw of a model -- inline, on Ray workers, or on a gradserve server.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1].rsplit("\n\n", 1)[0],
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv for debug)")
    parser.add_argument("--version", action="version", version=f"gradserve {gradserve.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "grad",
        help="compute the loss and dL/dw of a model on a batch of feeds",
        description="Compute the loss and dL/dw for every parameter. GRADS.npz gets 'loss' "
        "plus one array per parameter, keyed by the parameter's name.",
    )
    _add_model_args(p)
    p.add_argument(
        "--feeds",
        required=True,
        metavar="FEEDS.npz",
        help="one array per model input, keyed by input name (or an .npy: the one input's array)",
    )
    p.add_argument("--out", required=True, metavar="GRADS.npz", help="where to write the loss and gradients")
    _add_input_grads(p)
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    _add_engine_args(p)
    p.set_defaults(func=cmd_grad)

    p = sub.add_parser(
        "plan",
        help="show how a model would be split into partitions",
        description="Print the plan that 'grad --engine ray' or a server would run with the same "
        "options -- the same defaults (auto) and the same choice -- on a cluster (this machine, "
        "one described with --nodes/--memory-per-node, or a Ray cluster's nodes): the partitions, "
        "micro-batches and replicas, each saying whether it was asked for or chosen by auto and "
        "why; then per partition its nodes, parameters, estimated FLOPs and memory, and every "
        "tensor that crosses a partition boundary. Every node counts as free for replicas.",
    )
    _add_model_args(p)
    p.add_argument(
        "--partitions",
        type=split_count,
        metavar="K|auto",
        help="number of partitions, or auto: the fewest that fit the nodes' memory (default: auto)",
    )
    p.add_argument(
        "--micro-batches",
        type=split_count,
        metavar="M|auto",
        help="micro-batches in flight, or auto: where pipelining pays (default: auto)",
    )
    p.add_argument(
        "--replicas",
        type=split_count,
        metavar="R|auto",
        help="data-parallel copies, or auto: on spare nodes (default: auto)",
    )
    p.add_argument(
        "--feeds",
        metavar="FEEDS.npz",
        help="the feeds grad would send (.npz, or .npy for a one-input model): they fix the shapes and "
        "the batch that auto splits. Default: zeros with every symbolic dimension 1, a batch of one, "
        "which auto never pipelines or replicates",
    )
    _add_input_grads(p)
    p.add_argument(
        "--split-at",
        metavar="NODES",
        help="comma-separated node names that start a new partition (instead of --partitions; no "
        "cluster: memory is not checked, as in the Ray engine)",
    )
    g = p.add_argument_group("the cluster to plan for (default: this machine as one node, its physical memory)")
    g.add_argument("--ray-address", metavar="ADDR", help="read the nodes and their memory from this Ray cluster")
    g.add_argument("--nodes", type=int, metavar="N", help="a cluster of N identical nodes")
    g.add_argument(
        "--memory-per-node",
        type=memory_size,
        metavar="SIZE",
        help="each node's memory, e.g. 1200M or 2G (Ray's memory resource; default: this machine's)",
    )
    g.add_argument("--cpus-per-node", type=float, metavar="C", help="each node's CPUs (default 1)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser(
        "serve",
        help="run the gRPC gradient service",
        description="Serve GradientService over gRPC; prints 'listening on HOST:PORT' when ready.",
    )
    from gradserve.client.serve_args import add_serve_args

    add_serve_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "status",
        help="show what a gradserve server is doing",
        description="One screen for operators: the server's version, engine and uptime; the "
        "cluster's nodes with CPUs, memory and worker actors; jobs queued and running with their "
        "progress; stored models (GetServerStatus RPC, which needs the server's token).",
    )
    _add_server_args(p)
    p.add_argument(
        "--timeout", type=seconds, default=10.0, metavar="SECONDS", help="give up after this long (default 10)"
    )
    p.add_argument("--json", action="store_true", help="print the status as JSON instead")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "job",
        help="show, watch, cancel or fetch a job by its id",
        description="A job submitted by any client (Client.submit, Client.job): print its status, "
        "follow it (--watch), cancel it (--cancel), or wait for its result and write it as 'grad' "
        "does (--out). A result can be fetched once. An unknown id fails naming it.",
    )
    p.add_argument(
        "job_id", metavar="ID", help="the job's id (Job.id in Python; 'gradserve status' lists running jobs)"
    )
    _add_server_args(p)
    p.add_argument("--out", metavar="GRADS.npz", help="wait for the job and write its loss and gradients here")
    p.add_argument("--watch", action="store_true", help="print the status at each change until the job ends")
    p.add_argument("--cancel", action="store_true", help="ask the server to stop the job")
    p.add_argument(
        "--timeout",
        type=seconds,
        metavar="SECONDS",
        help="give up waiting after this long; the job keeps running (default: no limit)",
    )
    p.add_argument(
        "--json", action="store_true", help="print statuses as JSON objects, one a line (and the result quietly)"
    )
    p.set_defaults(func=cmd_job)

    p = sub.add_parser(
        "demo",
        help="run the seed example and an MLP and check the gradients",
        description="Builds the seed regression example and an MLP, computes their gradients "
        "and checks them against closed forms and the inline engine.",
    )
    p.add_argument(
        "--engine",
        choices=["inline", "ray", "server"],
        default="server",
        help="inline, ray (embedded Ray), or server (a local gRPC server on embedded Ray; default)",
    )
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except (CliError, GraphError, ValueError) as exc:
        print(f"gradserve: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gradserve: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # remote errors and the like: one line, no traceback, unless -vv
        if args.verbose >= 2:
            raise
        print(f"gradserve: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
