"""Command-line options of ``gradserve serve`` (kept apart so the CLI can list them without
importing the server), and their translation into :class:`~gradserve.server.settings.ServerSettings`."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from gradserve.server.limits import Limits
from gradserve.server.settings import ServerSettings

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def byte_size(text: str) -> int:
    """``"512M"``, ``"2G"``, ``"1048576"`` -> bytes (binary units; a trailing "B"/"iB" is allowed)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512M, 2G, 1048576)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _concurrency(text: str) -> int | None:
    """``auto`` (None: follow the engine's capacity) or a positive number."""
    return None if text.strip().lower() == "auto" else _positive_int(text)


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """Declare the ``gradserve serve`` options on ``p``."""
    p.add_argument(
        "--address",
        default="127.0.0.1:50051",
        metavar="HOST:PORT",
        help="where to listen (default 127.0.0.1:50051; port 0 picks a free port)",
    )
    p.add_argument(
        "--engine",
        choices=["ray", "inline"],
        default=None,
        help="ray: partitions on Ray worker actors; inline: the whole graph in the server process "
        "(default: ray, or inline while the ray engine is not installed)",
    )
    p.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="join this Ray cluster ('auto' or HOST:PORT); default: start an embedded single-node Ray",
    )
    sec = p.add_argument_group("security")
    sec.add_argument(
        "--auth-token-file",
        metavar="FILE",
        help="require 'authorization: Bearer <token>' (the token in FILE) on every call but health checks",
    )
    sec.add_argument("--tls-cert", metavar="PEM", help="serve TLS with this certificate (chain); needs --tls-key")
    sec.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    lim = p.add_argument_group("limits (sizes take K/M/G suffixes)")
    lim.add_argument(
        "--max-model-bytes",
        type=byte_size,
        default=_default("max_model_bytes"),
        metavar="SIZE",
        help="parameters + constants of one model (default 4G)",
    )
    lim.add_argument(
        "--max-store-bytes",
        type=byte_size,
        default=_default("max_store_bytes"),
        metavar="SIZE",
        help="all stored models together; least recently used are dropped (default 16G)",
    )
    lim.add_argument(
        "--max-feed-bytes",
        type=byte_size,
        default=_default("max_feed_bytes"),
        metavar="SIZE",
        help="the feeds of one job (default 2G)",
    )
    lim.add_argument(
        "--max-tensor-elements",
        type=_positive_int,
        default=_default("max_tensor_elements"),
        metavar="N",
        help="elements of any one tensor (default 2^30)",
    )
    lim.add_argument(
        "--max-concurrent-jobs",
        type=_concurrency,
        default=_default("max_concurrent_jobs"),
        metavar="N|auto",
        help="jobs computing at once; more wait in per-client queues served in turn. "
        "auto (default): with the ray engine two per CPU of the cluster's alive nodes, "
        "following nodes that join or leave; 2 with the inline engine",
    )
    lim.add_argument(
        "--max-queued-jobs",
        type=int,
        default=_default("max_queued_jobs"),
        metavar="N",
        help="jobs waiting beyond those; more are refused (default 64)",
    )
    lim.add_argument(
        "--max-message-bytes",
        type=byte_size,
        default=_default("max_message_bytes"),
        metavar="SIZE",
        help="one gRPC message; tensors travel in 1M chunks (default 16M)",
    )
    lim.add_argument(
        "--max-pending-bytes",
        type=byte_size,
        default=_default("max_pending_bytes"),
        metavar="SIZE",
        help="uploads being received plus feeds of queued and running jobs, together (default 8G)",
    )
    lim.add_argument(
        "--result-ttl",
        type=float,
        default=_default("result_ttl"),
        metavar="SECONDS",
        help="how long an unfetched result is kept (default 600)",
    )
    lim.add_argument(
        "--max-state-bytes",
        type=byte_size,
        default=_default("max_state_bytes"),
        metavar="SIZE",
        help="files in --state-dir together: stored models, accepted jobs' feeds, kept results (default 64G)",
    )
    ses = p.add_argument_group("training sessions")
    ses.add_argument(
        "--session-idle-ttl",
        type=float,
        default=_default("session_idle_ttl"),
        metavar="SECONDS",
        help="close a session after this long without a call, freeing its workers' memory (default %(default)g)",
    )
    ses.add_argument(
        "--max-sessions-per-client",
        type=_positive_int,
        default=_default("max_sessions_per_client"),
        metavar="N",
        help="sessions one client connection may hold open (default %(default)s)",
    )
    ses.add_argument(
        "--session-checkpoint-steps",
        type=_positive_int,
        default=_default("session_checkpoint_steps"),
        metavar="N",
        help="checkpoint each session's weights and optimizer state every N steps (default %(default)s) ...",
    )
    ses.add_argument(
        "--session-checkpoint-seconds",
        type=float,
        default=_default("session_checkpoint_seconds"),
        metavar="SECONDS",
        help="... or every SECONDS, whichever comes first (default %(default)g); "
        "into --state-dir, and what a session that lost a worker restarts from",
    )
    p.add_argument(
        "--grace",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="on SIGINT/SIGTERM, let running jobs finish this long before cancelling them (default 10)",
    )
    ops = p.add_argument_group("operating")
    ops.add_argument(
        "--state-dir",
        metavar="DIR|none",
        default=None,
        help="keep stored models, accepted asynchronous jobs (with their feeds) and unfetched results "
        "here, so a restart or a crash loses none of them: the server serves the models without a new "
        "upload, runs again the jobs that were queued or running, and returns the kept results. "
        "Default: gradserve/state under the user's cache directory ($XDG_CACHE_HOME or ~/.cache); "
        "'none' keeps everything in memory only. One server per directory.",
    )
    ops.add_argument(
        "--metrics-address",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (jobs by outcome and code, queue and "
        "run time, queued/running jobs, uploads, model store, worker pool, RPCs by method and code; "
        "see README 'Operating'); default: not served",
    )
    ops.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="what the server logs (default info: one line per job outcome -- id, model, K/M/R, "
        "seconds, status code -- plus uploads, cancels and start/stop; tracebacks only for internal "
        "errors)",
    )
    ops.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="text (default), or json: one JSON object per line (time, level, logger, message; a "
        "job's outcome line adds its fields as keys) for log shippers",
    )


