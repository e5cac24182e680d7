"""The pool of partition actors (:class:`~gradserve.worker.actor.StageActor`) and where on the
cluster they run. Deployments of every model share the pool; an actor hosts stages of several
models. Which actors a job uses is the scheduler's decision (:mod:`.scheduler`); the pool starts
actors on the nodes it names and keeps a fresh view of the cluster's nodes."""

from __future__ import annotations

import logging
import os
import time
import uuid
from typing import Any, Sequence

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from gradserve.server.planning.memory import NodeInfo, fmt_bytes
from gradserve.server.ray_engine.worker_loss import start_failure
from gradserve.worker.actor import StageActor

log = logging.getLogger(__name__)

ACTOR_START_TIMEOUT = 300.0  # seconds for new actors to start and load their stage (a cluster may scale up)
NODES_TTL = 2.0  # seconds a view of the cluster's nodes is reused (ray.nodes() asks the GCS)


def cpu_nodes() -> list[dict]:
    """The cluster's alive nodes that have CPUs (``ray.nodes()`` entries), sorted by id."""
    return sorted(
        (n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0),
        key=lambda n: n["NodeID"],
    )


class WorkerPool:
    """Stage actors started on the nodes the scheduler picks; ``where[i]`` says where
    ``actors[i]`` runs (node id, ip, cpus, pid, the memory it reserved) and what it is called: a
    unique ``name``, by which actors find each other for relays, and ``seq``, its place in the
    order of starting, which relays follow (:class:`~gradserve.worker.protocol.Relay`);
    ``started`` counts the actors ever started. Not thread-safe: the engine calls it under its lock."""

    def __init__(self) -> None:
        self.actors: list[Any] = []
        self.where: list[dict] = []
        self.started = 0
        self._nodes: list[dict] = []
        self._nodes_at = -NODES_TTL

    def nodes(self, refresh: bool = False) -> list[NodeInfo]:
        """The cluster's alive nodes that have CPUs, sorted by id (re-read every few seconds, or
        now with ``refresh``: after a lost worker, so a node that left is no longer chosen)."""
        if refresh or time.monotonic() - self._nodes_at > NODES_TTL:
            self._nodes = cpu_nodes()
            self._nodes_at = time.monotonic()
        return [
            NodeInfo(n["NodeID"], int(n["Resources"]["CPU"]), int(n["Resources"].get("memory", 0))) for n in self._nodes
        ]

    def spawn(self, node_ids: Sequence[str], memory: Sequence[int] | None = None) -> list[Any]:
        """Start one actor on each of ``node_ids`` ("" lets Ray choose), each reserving its entry of
        ``memory`` (bytes) from Ray's ``memory`` resource, and wait until they run (if one's
        constructor raises: :class:`~gradserve.server.errors.WorkersCannotStart`, and none is kept).

        Pinned softly (NodeAffinitySchedulingStrategy with soft=True): if the node is full or gone,
        Ray places the actor elsewhere, and ``where`` records the node it really runs on.
        """
        if not node_ids:
            return []
        memory = list(memory) if memory is not None else [0] * len(node_ids)
        known = {n["NodeID"]: n for n in self._nodes}
        new, names = [], []
        for node_id, reserve in zip(node_ids, memory):
            node = known.get(node_id)
            # BLAS threads: the CPUs Ray gives that node (a pod's limit on Kubernetes, not the
            # host's core count); the engine narrows them per step.
            threads = int(node["Resources"]["CPU"]) if node else os.cpu_count() or 1
            env = {
                "env_vars": {
                    **{v: str(threads) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")},
                    # Idle OpenBLAS threads otherwise spin for ~2^28 cycles after every product and
                    # steal the cores from the next stage on the node (measured: 4 products taking
                    # 55 ms instead of 14 ms when two stages alternate). 2^4 cycles: sleep at once.
                    "OPENBLAS_THREAD_TIMEOUT": "4",
                }
            }
            strategy = NodeAffinitySchedulingStrategy(node_id, soft=True) if node else "DEFAULT"
            options = {"memory": int(reserve)} if reserve else {}
            names.append(f"gradserve-stage-{uuid.uuid4().hex}")
            new.append(
                StageActor.options(name=names[-1], scheduling_strategy=strategy, runtime_env=env, **options).remote()
            )
        address = {n["NodeID"]: n.get("NodeManagerAddress", "") for n in self._nodes}
        cpus = {n["NodeID"]: int(n["Resources"]["CPU"]) for n in self._nodes}
        for i, (where, reserve, name) in enumerate(zip(self._started(new), memory, names)):
            where["ip"] = address.get(where["node_id"], where["ip"])  # the address Ray knows the node by
            where["name"], where["seq"] = name, self.started + i
            where["cpus"] = cpus.get(where["node_id"], os.cpu_count() or 1)
            where["memory"] = int(reserve)
            self.where.append(where)
        self.actors += new
        self.started += len(new)
        log.info(
            "worker pool: started %d (reserving %s); %d actors on %d nodes",
            len(new),
            ", ".join(fmt_bytes(m) for m in memory),
            len(self.actors),
            len({w["node_id"] for w in self.where}),
        )
        return new

    def _started(self, new: list[Any]) -> list[dict]:
        """Where each of ``new`` runs, once all have started. If one fails to, none joins the pool:
        all are killed (those that did start would live on outside it), and a constructor that
        raised fails the job at once as WorkersCannotStart (:func:`.worker_loss.start_failure`)."""
        try:
            return ray.get([a.where.remote() for a in new], timeout=ACTOR_START_TIMEOUT)
        except Exception as exc:
            for actor in new:
                ray.kill(actor, no_restart=True)
            failure = start_failure(exc)
            if failure is None:
                raise
            log.warning("worker pool: %s; none of the %d new actors kept", failure, len(new))
            raise failure from exc

    def where_of(self, actor: Any) -> dict:
        """Where a pool actor runs."""
        return self.where[self.index(actor)]

    def index(self, actor: Any) -> int:
        """The position of ``actor`` in ``actors``."""
        return next(i for i, a in enumerate(self.actors) if a is actor)

    def drop(self, dead: list, why: str = "lost") -> set[int]:
        """Kill ``dead`` actors and forget them (``why``, for the log); returns their ids."""
        gone = {id(a) for a in dead}
        for actor in dead:
            ray.kill(actor, no_restart=True)
        keep = [i for i, a in enumerate(self.actors) if id(a) not in gone]
        lost = {self.where[i]["node_id"][:8] for i, a in enumerate(self.actors) if id(a) in gone}
        self.actors = [self.actors[i] for i in keep]
        self.where = [self.where[i] for i in keep]
        if gone:
            log.info(
                "worker pool: %s %d actors (nodes %s); %d actors on %d nodes",
                why,
                len(gone),
                sorted(lost),
                len(self.actors),
                len({w["node_id"] for w in self.where}),
            )
        return gone

    def close(self) -> None:
        """Kill every actor."""
        for actor in self.actors:
            ray.kill(actor)
        self.actors.clear()
        self.where.clear()
