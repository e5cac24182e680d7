"""The two commands on a fresh machine: what `make demo` and `make test` install, from the lock,
and that this test environment is the locked one."""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "constraints.txt"


def _locked() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version.strip()
    return pins


def _make_dry_run(target: str) -> list[str]:
    """The pip commands `make TARGET` would run on a fresh clone (-B: as if nothing were installed)."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    done = subprocess.run(["make", "-n", "-B", target], cwd=ROOT, capture_output=True, text=True, check=True)
    return [line for line in done.stdout.splitlines() if "pip install" in line]


def test_every_install_goes_through_the_lock():
    for target in ("demo", "test"):
        installs = _make_dry_run(target)
        assert installs and all("--constraint constraints.txt" in line for line in installs), installs
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_the_demo_installs_no_test_tools_and_mkl_only_on_intel():
    installs = " ".join(_make_dry_run("demo"))
    assert "test" not in installs and "torch" not in installs
    intel = "GenuineIntel" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else False
    assert ("[mkl]" in installs) == intel, installs
    assert "[test,mkl]" in " ".join(_make_dry_run("test"))  # the tests cover both BLAS libraries


def test_this_environment_is_the_locked_one():
    """What `make test` installed is what the lock says, so a green run here says the same on the
    next machine (a package installed at another version by hand would make this fail)."""
    pins = _locked()
    for dist in ("numpy", "ray", "grpcio", "protobuf", "onnx", "numba", "torch", "pytest"):
        assert dist in pins, f"constraints.txt does not pin {dist}"
    for name, version in pins.items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # locked for another platform or extra (mkl off x86-64)
        assert Version(installed).public == Version(version).public, f"{name}: installed {installed}, locked {version}"


def test_the_lock_satisfies_the_librarys_own_ranges():
    """The ranges users get stay open, and the locked versions are inside them."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _locked()
    requirements = [Requirement(r) for r in project["dependencies"]]
    requirements += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    for req in requirements:
        name = req.name.lower().replace("_", "-")
        if name in pins:
            assert req.specifier.contains(pins[name], prereleases=True), f"{req} excludes the locked {pins[name]}"
        assert "==" not in str(req.specifier) or name == "torch", (
            f"{req}: the library pins it (only torch, the CPU build)"
        )
    assert isinstance(project["license"], str) and re.fullmatch(r"[A-Za-z0-9.\-]+", project["license"])
