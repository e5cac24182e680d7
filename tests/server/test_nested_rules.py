"""When a job's calls nest (server/ray_engine/nested.py), as a pure decision on a deployment
(no Ray): only one micro-batch of one replica, a chain, small enough to travel inside the calls,
and actors in the pool's order, so that no two nested calls can wait for each other."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from gradserve.server.planning.schedule import Links
from gradserve.server.ray_engine.nested import nestable
from gradserve.server.ray_engine.submit import INLINE_BYTES, FeedGroup, Training

FEEDS = {"x": np.ones((4, 3))}


def deployment(k: int = 2, seqs=None, links=None, grads: int = 64, boundary: int = 32, loss_in: int | None = None):
    """What ``nestable`` reads of a deployment: its stages' outputs, links, sizes and actors."""
    loss_in = k - 1 if loss_in is None else loss_in
    specs = [SimpleNamespace(outputs=["loss"] if p == loss_in else [f"h{p}"]) for p in range(k)]
    plan = SimpleNamespace(
        memory=[SimpleNamespace(grads=grads) for _ in range(k)],
        boundaries={f"h{p}": SimpleNamespace(nbytes=boundary) for p in range(k - 1)},
    )
    seqs = range(k) if seqs is None else seqs
    return SimpleNamespace(
        specs=specs, plan=plan, entry=SimpleNamespace(links=links or Links.chain(k)), where=[[{"seq": s} for s in seqs]]
    )


def test_a_tiny_chain_in_the_pools_order_nests():
    assert nestable(deployment(2), "loss", FEEDS, 1, 1, None, False)
    assert nestable(deployment(3, seqs=[4, 7, 9]), "loss", FEEDS, 1, 1, None, False)


def test_actors_out_of_the_pools_order_never_nest():
    """A call waits only for a later actor: two jobs whose chains ran in opposite orders over the
    same two actors would each hold one and wait for the other."""
    assert not nestable(deployment(2, seqs=[1, 0]), "loss", FEEDS, 1, 1, None, False)
    assert not nestable(deployment(3, seqs=[0, 2, 1]), "loss", FEEDS, 1, 1, None, False)
    assert not nestable(deployment(2, seqs=[3, 3]), "loss", FEEDS, 1, 1, None, False)


def training(exchange: bool) -> Training:
    return Training(step=3, lr=None, grads=False, exchange=exchange, sharing=((0,), (1,)))


def test_pipelines_replicas_some_sessions_and_single_stages_keep_the_drivers_calls():
    dep = deployment(2)
    assert not nestable(dep, "loss", FEEDS, 2, 1, None, False)  # micro-batches
    assert not nestable(dep, "loss", FEEDS, 1, 2, None, False)  # replicas
    # A training session's step: when each stage updates its own weights, not when they exchange
    # dL/dw (replicas, a parameter in several partitions) or clip by the global norm first.
    assert nestable(dep, "loss", FEEDS, 1, 1, training(exchange=False), False)
    assert not nestable(dep, "loss", FEEDS, 1, 1, training(exchange=True), False)
    assert not nestable(dep, "loss", FEEDS, 1, 1, training(exchange=False), True)
    assert not nestable(deployment(1), "loss", FEEDS, 1, 1, None, False)


def test_only_chains_with_the_loss_last_nest():
    skip = Links.of({0: [], 1: [0], 2: [0, 1]})  # the last stage reads the first's output too
    assert not nestable(deployment(3, links=skip), "loss", FEEDS, 1, 1, None, False)
    assert not nestable(deployment(2, loss_in=0), "loss", FEEDS, 1, 1, None, False)


def test_only_what_travels_inside_the_calls_nests():
    assert not nestable(deployment(2), "loss", {"x": FeedGroup(object())}, 1, 1, None, False)  # a feed in the store
    assert nestable(deployment(2, grads=INLINE_BYTES // 2 - 64), "loss", FEEDS, 1, 1, None, False)
    assert not nestable(deployment(2, grads=INLINE_BYTES // 2), "loss", FEEDS, 1, 1, None, False)  # dL/dw relayed up
    assert not nestable(deployment(2, boundary=INLINE_BYTES // 2), "loss", FEEDS, 1, 1, None, False)  # value and error
