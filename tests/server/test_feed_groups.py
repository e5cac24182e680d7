"""How a job's feeds go to the object store (:func:`place_feeds`), as a pure decision: small feeds
ride inside the calls, large ones read on the same nodes share one put, and no node is sent a feed
it does not read. No Ray: the put is a recorder."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from gradserve.server.ray_engine.submit import INLINE_BYTES, FeedGroup, place_feeds
from gradserve.worker.stage import StageSpec

BIG = np.zeros(INLINE_BYTES // 8 + 1)  # just over the inline limit
SMALL = np.zeros(4)


def _spec(*feeds: str) -> StageSpec:
    return StageSpec([], list(feeds), [], [], [], [], [])


def _place(specs, nodes, chunks):
    """``nodes``: per replica, the node of each partition; ``chunks``: the feeds of each chunk."""
    puts: list[dict] = []

    def put(value):
        puts.append(value)
        return len(puts) - 1  # stands for the ObjectRef

    dep = SimpleNamespace(specs=specs, where=[[{"node_id": n} for n in row] for row in nodes])
    m = len(chunks) // len(nodes)
    placed = place_feeds([SimpleNamespace(feeds=f) for f in chunks], dep, m, put=put)
    return placed, puts


def test_small_feeds_ride_inside_the_calls_and_large_ones_read_on_one_node_share_a_put():
    specs = [_spec("x", "mask"), _spec("y")]
    placed, puts = _place(specs, [["a", "a"]], [{"x": BIG, "y": BIG, "mask": SMALL}])
    (feeds,) = placed
    assert feeds["mask"] is SMALL
    assert isinstance(feeds["x"], FeedGroup) and feeds["x"] == feeds["y"]
    assert len(puts) == 1 and set(puts[0]) == {"x", "y"}


def test_no_node_is_sent_a_feed_it_does_not_read():
    # x read on node a only, y on b only, z on both: three objects, each pulled where it is read.
    specs = [_spec("x", "z"), _spec("y", "z")]
    (feeds,), puts = _place(specs, [["a", "b"]], [{"x": BIG, "y": BIG, "z": BIG}])
    assert len(puts) == 3 and sorted(sorted(p) for p in puts) == [["x"], ["y"], ["z"]]
    assert len({feeds["x"], feeds["y"], feeds["z"]}) == 3


def test_a_feed_no_partition_reads_is_not_put_and_each_chunk_has_its_own_objects():
    specs = [_spec("x"), _spec("y")]
    chunks = [{"x": BIG, "y": BIG, "side": BIG} for _ in range(4)]  # 2 replicas x 2 micro-batches
    placed, puts = _place(specs, [["a", "a"], ["b", "c"]], chunks)
    assert all("side" not in p for p in puts)
    assert [len(p) for p in puts] == [2, 2, 1, 1, 1, 1]  # replica 0 on one node; replica 1 on two
    assert all("side" not in f for f in placed)
    assert placed[0]["x"] == placed[0]["y"] and placed[2]["x"] != placed[2]["y"]
