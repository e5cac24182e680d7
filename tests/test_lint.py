"""The code passes ruff with the project's configuration ([tool.ruff] in pyproject.toml), so
`make test` and CI lint it: unused imports and variables, undefined names, runaway lines..."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    assert importlib.util.find_spec("ruff") is not None, "ruff is not installed: it is in the test extra (make test)"
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"ruff check found problems (fix them, or `ruff check --fix`):\n{done.stdout}{done.stderr}"