def _default(name: str) -> Any:
    """The default of a :class:`gradserve.server.limits.Limits` field: one source of truth."""
    return Limits.__dataclass_fields__[name].default


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def server_settings(args: argparse.Namespace) -> ServerSettings:
    """Check the parsed options and read the files they name; ``ValueError`` says what is wrong."""
    from gradserve.server.auth import read_token_file

    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    if args.engine == "inline" and args.ray_address:
        raise ValueError("--ray-address needs --engine ray")
    if args.metrics_address is not None:
        host, sep, port = args.metrics_address.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"--metrics-address must be HOST:PORT, got {args.metrics_address!r}")
    limits = Limits(
        max_model_bytes=args.max_model_bytes,
        max_store_bytes=max(args.max_store_bytes, args.max_model_bytes),
        max_feed_bytes=args.max_feed_bytes,
        max_tensor_elements=args.max_tensor_elements,
        max_concurrent_jobs=args.max_concurrent_jobs,
        max_queued_jobs=max(0, args.max_queued_jobs),
        max_message_bytes=args.max_message_bytes,
        max_pending_bytes=args.max_pending_bytes,
        result_ttl=args.result_ttl,
        max_state_bytes=args.max_state_bytes,
        session_idle_ttl=args.session_idle_ttl,
        max_sessions_per_client=args.max_sessions_per_client,
        session_checkpoint_steps=args.session_checkpoint_steps,
        session_checkpoint_seconds=args.session_checkpoint_seconds,
    )
    if args.state_dir is None:
        from gradserve.server.state import default_state_dir

        state_dir: str | None = str(default_state_dir())
    else:
        state_dir = None if args.state_dir.lower() == "none" else args.state_dir
    return ServerSettings(
        address=args.address,
        engine=args.engine,
        ray_address=args.ray_address,
        auth_token=read_token_file(args.auth_token_file) if args.auth_token_file else None,
        tls_cert=_read(args.tls_cert, "TLS certificate") if args.tls_cert else None,
        tls_key=_read(args.tls_key, "TLS key") if args.tls_key else None,
        limits=limits,
        grace=args.grace,
        log_level=args.log_level,
        log_format=args.log_format,
        metrics_address=args.metrics_address,
        state_dir=state_dir,
    )
