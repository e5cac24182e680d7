"""Placement that survives failures, on a real 3-worker cluster (deploy/local-cluster) behind a
gradserve server: a partition worker is killed mid-job six times in a row; every job completes
with the inline engine's gradients, and afterwards a 3-partition job still runs on 3 distinct
nodes (replacements go where the lost workers were, not all onto one node), a tiny one nests its
calls across them, and concurrent jobs run on different nodes."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

import gradserve
from clusters import local_cluster
from gradcheck import assert_same_result

pytestmark = pytest.mark.slow


def _model(width: int = 384, layers: int = 6, batch: int = 2048, seed: int = 3):
    """A tanh MLP; by default about a second of work per job on three 1-CPU nodes: long enough to
    kill a worker mid-way."""
    rng = np.random.default_rng(seed)
    m = gradserve.ModelBuilder()
    h = m.input("x", (None, width), np.float64)
    for i in range(layers):
        h = m.tanh(h @ m.param(f"w{i}", rng.standard_normal((width, width)) / np.sqrt(width)))
    model = m.loss((h * h).mean())
    return model, {"x": rng.standard_normal((batch, width))}


def _nodes(result) -> list[str]:
    return [w["node_id"] for w in result.info["placement"][0]]


@pytest.fixture
def cluster(tmp_path):
    with local_cluster(tmp_path, 3) as running:
        yield running


def test_killed_workers_are_replaced_on_their_nodes(cluster):
    address, state = cluster
    model, feeds = _model()
    reference = gradserve.local().gradients(model, feeds)
    options = dict(partitions=3, micro_batches=4, replicas=1)
    with gradserve.Client(address) as client:
        first = client.gradients(model, feeds, **options)
        assert_same_result(first, reference)
        assert len(set(_nodes(first))) == 3, first.info["placement"]
        placement = first.info["placement"][0]
        for i in range(6):
            victim = placement[i % 3]  # a partition worker of the job about to run (idle actors holding
            job = client.submit(model, feeds, **options)  # the stages are reused)
            for status in job.watch(timeout=120):
                if status.steps_done >= 1 or status.state in ("done", "failed", "cancelled"):
                    break
            os.kill(victim["pid"], signal.SIGKILL)
            result = job.result(timeout=300)
            assert_same_result(result, reference)
            assert result.info["retries"] == 1, f"kill {i}: the job did not lose its worker: {result.info}"
            placement = result.info["placement"][0]
            assert victim["pid"] not in [w["pid"] for w in placement]
            assert len(set(_nodes(result))) == 3, f"kill {i}: partitions share a node: {placement}"
        after = client.gradients(model, feeds, **options)
        # A tiny chain across the three nodes nests its calls, stage to stage, when its workers
        # come in the pool's order (they do on a pool of one idle worker per node).
        tiny, tiny_feeds = _model(width=8, layers=3, batch=4)  # moves a few KiB
        nested = client.gradients(tiny, tiny_feeds, partitions=3, micro_batches=1, replicas=1)
        # Concurrent single-partition jobs spread over the idle nodes instead of queueing on one.
        # The first round starts the actors for the new stage (one at a time, a second or two each,
        # so a job may end before the last is placed); the second places all three at once.
        for _ in range(2):
            jobs = [client.submit(model, feeds, partitions=1, micro_batches=1, replicas=1) for _ in range(3)]
            concurrent = [job.result(timeout=300) for job in jobs]
    assert_same_result(after, reference)
    assert after.info["retries"] == 0
    assert_same_result(nested, gradserve.local().gradients(tiny, tiny_feeds))
    seqs = [w["seq"] for w in nested.info["placement"][0]]
    assert nested.info["nested"] == (seqs == sorted(set(seqs))), nested.info["placement"]
    assert len(set(_nodes(nested))) == 3, nested.info["placement"]
    assert len(set(_nodes(after))) == 3, after.info["placement"]
    for result in concurrent:
        assert_same_result(result, reference)
    assert len({_nodes(r)[0] for r in concurrent}) == 3, [r.info["placement"] for r in concurrent]
    # The server's own account: after the last replacement, the pool is one actor on each node.
    pool_lines = [line for line in (state / "server.log").read_text().splitlines() if "worker pool:" in line]
    assert len(pool_lines) >= 7 and pool_lines[-1].endswith("3 actors on 3 nodes"), pool_lines[-8:]


def test_auto_uses_both_nodes_for_a_large_job_and_one_each_for_small_ones(tmp_path):
    """On 2 worker nodes with everything ``auto``: a large job alone gets a replica on each node;
    four concurrent small jobs each run on one node (with one partition and one replica: splitting
    them would cost more than it saves)."""
    rng = np.random.default_rng(5)
    m = gradserve.ModelBuilder()
    h = m.input("x", (None, 1024), np.float64)
    for i in range(4):
        h = m.tanh(h @ m.param(f"w{i}", rng.standard_normal((1024, 1024)) / 32))
    large, large_feeds = m.loss((h * h).mean()), {"x": rng.standard_normal((1024, 1024))}
    small, small_feeds = _model()
    small_feeds = {"x": small_feeds["x"][:8]}
    with local_cluster(tmp_path, 2) as (address, _):
        with gradserve.Client(address) as client:
            result = client.gradients(large, large_feeds)
            assert_same_result(result, gradserve.local().gradients(large, large_feeds))
            assert result.info["replicas"] == 2, result.info.get("auto")
            assert len({w["node_id"] for row in result.info["placement"] for w in row}) == 2
            client.upload(small)
            jobs = [client.submit(small, small_feeds) for _ in range(4)]
            results = [job.result(timeout=300) for job in jobs]
    reference = gradserve.local().gradients(small, small_feeds)
    for r in results:
        assert_same_result(r, reference)
        assert r.info["replicas"] == 1 and r.info["partitions"] == 1, r.info.get("auto")
