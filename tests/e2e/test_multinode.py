"""Partitions really run on different nodes of a multi-node Ray cluster, and the gradients are right."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_partitions_on_different_nodes():
    here = Path(__file__).resolve().parents[1]  # tests/: multinode_run.py and the helpers it imports
    proc = subprocess.run(
        [sys.executable, str(here / "multinode_run.py"), str(here)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["cluster_nodes"] == 3
    assert len(set(report["partition_nodes"])) >= 2, report
    assert report["loss_diff"] <= 1e-10
    assert report["worst_rel_grad_diff"] <= 1e-10
