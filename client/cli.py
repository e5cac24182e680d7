"""The ``gradserve`` command line.

    gradserve grad MODEL --feeds FEEDS.npz --out GRADS.npz        loss and dL/dw of a model
    gradserve plan MODEL --partitions K|auto --feeds FEEDS.npz     how a model would be split
    gradserve serve [--address HOST:PORT]                         run the gRPC service
    gradserve status --server HOST:PORT                           what a server is doing
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

from gradserve.worker.graph import GraphError

log = logging.getLogger("gradserve")


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def _read_feeds(path: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:  # never unpickle: feeds may come from anywhere
            return {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise CliError(f"feeds file {path} does not exist") from None
    except (ValueError, OSError) as exc:
        raise CliError(f"cannot read feeds file {path}: {exc}") from None


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


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("where to compute")
    g.add_argument("--engine", choices=["inline", "ray"], default="inline",
                   help="inline: this process; ray: partitions on Ray worker actors (default: inline)")
    g.add_argument("--partitions", type=_count, metavar="K|auto",
                   help="ray engine or server: split the graph into K partitions; auto: the fewest that fit in memory "
                   "(default: auto)")
    g.add_argument("--micro-batches", type=_count, metavar="M|auto",
                   help="ray engine or server: pipeline M micro-batches through the partitions (GPipe); auto: where "
                   "pipelining pays")
    g.add_argument("--replicas", type=_count, metavar="R|auto",
                   help="ray engine or server: R data-parallel copies of the pipeline, each on a slice of the batch; "
                   "auto: on spare nodes")
    g.add_argument("--ray-address", metavar="ADDR",
                   help="join this Ray cluster (e.g. 'auto' or HOST:PORT); default: start an embedded one")
    g.add_argument("--server", metavar="HOST:PORT", help="send the job to a gradserve server instead")
    g.add_argument("--token-file", metavar="FILE", help="with --server: file holding the bearer token")
    g.add_argument("--tls-ca", metavar="FILE", help="with --server: CA certificate to verify the server's TLS certificate")


def _count(text: str):
    """argparse type of --partitions/--micro-batches/--replicas: 'auto' or a number >= 1."""
    from gradserve.server.planning.auto import parse_count

    try:
        return parse_count(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _split_options(args: argparse.Namespace) -> dict:
    """The --partitions/--micro-batches/--replicas given (the engine's defaults for the rest)."""
    given = {"partitions": args.partitions, "micro_batches": args.micro_batches, "replicas": args.replicas}
    return {k: v for k, v in given.items() if v is not None}


def cmd_grad(args: argparse.Namespace) -> int:
    model = _load_model(args)
    feeds = _read_feeds(args.feeds)
    input_grads = [s for s in (args.input_grads or "").split(",") if s]
    split = _split_options(args)
    if args.server:
        from gradserve.client.remote import Client

        with Client(args.server, token_file=args.token_file, ca_file=args.tls_ca) as client:
            result = client.gradients(model, feeds, input_grads=input_grads, progress=not args.quiet, **split)
    else:
        from gradserve.client.local import local

        options = {}
        if args.engine == "ray":
            options = dict(split, ray_address=args.ray_address)
        elif split or args.ray_address is not None:
            raise CliError("--partitions/--micro-batches/--replicas/--ray-address need --engine ray or --server")
        with local(args.engine, **options) as engine:
            counts = [split.get(k, 1) for k in ("partitions", "micro_batches", "replicas")]
            # with auto the engine decides: the progress line then counts steps without a total
            steps = 2 * (int(np.prod(counts)) if all(isinstance(c, int) for c in counts) else 0)
            with _progress_display(steps, enabled=not args.quiet) as progress:
                result = engine.gradients(model, feeds, input_grads=input_grads, progress=progress)
    np.savez(args.out, **result.to_npz_dict())
    if not args.quiet:
        print(f"loss = {result.loss:.6g}")
        for name, g in result.grads.items():
            print(f"  dL/d{name}: shape {g.shape}, |g| = {float(np.linalg.norm(g)):.6g}")
        _print_placement(result.info)
        print(f"wrote {args.out}")
    return 0


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
        display.update(SimpleNamespace(steps_total=steps, steps_done=done[0], state="running", event=event, finished=False))

    try:
        yield on_event
    finally:
        display.close()


def _print_placement(info: dict) -> None:
    """Which cluster node ran which partition (engines that partition report it)."""
    for replica, row in enumerate(info.get("placement") or []):
        for partition, where in enumerate(row):
            print(f"  replica {replica} partition {partition}: node {where.get('node_id', '?')} ({where.get('ip', '?')})")


def _plan_cluster(args: argparse.Namespace) -> tuple[list, str]:
    """The nodes ``plan`` plans for, and where that description came from."""
    from gradserve.server.planning import memory

    if args.ray_address:
        if args.nodes or args.memory_per_node:
            raise CliError("give --ray-address or --nodes/--memory-per-node, not both")
        import ray

        ray.init(address=args.ray_address, include_dashboard=False, logging_level=logging.WARNING,
                 configure_logging=False, log_to_driver=False)
        try:
            nodes = memory.cluster_nodes()
        finally:
            ray.shutdown()
        if not nodes:
            raise CliError(f"the Ray cluster at {args.ray_address} has no alive nodes with CPUs")
        return nodes, f"the Ray cluster at {args.ray_address}"
    if args.nodes or args.memory_per_node:
        this = memory.machine_node()
        size = memory.parse_size(args.memory_per_node) if args.memory_per_node else this.memory_bytes
        if (args.nodes or 1) < 1:
            raise CliError(f"--nodes must be at least 1, got {args.nodes}")
        return memory.nodes_of(args.nodes or 1, size, args.cpus_per_node), "as described"
    return [memory.machine_node()], "this machine (describe another with --nodes/--memory-per-node or --ray-address)"


def cmd_plan(args: argparse.Namespace) -> int:
    from gradserve.server.planning.auto import AUTO, choose
    from gradserve.server.planning.memory import describe_nodes
    from gradserve.server.planning.partition import plan_model
    from gradserve.server.planning.prepare import prepare

    model = _load_model(args)
    feeds = _read_feeds(args.feeds) if args.feeds else None
    split_at = [s for s in (args.split_at or "").split(",") if s] or None
    counts = (args.partitions, args.micro_batches, args.replicas)
    if AUTO not in counts and not (args.ray_address or args.nodes or args.memory_per_node):
        plan = plan_model(model, feeds, partitions=args.partitions, split_at=split_at)  # no cluster: FLOPs only
        print(plan.describe())
        return 0
    if split_at:
        raise CliError("--split-at fixes the partitions: it does not go with auto or a cluster description")
    if feeds is None:
        raise CliError("planning for a cluster (auto, --nodes, --ray-address) needs --feeds: the batch decides "
                       "memory and micro-batches")
    nodes, source = _plan_cluster(args)
    choice = choose(prepare(model, feeds), model, feeds, nodes, *counts)
    print(f"cluster: {describe_nodes(nodes)}, {source}")
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
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("grad", help="compute the loss and dL/dw of a model on a batch of feeds",
                       description="Compute the loss and dL/dw for every parameter. GRADS.npz gets 'loss' "
                       "plus one array per parameter, keyed by the parameter's name.")
    _add_model_args(p)
    p.add_argument("--feeds", required=True, metavar="FEEDS.npz", help="one array per model input, keyed by input name")
    p.add_argument("--out", required=True, metavar="GRADS.npz", help="where to write the loss and gradients")
    p.add_argument("--input-grads", metavar="NAMES", help="comma-separated inputs whose dL/dx to return too")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    _add_engine_args(p)
    p.set_defaults(func=cmd_grad)

    p = sub.add_parser("plan", help="show how a model would be split into partitions",
                       description="Print the partition plan: per partition its nodes, parameters, "
                       "estimated FLOPs and memory, and every tensor that crosses a partition boundary. With "
                       "auto, or a cluster (--nodes/--memory-per-node, --ray-address), the plan fits the nodes' "
                       "memory and auto explains its choice.")
    _add_model_args(p)
    p.add_argument("--partitions", type=_count, default=2, metavar="K|auto",
                   help="number of partitions, or auto: the fewest that fit the nodes' memory (default 2)")
    p.add_argument("--micro-batches", type=_count, default=1, metavar="M|auto",
                   help="micro-batches in flight (memory; default 1), or auto: where pipelining pays")
    p.add_argument("--replicas", type=_count, default=1, metavar="R|auto",
                   help="data-parallel copies (default 1), or auto: on spare nodes")
    p.add_argument("--feeds", metavar="FEEDS.npz", help="feeds that fix the input shapes (default: batch size 1)")
    p.add_argument("--split-at", metavar="NODES", help="comma-separated node names that start a new partition")
    g = p.add_argument_group("the cluster to plan for (with auto; default: this machine as one node)")
    g.add_argument("--ray-address", metavar="ADDR", help="read the nodes and their memory from this Ray cluster")
    g.add_argument("--nodes", type=int, metavar="N", help="a cluster of N identical nodes")
    g.add_argument("--memory-per-node", metavar="SIZE", help="each node's memory, e.g. 1200M or 2G (Ray's memory resource)")
    g.add_argument("--cpus-per-node", type=float, default=1.0, metavar="C", help="each node's CPUs (default 1)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("serve", help="run the gRPC gradient service",
                       description="Serve GradientService over gRPC; prints 'listening on HOST:PORT' when ready.")
    from gradserve.client.serve_args import add_serve_args

    add_serve_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("status", help="show what a gradserve server is doing",
                       description="One screen for operators: the server's version, engine and uptime; the "
                       "cluster's nodes with CPUs, memory and worker actors; jobs queued and running with their "
                       "progress; stored models (GetServerStatus RPC, which needs the server's token).")
    p.add_argument("--server", default="127.0.0.1:50051", metavar="HOST:PORT",
                   help="the server (default 127.0.0.1:50051)")
    p.add_argument("--token-file", metavar="FILE", help="file holding the bearer token")
    p.add_argument("--tls-ca", metavar="FILE", help="CA certificate to verify the server's TLS certificate")
    p.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS", help="give up after this long (default 10)")
    p.add_argument("--json", action="store_true", help="print the status as JSON instead")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("demo", help="run the seed example and an MLP and check the gradients",
                       description="Builds the seed regression example and an MLP, computes their gradients "
                       "and checks them against closed forms and the inline engine.")
    p.add_argument("--engine", choices=["inline", "ray", "server"], default="server",
                   help="inline, ray (embedded Ray), or server (a local gRPC server on embedded Ray; default)")
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
