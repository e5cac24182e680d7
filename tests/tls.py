"""Self-signed certificates for the TLS tests, made with the openssl command line."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def self_signed(cert: Path, key: Path, name: str = "localhost", alt_names: str | None = None) -> None:
    """Write a one-day self-signed EC certificate for ``name`` (and ``alt_names``, an openssl
    subjectAltName value) to ``cert`` and its key to ``key``; skips the test without openssl."""
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    extra = ["-addext", f"subjectAltName={alt_names}"] if alt_names else []
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        + ["-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", f"/CN={name}", *extra],
        check=True,
        capture_output=True,
        timeout=30,
    )
