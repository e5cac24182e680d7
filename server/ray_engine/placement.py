"""Where a Ray job runs: its model's parameters placed in the object store once per content
(:class:`PlacedParams`; a training session's pinned for its life), its plan's stages
(:class:`~.submit.PlanEntry`) loaded on the pool's actors the scheduler (:mod:`.scheduler`) picks,
those actors counted busy while jobs run on them, and actors that died or stopped answering dropped
from the pool and from the stages they held.

:class:`Placement` is mixed into :class:`~.engine.RayEngine`, whose ``__init__`` makes the state
these methods share under ``self._lock``: ``_pool`` (the worker actors), ``_params`` and ``_latest``
(placed parameters by content key, and the keys of each model structure), ``_plans`` (plan entries),
``_hosts`` (which actors hold which stage), ``_busy`` (running jobs per actor), ``_max`` and
``max_retries``. :meth:`Placement.status` shows it (read-only) to the server's status and metrics.

Its public methods are the interface the engine's job path (:meth:`~.engine.RayEngine.gradients`)
and a training session (:class:`~.session.RaySession`) place through: :meth:`Placement.deploy` and
:meth:`Placement.release` around each run, :meth:`Placement.pin`, :meth:`Placement.unpin` and
:meth:`Placement.drop_store_copies` for a session's own parameters, :meth:`Placement.nodes` for the
cluster's nodes; the underscored ones are this module's and the engine's own.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import ray

from gradserve.server.planning.auto import Choice
from gradserve.server.planning.memory import NodeInfo
from gradserve.server.planning.partition import Plan
from gradserve.server.planning.schedule import Links
from gradserve.server.ray_engine import scheduler
from gradserve.server.ray_engine.pool import ACTOR_START_TIMEOUT, WorkerPool, cpu_nodes
from gradserve.server.ray_engine.scheduler import ActorInfo, NewActor
from gradserve.server.ray_engine.submit import Deployment, PlanEntry
from gradserve.server.ray_engine.worker_loss import is_worker_loss
from gradserve.worker.autodiff import compile_program
from gradserve.worker.graph import Model
from gradserve.worker.stage import StageSpec

log = logging.getLogger("gradserve.server.ray_engine.engine")  # one logger for the engine's lines

CONTROL_TIMEOUT = 30.0  # seconds for an actor to answer a control call (cancel, where, load)


class Placement:
    """The engine's placing of jobs on actors (see the module docs)."""

    # The state RayEngine.__init__ makes, shared under _lock (see the module docs).
    _lock: threading.Lock
    _pool: WorkerPool
    _params: "OrderedDict[str, PlacedParams]"
    _latest: dict[str, list[str]]
    _plans: "OrderedDict[tuple, PlanEntry]"
    _hosts: dict[str, dict[int, tuple[Any, ray.ObjectRef | None]]]  # ref of the load call, None once done
    _busy: Counter[int]
    _max: int
    max_retries: int

    def _acquire(self, model: Model, model_key: str | None, structure: str) -> tuple[str, "PlacedParams"]:
        """The model's parameters in the object store, placed once per content, marked in use.

        Hashing every parameter on every job costs more than some jobs (1.4 GB/s), so without a
        ``model_key`` the parameters are compared with the copies placed for the same structure
        (a read of the object store, several times faster) and placed anew when none matches: a
        training loop that updates weights in place gets fresh ones every step, and the stale copy
        is dropped as soon as no job uses it. ``structure``: the model's structure fingerprint, as
        :func:`~gradserve.server.planning.prepare.prepare` computed it.
        """
        with self._lock:
            if model_key is None:
                keys = self._latest.setdefault(structure, [])
                key = next((k for k in keys if self._params[k].matches(model.params)), None)
                if key is None:
                    key = f"{structure[:24]}-{uuid.uuid4().hex[:8]}"
                    for old in [k for k in keys if self._params[k].users == 0]:
                        self._forget(old)
                    self._latest.setdefault(structure, []).append(key)  # _forget may drop an empty list
            else:
                key = model_key
            placed = self._params.get(key)
            if placed is None:
                placed = self._params[key] = PlacedParams.put(model.params)
                log.info("model %s: %d parameters placed in the object store", key[:12], len(model.params))
                for old in [k for k, p in self._params.items() if p.users == 0 and k != key][
                    : max(0, len(self._params) - self._max)
                ]:
                    self._forget(old)
            self._params.move_to_end(key)
            placed.users += 1
            return key, placed

    def nodes(self) -> list[NodeInfo]:
        """The cluster's alive nodes with CPUs, as the pool last read them (every few seconds).
        Used by :class:`~.session.RaySession` to check that a partition fits the largest node."""
        with self._lock:  # the pool is not thread-safe
            return self._pool.nodes()

    def pin(self, key: str, params: Mapping[str, np.ndarray]) -> "PlacedParams":
        """Place a training session's ``params`` under ``key`` (no other model shares it), in use
        until :meth:`unpin`: neither they nor their stages are evicted meanwhile. Used by
        :class:`~.session.RaySession` when it places itself."""
        with self._lock:
            placed = self._params[key] = PlacedParams.put(params)
            placed.users += 1
            return placed

    def drop_store_copies(self, placed: "PlacedParams") -> None:
        """Let the object store's copies of ``placed`` go, once the stages loaded from them own
        theirs (placing them again puts them anew). Used by :class:`~.session.RaySession` once its
        stages became trainers."""
        with self._lock:
            placed.refs.clear()
            placed.views.clear()

    def unpin(self, key: str) -> None:
        """Let go of what :meth:`pin` placed: the parameters dropped, and their stages unloaded on
        every actor holding them. Used by :class:`~.session.RaySession` when it lets go of its
        placement (closed, or a lost worker)."""
        with self._lock:
            placed = self._params.get(key)
            if placed is not None:
                placed.users -= 1
            self._forget(key)

    def _forget(self, key: str) -> None:
        """Drop a model's placed parameters and its plans' stages (caller holds the lock)."""
        self._params.pop(key, None)
        for structure, keys in list(self._latest.items()):
            if key in keys:
                keys.remove(key)
            if not keys:
                del self._latest[structure]
        for plan_key in [p for p in self._plans if p[0] == key]:
            self._unload(self._plans.pop(plan_key))

    def _unload(self, entry: PlanEntry) -> None:
        """Free an evicted plan's stages on every actor holding one (caller holds the lock)."""
        for p in range(len(entry.specs)):
            for actor, _ in self._hosts.pop(entry.stage(p), {}).values():
                actor.unload.remote(entry.stage(p))

    def _plan_entry(self, model: Model, fingerprint: str, job, plan: Plan) -> PlanEntry:
        """The stages of a plan, made on first use (caller holds the lock)."""
        key = (
            fingerprint,
            job.input_grads,
            tuple(p.nodes[0].name for p in plan.partitions),
            tuple(m.total for m in plan.memory or ()),
        )
        entry = self._plans.get(key)
        if entry is not None:
            self._plans.move_to_end(key)
            return entry
        whole = compile_program(list(job.nodes), [*job.shapes], [job.loss], job.wrt)
        specs = [
            StageSpec(
                p.nodes,
                p.feeds,
                p.inputs,
                p.outputs,
                p.params,
                p.constants,
                [v for v in p.inputs if v in whole.requires_grad] + [f for f in p.feeds if f in job.input_grads],
            )
            for p in plan.partitions
        ]
        producer = {v: i for i, spec in enumerate(specs) for v in spec.outputs}
        links = Links.of({i: sorted({producer[v] for v in spec.inputs}) for i, spec in enumerate(specs)})
        read = frozenset(v for spec in specs for v in spec.inputs)
        entry = self._plans[key] = PlanEntry(uuid.uuid4().hex[:12], plan, specs, links, read)
        idle = [p for p in self._plans if p[0] not in self._params or self._params[p[0]].users == 0]
        for plan_key in idle[: max(0, len(self._plans) - self._max)]:
            self._unload(self._plans.pop(plan_key))
        return entry

    def deploy(
        self,
        model: Model,
        fingerprint: str,
        placed: "PlacedParams",
        job,
        choice: Choice,
        split_at,
        refresh: bool = False,
        extra: Sequence[int] = (),
    ) -> Deployment:
        """Place one job: the scheduler picks an actor per (replica, partition), and each one not
        yet holding its stage loads it (parameters come from the object store: Ray moves each to
        a node once). The chosen actors count as busy until :meth:`release`. ``extra``: bytes
        per partition beyond the plan's (a training session's weights and optimizer state).
        Used by :meth:`~.engine.RayEngine.gradients` for each run of a job, and by
        :class:`~.session.RaySession` once for its life (until a lost worker)."""
        with self._lock:
            entry = self._plan_entry(model, fingerprint, job, choice.plan)
            k, r = len(entry.specs), choice.r
            slots = [(i, p) for i in range(r) for p in range(k)]
            held: dict[int, set[str]] = {}
            for stage_key, hosts in self._hosts.items():
                for actor_id in hosts:
                    held.setdefault(actor_id, set()).add(stage_key)
            infos = [
                ActorInfo(id(a), w["node_id"], self._busy[id(a)], frozenset(held.get(id(a), ())), w.get("memory", 0))
                for a, w in zip(self._pool.actors, self._pool.where)
            ]
            needs = [
                (entry.plan.memory[p].total if entry.plan.memory else 0) + (extra[p] if extra else 0) for _, p in slots
            ]
            picks = scheduler.choose([entry.stage(p) for _, p in slots], self._pool.nodes(refresh), infos, needs)
            others: Counter[str] = Counter()
            for info in infos:
                others[info.node_id] += info.load
            # New actors start under the lock (rare: only while the pool grows to the cluster).
            starting = [pick for pick in picks if isinstance(pick, NewActor)]
            retire = {actor_id for pick in starting for actor_id in pick.retire}
            if retire:  # idle actors whose reservations are too small: their memory goes to new ones
                self._forget_actors(
                    [a for a in self._pool.actors if id(a) in retire],
                    why="retired, their reservations too small for a new stage,",
                )
            new = iter(self._pool.spawn([pick.node_id for pick in starting], [pick.memory for pick in starting]))
            by_id: dict[Hashable, Any] = {id(a): a for a in self._pool.actors}
            chosen = [by_id[pick.actor_id] if isinstance(pick, ActorInfo) else next(new) for pick in picks]
            loads = []  # (stage key, actor id, ref) of the loads not yet known to be done
            for actor, (_, p) in zip(chosen, slots):
                stage_key, spec = entry.stage(p), entry.specs[p]
                hosts = self._hosts.setdefault(stage_key, {})
                if id(actor) not in hosts:
                    ref = actor.load.remote(
                        stage_key,
                        spec,
                        {c: model.constants[c] for c in spec.constants},
                        spec.params,
                        *[placed.refs[name] for name in spec.params],
                    )
                    hosts[id(actor)] = (actor, ref)
                loading = hosts[id(actor)][1]
                if loading is not None:
                    loads.append((stage_key, id(actor), loading))
                self._busy[id(actor)] += 1
            where = [[self._pool.where_of(chosen[i * k + p]) for p in range(k)] for i in range(r)]
        dep = Deployment(
            [entry.stage(p) for p in range(k)],
            entry.plan,
            entry.specs,
            entry,
            [chosen[i * k : (i + 1) * k] for i in range(r)],
            where,
            dict(others),
        )
        refs = [ref for _, _, ref in loads]
        try:
            if refs:
                ray.get(refs, timeout=ACTOR_START_TIMEOUT)  # outside the lock: other jobs go on placing
        except BaseException:
            with self._lock:  # a failed load must not be waited on by later jobs: load again
                failed = set(refs)
                for hosts in self._hosts.values():
                    for actor_id in [a for a, (_, ref) in hosts.items() if ref is not None and ref in failed]:
                        del hosts[actor_id]
            self.release(dep)
            self._drop_dead(chosen)
            raise
        if loads:
            with self._lock:  # known loaded: later jobs do not wait on these calls again (~50 us a job)
                for stage_key, actor_id, ref in loads:
                    host = self._hosts.get(stage_key, {}).get(actor_id)
                    if host is not None and host[1] == ref:
                        self._hosts[stage_key][actor_id] = (host[0], None)
        log.debug(
            "model %s: %d partitions x %d replicas on nodes %s",
            fingerprint[:12],
            k,
            r,
            sorted({w["node_id"][:8] for row in where for w in row}),
        )
        return dep

    def release(self, dep: Deployment) -> None:
        """The actors of ``dep`` (from :meth:`deploy`) are no longer busy with it. Used by
        :meth:`~.engine.RayEngine.gradients` after each run, and by :class:`~.session.RaySession`
        when it lets go of its placement."""
        with self._lock:
            for row in dep.actors:
                for actor in row:
                    self._busy[id(actor)] -= 1
                    if self._busy[id(actor)] <= 0:
                        del self._busy[id(actor)]

    def _drop_dead(self, actors: list) -> None:
        """Drop those of ``actors`` that no longer answer (asked all at once)."""
        unique = list({id(a): a for a in actors}.values())
        pings = [actor.job_count.remote() for actor in unique]
        dead = [a for a, ref in zip(unique, pings) if not answers(ref, CONTROL_TIMEOUT)]
        if dead:
            self._drop_actors(dead)

    def _drop_actors(self, dead: list) -> None:
        """Remove dead or stuck actors from the pool and from the stages' hosts; the next jobs
        get actors the scheduler picks, started where the pool has fewest."""
        with self._lock:
            self._forget_actors(dead)

    def _forget_actors(self, actors: list, why: str = "lost") -> None:
        """Kill ``actors`` and forget them everywhere (caller holds the lock)."""
        gone = self._pool.drop(actors, why)
        for hosts in self._hosts.values():
            for actor_id in gone & hosts.keys():
                del hosts[actor_id]
        for actor_id in gone:
            self._busy.pop(actor_id, None)

    # -- status (read-only) ------------------------------------------------------------------------
    def status(self) -> dict:
        """What the server's status screen and metrics show of the cluster (read-only)::

            {"nodes": [{"node_id", "address", "cpus", "memory_bytes", "actors", "busy_actors", "alive"}],
             "actors": int, "max_retries": int}

        ``nodes``: the cluster's alive nodes with CPUs (Ray's ``memory`` resource as their memory),
        each with the pool's worker actors on it and how many of those run a job's steps now; a
        node the pool still has actors on but that is no longer alive comes last with
        ``alive=False``. Asks the GCS for the nodes on every call. Never waits long for a job being
        placed: when the engine's lock stays taken for a second (actors starting), the actors are
        counted from a copy of the pool's list without it and ``busy_actors`` is 0.
        """
        alive = cpu_nodes()
        locked = self._lock.acquire(timeout=1.0)
        try:
            where = list(self._pool.where)  # a copy: the pool replaces or appends to its lists
            busy = {id(a): self._busy[id(a)] for a in list(self._pool.actors)} if locked else {}
            actors = list(self._pool.actors) if locked else []
        finally:
            if locked:
                self._lock.release()
        per_node: Counter[str] = Counter(w["node_id"] for w in where)
        busy_per_node: Counter[str] = Counter()
        for actor, w in zip(actors, where):
            busy_per_node[w["node_id"]] += busy.get(id(actor), 0) > 0
        nodes = [
            {
                "node_id": n["NodeID"],
                "address": n.get("NodeManagerAddress", ""),
                "cpus": float(n["Resources"]["CPU"]),
                "memory_bytes": int(n["Resources"].get("memory", 0)),
                "actors": per_node.get(n["NodeID"], 0),
                "busy_actors": busy_per_node.get(n["NodeID"], 0),
                "alive": True,
            }
            for n in alive
        ]
        known = {n["NodeID"] for n in alive}
        for node_id in sorted(set(per_node) - known):
            w = next(w for w in where if w["node_id"] == node_id)
            nodes.append(
                {
                    "node_id": node_id,
                    "address": w.get("ip", ""),
                    "cpus": float(w.get("cpus", 0)),
                    "memory_bytes": 0,
                    "actors": per_node[node_id],
                    "busy_actors": busy_per_node.get(node_id, 0),
                    "alive": False,
                }
            )
        return {"nodes": nodes, "actors": len(where), "max_retries": self.max_retries}


