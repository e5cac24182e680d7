"""The code passes ruff (lint and format) and mypy with the project's configuration ([tool.ruff] and [tool.mypy] in
pyproject.toml), so `make test` and CI lint and type-check it: unused imports and variables,
undefined names, runaway lines, calls and values that do not fit the annotations..."""

from __future__ import annotations

import ast
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


PACKAGE_DIRS = ("client", "server", "worker", "proto")


def _private_names_defined(tree: ast.Module) -> set[str]:
    """The private names a module defines: functions, methods, classes, and attributes it assigns
    or annotates (``self._x = ...``, ``_x: int`` in a class body)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def test_no_module_uses_another_modules_private_names():
    """``x._name`` in the package is the module's own ``_name`` (or a library's, read through its
    module: ``ray._private``...): one module does not reach into another's internals (issue 23);
    what a module offers others is public and documented."""
    found = []
    for path in sorted(p for d in PACKAGE_DIRS for p in (ROOT / d).rglob("*.py")):
        if "_pb2" in path.name:
            continue
        tree = ast.parse(path.read_text(), str(path))
        own = _private_names_defined(tree)
        libraries = {
            alias.asname or alias.name.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, (ast.Import, ast.ImportFrom))
            and not (isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("gradserve")))
            for alias in node.names
            if not (isinstance(node, ast.Import) and alias.name.startswith("gradserve"))
        }
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")):
                continue
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            root = base.id if isinstance(base, ast.Name) else None
            if root in ("self", "cls") and isinstance(node.value, ast.Name) or node.attr in own or root in libraries:
                continue
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert not found, "private names of other modules used (make them public, with a docstring):\n" + "\n".join(found)
