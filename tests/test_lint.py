"""The code passes ruff (lint and format) and mypy with the project's configuration ([tool.ruff] and [tool.mypy] in
pyproject.toml), so `make test` and CI lint and type-check it: unused imports and variables,
undefined names, runaway lines, calls and values that do not fit the annotations..."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    assert importlib.util.find_spec("ruff") is not None, "ruff is not installed: it is in the test extra (make test)"
    done = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, (
        f"ruff check found problems (fix them, or `ruff check --fix`):\n{done.stdout}{done.stderr}"
    )


def test_ruff_format_changes_nothing():
    """The code is as ``ruff format`` writes it (the op table excepted, see [tool.ruff.format])."""
    done = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--no-cache", "--check", "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, (
        f"ruff format would change these files (run `ruff format`):\n{done.stdout}{done.stderr}"
    )


def _mypy_home() -> Path:
    """mypy's own folder (its cache, the link below): under the venv when there is one (the cache then
    survives between runs and goes with ``make clean``), else in the temporary files; never among
    the sources."""
    if sys.prefix != sys.base_prefix:
        return Path(sys.prefix) / "gradserve-mypy"
    return Path(tempfile.gettempdir()) / f"gradserve-mypy-{hashlib.sha256(bytes(ROOT)).hexdigest()[:12]}"


def _package_link(home: Path) -> Path:
    """A folder holding ``gradserve``, a link to the checkout: mypy finds modules by their folders,
    and the checkout's folders are the package's only through pyproject's package-dir mapping."""
    search = home / "path"
    link = search / "gradserve"
    if not (link.is_symlink() and link.resolve() == ROOT):
        search.mkdir(parents=True, exist_ok=True)
        fresh = search / f"gradserve.{os.getpid()}"
        fresh.unlink(missing_ok=True)
        fresh.symlink_to(ROOT, target_is_directory=True)
        os.replace(fresh, link)  # atomic: a concurrent run sees the old link or the new one
    return search


def test_mypy_finds_nothing():
    """``mypy -p gradserve`` on the package (tests, benchmarks and deploy/ left out, see
    [tool.mypy]). A cold run takes ~50 s on two cores; with its cache, 2 s."""
    assert importlib.util.find_spec("mypy") is not None, "mypy is not installed: it is in the test extra (make test)"
    home = _mypy_home()
    search = _package_link(home)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "--cache-dir",
            str(home / "cache"),
            "-p",
            "gradserve",
        ],
        cwd=search,
        env={**os.environ, "MYPYPATH": str(search)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = re.sub(r"^gradserve/", "", done.stdout + done.stderr, flags=re.M)  # paths from the checkout
    assert done.returncode == 0, (
        f"mypy found problems (fix them, or a narrow `# type: ignore[code]` saying why):\n{report}"
    )
