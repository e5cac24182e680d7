"""What ``gradserve grad`` and ``gradserve plan`` check before any work starts: options that
contradict each other, option values (the argparse types), the feeds file, and where the result goes.

Every fault is a :class:`CliError`, which :func:`gradserve.client.cli.main` prints as one line
with exit status 2. The result is written to a temporary file beside ``--out`` and renamed over
it, so a failed run never leaves a half-written ``--out`` behind.
"""

from __future__ import annotations

import argparse
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from gradserve.proto.npz import save_npz

if TYPE_CHECKING:
    from gradserve.server.planning.counts import Count
    from gradserve.worker.graph import Model


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


# -- options that contradict each other ------------------------------------------------------------
SPLIT_FLAGS = "--partitions/--micro-batches/--replicas"


def check_grad_options(args: argparse.Namespace) -> None:
    """Refuse ``grad`` options that cannot go together (``--engine`` is None unless given)."""
    split_given = any(v is not None for v in (args.partitions, args.micro_batches, args.replicas))
    if args.server:
        if args.engine is not None:
            raise CliError(
                f"--engine {args.engine} runs the job in this process and --server sends it to a "
                "server: give one of them"
            )
        if args.ray_address is not None:
            raise CliError("--ray-address does not go with --server: the server computes on its own Ray cluster")
        return
    for flag, value in (("--token-file", args.token_file), ("--tls-ca", args.tls_ca)):
        if value is not None:
            raise CliError(f"{flag} goes with --server")
    if (args.engine or "inline") == "inline":
        if split_given:
            raise CliError(f"{SPLIT_FLAGS} need --engine ray or --server (the inline engine runs the whole graph)")
        if args.ray_address is not None:
            raise CliError("--ray-address needs --engine ray")


def check_plan_options(args: argparse.Namespace) -> None:
    """Refuse ``plan`` options that cannot go together."""
    described = [
        flag
        for flag, value in (
            ("--nodes", args.nodes),
            ("--memory-per-node", args.memory_per_node),
            ("--cpus-per-node", args.cpus_per_node),
        )
        if value is not None
    ]
    if args.ray_address and described:
        raise CliError(f"--ray-address reads the cluster; {described[0]} describes one: give one of them")
    if args.nodes is not None and args.nodes < 1:
        raise CliError(f"--nodes must be at least 1, got {args.nodes}")
    if args.cpus_per_node is not None and args.cpus_per_node <= 0:
        raise CliError(f"--cpus-per-node must be more than 0, got {args.cpus_per_node}")
    if args.split_at and args.partitions is not None:
        raise CliError("--split-at fixes the partitions: give it or --partitions, not both")
    if args.split_at and (args.ray_address or described):
        raise CliError(
            "--split-at plans without a cluster (memory is not checked): it does not go with "
            f"{'--ray-address' if args.ray_address else described[0]}"
        )


def memory_size(text: str) -> int:
    """argparse type of ``plan --memory-per-node``: ``1200M``, ``2G``... in bytes."""
    from gradserve.server.planning.memory import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def server_address(text: str) -> str:
    """argparse type of --server: HOST:PORT, HOST or [IPv6] (port 50051), or a gRPC target (unix:PATH)."""
    from gradserve.client.connection import server_target

    try:
        return server_target(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def seconds(text: str) -> float:
    """argparse type of --timeout: a number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def split_count(text: str) -> Count:
    """argparse type of --partitions/--micro-batches/--replicas: 'auto' or a number >= 1."""
    from gradserve.server.planning.counts import parse_count

    try:
        return parse_count(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def check_partition_count(
    model: "Model", feeds: Mapping[str, np.ndarray], input_grads: Sequence[str], partitions: int | str | None
) -> None:
    """Refuse an explicit partition count the graph cannot give before an engine starts or a job
    is sent (the Ray engine and the server refuse it too, but only once they have it)."""
    if partitions is not None:
        from gradserve.server.planning.partition import check_partitions  # (the planner: only when needed)
        from gradserve.server.planning.prepare import prepare

        check_partitions(prepare(model, feeds, input_grads), partitions)


# -- the feeds ---------------------------------------------------------------------------------------
def read_feeds(path: str, inputs: Sequence[str]) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` (keyed by input name), or of an ``.npy`` for a model with exactly one
    input (``inputs``: the model's input names). Never unpickles: feeds may come from anywhere."""
    try:
        data = np.load(path, allow_pickle=False)
        if isinstance(data, np.ndarray):
            return {_only_input(path, inputs): data}
        with data:
            return {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise CliError(f"feeds file {path} does not exist") from None
    except (ValueError, OSError, EOFError) as exc:
        raise CliError(f"cannot read feeds file {path}: {exc}") from None


def _only_input(path: str, inputs: Sequence[str]) -> str:
    if len(inputs) == 1:
        return inputs[0]
    raise CliError(
        f"feeds file {path} holds one array, but the model has {len(inputs)} inputs "
        f"({', '.join(inputs) or 'none'}): give an .npz with one array per input, keyed by its name"
    )


# -- the result ----------------------------------------------------------------------------------------
def output_path(text: str) -> Path:
    """The file ``--out`` names (``.npz`` appended when missing, as numpy does), checked to be
    writable by creating and removing a file beside it -- before any work starts."""
    path = Path(text if text.endswith(".npz") else text + ".npz")
    if path.is_dir():
        raise CliError(f"--out {path} is a directory")
    if not path.parent.is_dir():
        raise CliError(f"--out {path}: directory {path.parent} does not exist")
    if path.exists() and not os.access(path, os.W_OK):
        raise CliError(f"--out {path}: permission denied")
    try:
        probe = _create_beside(path)
    except OSError as exc:
        raise CliError(f"--out {path}: cannot write in {path.parent}: {exc.strerror or exc}") from None
    os.close(probe[0])
    os.unlink(probe[1])
    return path


def write_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write ``arrays`` to ``path`` whole or not at all: into a file beside it, then renamed."""
    fd, tmp = _create_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            save_npz(f, arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _create_beside(path: Path) -> tuple[int, str]:
    """A new hidden file in ``path``'s directory (the umask decides its mode, as for ``path`` itself)."""
    tmp = str(path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp")
    return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
