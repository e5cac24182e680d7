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
import logging
import sys
from typing import Sequence

import gradserve
from gradserve.client.cli_commands import cmd_demo, cmd_grad, cmd_job, cmd_plan, cmd_serve, cmd_status
from gradserve.client.cli_inputs import CliError, memory_size, seconds, server_address, split_count
from gradserve.worker.graph import GraphError


__all__ = ["CliError", "build_parser", "main"]


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


def build_parser() -> argparse.ArgumentParser:
    """The ``gradserve`` argument parser: one subcommand per command, each bound (``func``) to its
    ``cmd_*`` in :mod:`gradserve.client.cli_commands`."""
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
    """Run the command ``argv`` (default: ``sys.argv[1:]``) names; return the exit status."""
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
