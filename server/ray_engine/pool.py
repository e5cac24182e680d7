"""The pool of partition actors (:class:`~gradserve.worker.actor.StageActor`) and where on the
cluster they run. Deployments of every model share the pool; an actor hosts one stage per model."""

from __future__ import annotations

import logging
import os
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from gradserve.worker.actor import StageActor

log = logging.getLogger(__name__)

ACTOR_START_TIMEOUT = 300.0  # seconds for new actors to start and load their stage (a cluster may scale up)


class WorkerPool:
    """Stage actors created on demand, spread over the cluster's nodes; ``where[i]`` says where
    ``actors[i]`` runs (node id, ip, cpus). Not thread-safe: the engine calls it under its lock."""

    def __init__(self) -> None:
        self.actors: list[Any] = []
        self.where: list[dict] = []

    def grow(self, n: int) -> list[Any]:
        """The first ``n`` pool actors, started as needed (the engine holds its lock).

        Placement is round-robin over the cluster's alive nodes that have CPUs: pool actor i goes
        to node i mod (number of nodes), pinned softly (NodeAffinitySchedulingStrategy with
        soft=True: if that node is full or gone Ray places it elsewhere). A deployment uses pool
        actors 0..K*R-1, so consecutive partitions land on different nodes whenever the cluster
        has several; Ray's "SPREAD" alone is best-effort and was seen to pack a fresh cluster's
        actors onto one node.
        """
        nodes = sorted(
            (node for node in ray.nodes() if node.get("Alive") and node.get("Resources", {}).get("CPU", 0) > 0),
            key=lambda node: node["NodeID"],
        )
        new = []
        for i in range(len(self.actors), n):
            node = nodes[i % len(nodes)] if nodes else None
            # BLAS threads: what was asked for, else the CPUs Ray gives that node (a pod's limit on
            # Kubernetes, not the host's core count).
            threads = int(node["Resources"]["CPU"]) if node else os.cpu_count() or 1
            env = {"env_vars": {
                **{v: str(threads) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")},
                # Idle OpenBLAS threads otherwise spin for ~2^28 cycles after every product and
                # steal the cores from the next stage on the node (measured: 4 products taking
                # 55 ms instead of 14 ms when two stages alternate). 2^4 cycles: sleep at once.
                "OPENBLAS_THREAD_TIMEOUT": "4",
            }}
            strategy = NodeAffinitySchedulingStrategy(node["NodeID"], soft=True) if node else "SPREAD"
            new.append(StageActor.options(scheduling_strategy=strategy, runtime_env=env).remote())
        if new:
            address = {node["NodeID"]: node.get("NodeManagerAddress", "") for node in nodes}
            cpus = {node["NodeID"]: int(node["Resources"]["CPU"]) for node in nodes}
            for where in ray.get([a.where.remote() for a in new], timeout=ACTOR_START_TIMEOUT):
                where["ip"] = address.get(where["node_id"], where["ip"])  # the address Ray knows the node by
                where["cpus"] = cpus.get(where["node_id"], os.cpu_count() or 1)
                self.where.append(where)
            self.actors += new
            log.info("worker pool: %d actors on %d nodes", len(self.actors), len({w["node_id"] for w in self.where}))
        return self.actors[:n]

    def drop(self, dead: list) -> set[int]:
        """Kill ``dead`` actors and forget them; returns their ids."""
        gone = {id(a) for a in dead}
        for actor in dead:
            ray.kill(actor, no_restart=True)
        keep = [i for i, a in enumerate(self.actors) if id(a) not in gone]
        self.actors = [self.actors[i] for i in keep]
        self.where = [self.where[i] for i in keep]
        return gone

    def close(self) -> None:
        """Kill every actor."""
        for actor in self.actors:
            ray.kill(actor)
        self.actors.clear()
        self.where.clear()
