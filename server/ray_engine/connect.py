"""Starting or joining Ray: the one place gradserve calls ``ray.init``.

:func:`connect` decides, as ``ray.init`` itself would, whether this process starts an *embedded*
single-node Ray (no address, no ``RAY_ADDRESS``, no cluster started with ``ray start`` on this
machine) or joins a *cluster*, and handles Ray's token authentication for each:

- **Embedded.** Left alone, Ray (2.60 here) turns token authentication on for a new local instance,
  writes a token to ``~/.ray/auth_token`` if there is none -- with the default umask, readable by
  every local user -- and prints a notice about ``RAY_AUTH_MODE`` that a gradserve user cannot act
  on. Turning authentication off instead would let any local user who finds the ports run code as
  this user. So unless the user chose a mode (``RAY_AUTH_MODE`` set: respected as is), the instance
  gets token authentication with a fresh random token of its own, held only in this process's
  environment (``RAY_AUTH_TOKEN``, which the Ray processes it starts inherit; other users cannot
  read another user's process environment) and never written to disk.
- **Cluster.** Before ``ray.init``, one gRPC call to the cluster's GCS with exactly the credentials
  Ray would send (Ray's own channel factory and token loader). A missing or wrong token gets one
  :class:`RayConnectError` line saying what was sent and what to set -- the env file a
  ``deploy/local-cluster`` wrote, when that is the cluster -- instead of ``ray.init``'s 20 seconds of
  C++ ``InvalidAuthToken`` log lines and an error naming another address.
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

import grpc
import ray

try:
    from ray.exceptions import AuthenticationError
except ImportError:  # a Ray without token authentication never raises it

    class AuthenticationError(Exception):  # type: ignore[no-redef]
        pass


log = logging.getLogger(__name__)

AUTH_MODE = "RAY_AUTH_MODE"
AUTH_TOKEN = "RAY_AUTH_TOKEN"
AUTH_TOKEN_PATH = "RAY_AUTH_TOKEN_PATH"
# Where deploy/local-cluster keeps a cluster's state (its GRADSERVE_CLUSTER_DIR default), with the
# env file that names the cluster's address and token.
LOCAL_CLUSTER_DIR = "/tmp/gradserve-local-cluster"
PROBE_TIMEOUT = 10.0  # seconds for a head that is still starting to answer (ray.init waits ~20)


class RayConnectError(ValueError):
    """Ray could not be joined because of what the user gave: the address or the cluster token.
    The message is one line saying what to change (the CLI prints it and exits with status 2)."""


def connect(address: str | None = None, *, log_to_driver: bool = True) -> None:
    """Join the Ray cluster at ``address`` (``HOST:PORT`` or ``"auto"``), or start an embedded
    single-node Ray when there is none to join (see the module docs); ``ray.init`` with gradserve's
    options. Raises :class:`RayConnectError` for an address no cluster answers at, or a cluster
    that refuses the token this process would send."""
    if address and "://" in address:  # a Ray Client address: ray.init's business alone
        _init(address, log_to_driver)
        return
    gcs = _bootstrap_address(address)
    if gcs is None:
        _embedded_auth()
        _init(address, log_to_driver)
        log.info("ray: started embedded single-node Ray")
        return
    where = _describe(address, gcs)
    if address in (None, "auto"):
        _auto_auth()
    _probe(gcs, where)
    _init(address, log_to_driver)
    log.info("ray: joined cluster at %s", where)


def _init(address: str | None, log_to_driver: bool) -> None:
    ray.init(
        address=address,
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=log_to_driver,
        configure_logging=False,
    )


def _bootstrap_address(address: str | None) -> str | None:
    """The GCS address ``ray.init(address)`` would join (Ray's own resolution: the argument, else
    ``RAY_ADDRESS``, else a cluster ``ray start`` recorded here), or None: it would start one."""
    from ray._private import services

    try:
        # ignore: Ray annotates the address as str; its docs and code take None (then RAY_ADDRESS...)
        return services.canonicalize_bootstrap_address(address)  # type: ignore[arg-type]
    except (ConnectionError, ValueError) as exc:  # "auto" with nothing running, a malformed address
        raise RayConnectError(f"cannot join a Ray cluster at {address!r}: {exc}") from None


def _describe(address: str | None, gcs: str) -> str:
    """The address as the user gave it, and where Ray found it when they did not spell it out."""
    if address not in (None, "auto"):
        return address
    if os.environ.get("RAY_ADDRESS"):
        return f"{os.environ['RAY_ADDRESS']} (RAY_ADDRESS)"
    return f"{gcs} (found by auto)"


# -- authentication ---------------------------------------------------------------------------------
def _token_auth():
    """Ray's token-authentication module, or None on a Ray that has none (nothing to set up)."""
    try:
        from ray._private.authentication import authentication_token_setup
    except ImportError:
        return None
    return authentication_token_setup


