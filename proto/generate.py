"""Regenerate the Python modules for the .proto files in this folder: ``python -m gradserve.proto.generate``.

The sources live in ``proto/v1/*.proto`` but are compiled under the virtual path
``gradserve/proto/v1/`` so the generated imports read ``from gradserve.proto.v1 import model_pb2``.
``--check`` compares instead of writing and exits 1 when the committed files are stale.

What ``--check`` compares is what the modules mean, not the generator's version stamps: the
compiled descriptors (every message, enum and service, byte for byte) and the generated code with
its version lines masked. A patch release of grpcio-tools stamps its own version into every module
(``GRPC_GENERATED_VERSION``, ``Protobuf Python Version``); that alone is not staleness. The
committed stamps are floors for the runtime (the modules refuse to import under an older grpcio or
protobuf), so ``pyproject.toml``'s ranges start at them (``tests/proto/test_proto.py`` checks that).
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
VIRTUAL = "gradserve/proto"


def generate(out_dir: Path) -> list[Path]:
    """Compile every .proto into ``out_dir``; return the generated files (relative to out_dir)."""
    from grpc_tools import protoc  # build-time only dependency
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    sources = sorted(p.relative_to(HERE) for p in HERE.glob("v1/*.proto"))
    args = [
        "protoc",
        f"-I{VIRTUAL}={HERE}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(f"{VIRTUAL}/{s}" for s in sources),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    root = out_dir / VIRTUAL
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


# Lines that carry the generator's version and nothing about the messages or services.
_VERSION_STAMPS = re.compile(
    rb"^(# Protobuf Python Version: .*"
    rb"|GRPC_GENERATED_VERSION = .*"
    rb"|_runtime_version\.ValidateProtobufRuntimeVersion\((?:.|\n)*?\n\))$",
    re.MULTILINE,
)


def meaning(code: bytes) -> bytes:
    """A generated module with its generator's version stamps masked."""
    return _VERSION_STAMPS.sub(b"<version>", code)


def same_meaning(fresh: Path, committed: Path) -> bool:
    """Whether a committed module says what a freshly generated one says (versions aside)."""
    return committed.exists() and meaning(fresh.read_bytes()) == meaning(committed.read_bytes())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed modules are stale")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        files = generate(Path(tmp))
        root = Path(tmp) / VIRTUAL
        stale = [f for f in files if not same_meaning(root / f, HERE / f)]
        if args.check:
            for f in stale:
                print(f"stale: proto/{f}", file=sys.stderr)
            return 1 if stale else 0
        for f in stale:
            shutil.copyfile(root / f, HERE / f)
            print(f"wrote proto/{f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