@dataclass
class PlacedParams:
    """A model's parameters in the object store, with zero-copy views of them for comparison."""

    refs: dict[str, ray.ObjectRef]
    views: dict[str, np.ndarray]
    users: int = 0  # jobs running on these parameters (guarded by the engine's lock)

    @classmethod
    def put(cls, params: Mapping[str, np.ndarray]) -> "PlacedParams":
        refs = {name: ray.put(value) for name, value in params.items()}
        return cls(refs, dict(zip(refs, ray.get(list(refs.values())))))

    def matches(self, params: Mapping[str, np.ndarray]) -> bool:
        return params.keys() == self.views.keys() and all(
            np.array_equal(params[name], view) for name, view in self.views.items()
        )


def answers(ref: ray.ObjectRef, timeout: float) -> bool:
    """Whether an actor answered its control call ``ref`` within ``timeout`` seconds. Any failure
    makes it one not to use again: dead (:func:`is_worker_loss`), stuck, or broken (logged)."""
    try:
        ray.get(ref, timeout=timeout)
    except Exception as exc:  # noqa: BLE001 -- a control call that fails, whyever, condemns its actor
        if not (is_worker_loss(exc) or isinstance(exc, ray.exceptions.GetTimeoutError)):
            log.warning("an actor failed a control call (%s: %s); dropping it", type(exc).__name__, exc)
        return False
    return True