def _enable_token_mode() -> None:
    """Token mode for this process and the Ray processes it starts; Ray caches both its config
    and the token, so they are read again."""
    from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]  # not in _raylet.pyi

    os.environ[AUTH_MODE] = "token"
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _embedded_auth() -> None:
    """Token authentication with a token of this instance's own (see the module docs)."""
    if _token_auth() is None or AUTH_MODE in os.environ:
        return
    if not os.environ.get(AUTH_TOKEN):
        os.environ[AUTH_TOKEN] = secrets.token_hex(32)
    _enable_token_mode()


def _auto_auth() -> None:
    """What ``ray.init`` does for a cluster it finds by itself (no explicit address): token mode
    when a token is at hand and no mode was chosen -- done here, without the notice Ray prints,
    and before the probe, which must send what ray.init will."""
    setup = _token_auth()
    if setup is None or AUTH_MODE in os.environ:
        return
    from ray._raylet import AuthenticationTokenLoader  # type: ignore[attr-defined]  # not in _raylet.pyi

    if AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True):
        _enable_token_mode()


def _probe(gcs: str, where: str) -> None:
    """One call to the GCS with the credentials ray.init would use: a token it refuses or no
    answer at all becomes a :class:`RayConnectError`; anything else is left to ray.init."""
    try:
        from ray._private.grpc_utils import init_grpc_channel
        from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
    except ImportError:  # an older Ray: no token authentication, and ray.init says what is wrong
        return
    channel = init_grpc_channel(gcs)  # Ray's own: TLS if RAY_USE_TLS, its token interceptor
    try:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=PROBE_TIMEOUT, wait_for_ready=True)
    except AuthenticationError:  # token mode, but the token Ray was told of cannot be read
        raise RayConnectError(token_hint(where, gcs)) from None
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
            raise RayConnectError(token_hint(where, gcs)) from None
        if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            raise RayConnectError(
                f"no Ray cluster answers at {where} (waited {PROBE_TIMEOUT:.0f} s): is its head "
                "up, and is that the head's GCS port (ray start --port, 6379 by default)?"
            ) from None
    finally:
        channel.close()


def token_hint(where: str, gcs: str) -> str:
    """One line: the cluster at ``where`` refused this process's token; what was sent, what to set."""
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    if not is_token_auth_enabled():
        sent = f"it needs a token and none was sent ({AUTH_MODE} is not 'token')"
    elif not _has_token():
        sent = f"{AUTH_MODE}=token but there is no token in {AUTH_TOKEN}, {_token_path()} or ~/.ray/auth_token"
    else:
        sent = f"it refused the token in {_token_source()}"
    env_file = local_cluster_env(gcs)
    if env_file is not None:
        fix = f"source {env_file} (written by deploy/local-cluster for this cluster) and run again"
    else:
        fix = (
            f"set {AUTH_MODE}=token and {AUTH_TOKEN_PATH} to the cluster's token file, or {AUTH_TOKEN} to the "
            "token (deploy/local-cluster writes them to $GRADSERVE_CLUSTER_DIR/env: source that file)"
        )
    return f"cannot join the Ray cluster at {where}: {sent}; {fix}"


def _has_token() -> bool:
    from ray._raylet import AuthenticationTokenLoader  # type: ignore[attr-defined]  # not in _raylet.pyi

    try:
        return AuthenticationTokenLoader.instance().has_token()
    except AuthenticationError:  # RAY_AUTH_TOKEN_PATH names a file that cannot be read
        return False


def _token_path() -> str:
    path = os.environ.get(AUTH_TOKEN_PATH)
    return f"{AUTH_TOKEN_PATH}={path}" if path else AUTH_TOKEN_PATH


def _token_source() -> str:
    """Where Ray took the token from, in its order of precedence."""
    if os.environ.get(AUTH_TOKEN):
        return AUTH_TOKEN
    if os.environ.get(AUTH_TOKEN_PATH):
        return f"{os.environ[AUTH_TOKEN_PATH]} ({AUTH_TOKEN_PATH})"
    return "~/.ray/auth_token"


def local_cluster_env(gcs: str) -> Path | None:
    """The env file of the ``deploy/local-cluster`` whose head is at ``gcs`` (in
    ``$GRADSERVE_CLUSTER_DIR`` or the default state dir), if there is one."""
    from ray._private import services

    for folder in dict.fromkeys(filter(None, (os.environ.get("GRADSERVE_CLUSTER_DIR"), LOCAL_CLUSTER_DIR))):
        env_file = Path(folder) / "env"
        try:
            lines = env_file.read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            key, _, value = line.removeprefix("export ").partition("=")
            if key == "RAY_ADDRESS" and value and _canonical(services, value) == gcs:
                return env_file
    return None


def _canonical(services, address: str) -> str | None:
    try:
        return services.canonicalize_bootstrap_address(address)
    except (ConnectionError, ValueError):
        return None
