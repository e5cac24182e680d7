"""Where a :class:`gradserve.Client` connects, and why it could not.

:func:`server_target` turns what a user types (``host``, ``host:port``, ``[::1]``, ``dns:///host``,
``unix:/path``) into a gRPC target, with the server's default port 50051 where none is given:
gRPC's own default is 443, which no gradserve server listens on.

:func:`connect_failure` reads gRPC's text for a call that never reached a server (connection
refused, host name not found, TLS handshake failed...) and says it in a few words; it returns None
for an UNAVAILABLE that a server sent itself (e.g. shutting down), which is worth retrying.
"""

from __future__ import annotations

import ipaddress
import re

DEFAULT_PORT = 50051  # `gradserve serve`'s

# Schemes whose targets carry no port (a socket path, a vsock cid:port pair), passed on as they are.
_PORTLESS_SCHEMES = ("unix", "unix-abstract", "vsock")
_HOST_SCHEMES = ("dns", "ipv4", "ipv6")


def server_target(address: str) -> str:
    """The gRPC target for a server ``address``: ``host`` and ``[v6]`` get port 50051, as do the
    hosts of ``dns:``, ``ipv4:`` and ``ipv6:`` targets; ``unix:`` targets are left alone.
    Raises ValueError naming what is wrong (no host, a port that is not a number in 1-65535, a URL)."""
    if not isinstance(address, str):
        raise TypeError(f"server address must be a string, got {type(address).__name__}")
    text = address.strip()
    if not text:
        raise ValueError("server address is empty: give HOST:PORT")
    scheme, colon, rest = text.partition(":")
    if colon and scheme in _PORTLESS_SCHEMES:
        return text
    if colon and scheme in _HOST_SCHEMES:
        prefix = scheme + ":"
        if scheme == "dns" and rest.startswith("//"):  # dns://[authority]/host[:port]
            slash = rest.find("/", 2)
            if slash < 0:
                raise ValueError(f"server address {address!r}: expected dns:///HOST[:PORT]")
            prefix, rest = prefix + rest[: slash + 1], rest[slash + 1 :]
        hosts = rest.split(",") if scheme != "dns" else [rest]  # ipv4:/ipv6: take a list of addresses
        return prefix + ",".join(_with_port(h, address) for h in hosts)
    if "://" in text:
        raise ValueError(f"server address {address!r}: give HOST:PORT, not a URL")
    return _with_port(text, address)


def _with_port(hostport: str, address: str) -> str:
    """``hostport`` with the default port if it has none; ``address`` is what the user gave."""
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0:
            raise ValueError(f"server address {address!r}: '[' without ']'")
        host, after = hostport[: end + 1], hostport[end + 1 :]
        if not after:
            return f"{host}:{DEFAULT_PORT}"
        if not after.startswith(":"):
            raise ValueError(f"server address {address!r}: expected ':PORT' after ']'")
        port = after[1:]
    elif hostport.count(":") > 1:  # a bare IPv6 literal: its last group cannot be told from a port
        try:
            ipaddress.IPv6Address(hostport)
        except ValueError:
            raise ValueError(
                f"server address {address!r}: an IPv6 address with a port goes in brackets, e.g. [::1]:{DEFAULT_PORT}"
            ) from None
        return f"[{hostport}]:{DEFAULT_PORT}"
    else:
        host, _, port = hostport.partition(":")
        if ":" not in hostport:
            return f"{hostport}:{DEFAULT_PORT}"
    if not host or host == "[]":
        raise ValueError(f"server address {address!r}: no host before ':{port}'")
    if not (port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(f"server address {address!r}: port {port!r} is not a number from 1 to 65535")
    return f"{host}:{port}"


# What gRPC (grpc-core 1.5x-1.7x) says when no connection could be made; a server's own UNAVAILABLE
# says something else (and carries a retry hint, see gradserve.server.errors).
_CONNECT_FAILURE = re.compile(
    r"failed to connect to all addresses|errors? resolving|DNS resolution failed|name resolution|"
    r"Socket closed|Connection reset|handshake failed|Connection refused|timed out before",
    re.IGNORECASE,
)

# (pattern in gRPC's text, the reason told), the first match wins.
_REASONS: tuple[tuple[re.Pattern, str], ...] = tuple(
    (re.compile(p, re.IGNORECASE), r)
    for p, r in (
        (r"connection refused", "connection refused"),
        (r"domain name not found|not known|NXDOMAIN|no address associated", "host name not found"),
        (r"resolv|DNS", "host name lookup failed"),
        (r"CERTIFICATE_VERIFY_FAILED: ([^:]+)", "TLS handshake failed: certificate verify failed: {0}"),
        (r"WRONG_VERSION_NUMBER", "TLS handshake failed: the server does not speak TLS"),
        (
            r"handshake failed[^:]*: (?:SSL_ERROR_SSL: )?(?:error:\w+:)?(?:SSL routines:)?(?:OPENSSL_internal:)?([^:]+)",
            "TLS handshake failed: {0}",
        ),
        (r"Socket closed|Connection reset", "connection closed during setup: does the server use TLS?"),
        (r"timed out", "connection timed out"),
        (r"No such file or directory", "no such socket file"),
        (r"Network is unreachable|No route to host|Permission denied", "{m}"),
    )
)


def connect_failure(details: str) -> str | None:
    """Why gRPC could not reach a server, from an UNAVAILABLE call's ``details``, in a few words
    ("connection refused", "host name not found", "TLS handshake failed: ..."); None when the
    details are not a connection failure."""
    if not _CONNECT_FAILURE.search(details or ""):
        return None
    for pattern, reason in _REASONS:
        found = pattern.search(details)
        if found:
            groups = [g.strip().lower() for g in found.groups()]
            return reason.format(*groups, m=found.group(0).lower())
    # Unknown wording: gRPC's last error, without its "failed to connect..." and "CODE: address:" prefixes.
    last = details.rsplit("last error: ", 1)[-1]
    return re.sub(r"^[A-Z_]+: (?:\S+: )?", "", last).strip() or details
