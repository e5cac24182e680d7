"""Command-line options of ``gradserve serve`` (kept apart so the CLI can list them without
importing the server)."""

from __future__ import annotations

import argparse


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default="127.0.0.1:50051", metavar="HOST:PORT",
                   help="where to listen (default 127.0.0.1:50051; port 0 picks a free port)")
    p.add_argument("--ray-address", metavar="ADDR",
                   help="join this Ray cluster ('auto' or HOST:PORT); default: start an embedded single-node Ray")
