"""Everything ``gradserve serve`` needs to start a server, checked and with its files read.

The command line (``client/serve_args.py``) builds one; :func:`gradserve.server.service.serve_forever`
runs it. Kept free of heavy imports so building the CLI parser stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass

from gradserve.server.limits import Limits


@dataclass(frozen=True)
class ServerSettings:
    address: str  # HOST:PORT to listen on
    engine: str | None  # "ray", "inline", or None for ray when available
    ray_address: str | None  # Ray cluster to join; None starts an embedded one
    auth_token: str | None  # bearer token every call but health checks must carry
    tls_cert: bytes | None  # PEM certificate chain (with tls_key) to serve TLS
    tls_key: bytes | None
    limits: Limits
    grace: float  # seconds running jobs get on shutdown
    log_level: str
    log_format: str = "text"  # "text", or "json": one JSON object per line
    metrics_address: str | None = None  # HOST:PORT to serve Prometheus /metrics on; None: not served
    state_dir: str | None = None  # where models, accepted jobs and results survive a restart; None: memory only
