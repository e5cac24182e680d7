"""The Ray engine: a model's partitions on Ray worker actors, errors flowing back between them.

Per job the driver (this object) plans, then submits every step of a 1F1B schedule at once as actor
calls (consecutive steps of a partition grouped into one call where that delays nobody, see
:mod:`gradserve.server.planning.schedule`) whose arguments are ObjectRefs: activations flow forward
worker to worker, errors flow back, and Ray starts each call as soon as its inputs exist. The driver
holds references and metadata only; it waits on calls with ``fetch_local=False`` to report progress
and fetches nothing but the loss and the final dL/dw (replicas sum theirs on the workers first);
building and sending one job's calls is :mod:`.submit`'s; :mod:`.failed_runs` stops a run that failed
and decides whether it runs again. Parameters are placed in the object
store once per model (content hash) and plans are cached per (model, K, split); which actors a job runs on is decided per job by the
scheduler (:mod:`.scheduler`): the least-loaded nodes, one job's partitions on distinct nodes, actors
that already hold a stage first (they are not sent the weights again). A stage is loaded on more
actors as concurrent jobs need them, so a job with new feeds on an idle cluster only sends the feeds.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import threading
import time
import uuid
from collections import Counter, OrderedDict
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import numpy as np
import ray

from gradserve.server.events import JobCancelled, Progress
from gradserve.server.planning import auto
from gradserve.server.planning.auto import AUTO, Choice, Count, parse_count
from gradserve.server.planning.batching import Chunk, split_batch
from gradserve.server.planning.partition import Plan
from gradserve.server.planning.prepare import PreparedJob, prepare
from gradserve.server.planning.timing import Costs
from gradserve.server.ray_engine import costs as costs_module
from gradserve.server.ray_engine.connect import connect
from gradserve.server.ray_engine.failed_runs import abort, next_retry, unwrap
from gradserve.server.ray_engine.nested import nestable, submit_nested
from gradserve.server.ray_engine.placement import Placement, PlacedParams
from gradserve.server.ray_engine.pool import NODES_TTL, WorkerPool, cpu_nodes
from gradserve.server.ray_engine.submit import (
    Deployment,
    PlanEntry,
    RunOutcome,
    Submitted,
    Training,
    blas_threads,
    place_feeds,
    submit_replica,
    submit_updates,
)
from gradserve.server.ray_engine.worker_loss import is_worker_loss
from gradserve.server.result import Result
from gradserve.worker import kernels
from gradserve.worker.graph import GraphError, Model, feed_signature
from gradserve.worker.optim import clip_scale

if TYPE_CHECKING:  # pragma: no cover
    from gradserve.server.ray_engine.session import RaySession

log = logging.getLogger(__name__)


def _counted(method):
    """Count the engine's calls of ``method`` in progress (``self._inflight``): the jobs that
    ``auto`` sees running beside a new one."""

    @functools.wraps(method)  # keeps the signature, which the server's runner inspects
    def counted(self, *args, **kwargs):
        with self._lock:
            self._inflight += 1
        try:
            return method(self, *args, **kwargs)
        finally:
            with self._lock:
                self._inflight -= 1

    return counted


class RayEngine(Placement):
    """Partitions each model over Ray worker actors (see the module docs).

    ``partitions``/``micro_batches``/``replicas`` are defaults that each job may override: a
    number means exactly that many, ``"auto"`` (the default) lets the engine choose from the
    model's cost and memory, the batch and the cluster's free nodes (see
    :mod:`gradserve.server.planning.auto`).
    ``ray_address``: join that cluster; None starts an embedded single-node Ray unless this process
    already is connected or ``RAY_ADDRESS`` names a cluster (:func:`.connect.connect`, which raises
    :class:`.connect.RayConnectError` when the cluster refuses our token). ``threads_per_worker``:
    BLAS threads per step (default: chosen per job, see :func:`blas_threads`). ``max_retries``:
    how often a job that lost a worker (:func:`.worker_loss.is_worker_loss`) is run again on fresh
    workers; then it fails with :class:`~gradserve.server.errors.WorkerLost` (UNAVAILABLE).
    """

    name = "ray"
    splits = True  # takes partitions, micro_batches, replicas, model_key and job_id per job (engines.Engine)

    def __init__(
        self,
        partitions: Count = AUTO,
        micro_batches: Count = AUTO,
        replicas: Count = AUTO,
        ray_address: str | None = None,
        threads_per_worker: int | None = None,
        max_deployments: int = 8,
        max_retries: int = 3,  # a second loss during the retry is plausible: a node going away
    ):
        self.partitions, self.micro_batches, self.replicas = partitions, micro_batches, replicas
        self._owns_ray = False
        if not ray.is_initialized():
            connect(ray_address)  # a cluster that refuses our token: RayConnectError, before any work
            self._owns_ray = True
        self.threads = threads_per_worker
        self.max_retries = max_retries
        # Compile the kernels here first (once per machine), so the actors this machine starts load
        # them from the cache instead of each compiling them at once.
        kernels.warm_up()
        self._params: "OrderedDict[str, PlacedParams]" = OrderedDict()  # content key -> placed parameters
        self._latest: dict[str, list[str]] = {}  # structure fingerprint -> content keys placed for it
        self._plans: "OrderedDict[tuple, PlanEntry]" = OrderedDict()
        self._choices: "OrderedDict[tuple, Choice]" = OrderedDict()  # see choose
        self._inflight = 0  # gradients() calls in progress: the load auto sees (guarded by _lock)
        self._costs: tuple[Costs, float] = (Costs(), -math.inf)  # measured costs, when (see _cluster_costs)
        # stage key -> {id(actor): (actor, ref of its load call, None once a job saw it done)}: which
        # actors hold which stage (a load in flight counts: a second job waits on the same call
        # instead of loading again)
        self._hosts: dict[str, dict[int, tuple[Any, ray.ObjectRef | None]]] = {}
        self._busy: Counter[int] = Counter()  # id(actor) -> slots of running jobs on it
        self._max = max_deployments
        self._capacity = (1, -NODES_TTL)  # (capacity(), when it was read)
        self._pool = WorkerPool()
        self._lock = threading.Lock()  # guards the caches, the pool and the load counts
        # A job's steps are submitted under this lock, so the submissions of all jobs form one
        # global order in which every step comes after the steps it depends on; since each actor
        # runs its steps in submission order, concurrent jobs on shared actors cannot deadlock.
        self._submit = threading.Lock()

    # -- public ------------------------------------------------------------------------------------
    @_counted
    def gradients(
        self,
        model: Model,
        feeds: Mapping[str, np.ndarray],
        *,
        input_grads: Iterable[str] = (),
        partitions: Count | None = None,
        micro_batches: Count | None = None,
        replicas: Count | None = None,
        progress: Progress = None,
        cancelled: threading.Event | None = None,
        split_at: list[str] | None = None,
        model_key: str | None = None,
        job_id: str | None = None,
        prepared: PreparedJob | None = None,
    ) -> Result:
        """Loss and dL/dw, computed by the partitioned pipeline; equal to the inline engine's.

        ``model_key``: a content hash of the model the caller has already verified (the server's
        model id); without it the engine checks the parameters against the copy it placed.
        ``job_id``: the caller's name for the job (the server's job id), so that the engine's log
        lines match its outcome line; runs after a lost worker are ``ID.1``, ``ID.2``...
        ``prepared``: the job as the caller already prepared it for these ``model``, ``feeds`` and
        ``input_grads`` (the server does, to refuse bad input before queueing).
        """
        t0 = time.perf_counter()
        full = prepared or prepare(model, feeds, input_grads)
        choice = self.choose(model, full, feeds, (partitions, micro_batches, replicas), split_at)
        m, r, split = choice.m, choice.r, choice.split
        # The chunks run with split.model: a fixed-batch export gets a symbolic batch axis there.
        chunks, job = split.chunks, split.job  # job: shapes of one micro-batch, for planning
        key, placed = self._acquire(model, model_key, full.structure)
        retries = 0
        name = job_id or uuid.uuid4().hex[:12]
        try:  # while the job holds its parameters, neither they nor their plans are evicted
            while True:
                # A run's id is new after a lost worker: actors ignore the late steps of an aborted run.
                job_id = name if retries == 0 else f"{name}.{retries}"
                try:
                    # After a lost worker the nodes are read again: one that left is not chosen.
                    deployment = self.deploy(split.model, key, placed, job, choice, split_at, refresh=retries > 0)
                    t1 = time.perf_counter()
                    try:
                        outcome = self.run(job_id, deployment, job, chunks, m, r, progress, cancelled)
                    finally:
                        self.release(deployment)
                    break
                except Exception as exc:  # noqa: BLE001 -- only a lost worker is retried, the rest re-raised
                    if not is_worker_loss(exc):
                        raise
                    # A worker died (its process or node, out of memory...). Its actors have left
                    # the pool (failed_runs.abort, deploy); steps are pure functions of their inputs, so the
                    # job runs again from the start on workers the scheduler picks afresh.
                    retries = next_retry(exc, job_id, retries, self.max_retries, cancelled)
        finally:
            with self._lock:
                placed.users -= 1
        params = {p: _or_zeros(outcome.grads.get(p), model.params[p]) for p in job.params}
        inputs = {}
        for x in job.input_grads:
            parts = [_or_zeros(outcome.input_grads.get((c, x)), ch.feeds[x]) for c, ch in enumerate(chunks)]
            inputs[x] = np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
        info = {
            "engine": self.name,
            "partitions": len(deployment.plan.partitions),
            "micro_batches": m,
            "replicas": r,
            "placement": deployment.where,
            "auto": choice.reasons,
            "retries": retries,
            "nested": outcome.nested,
            "seconds": {"prepare_and_deploy": t1 - t0, **outcome.seconds},
            "unreached": [p for p in job.params if p not in outcome.grads],
        }
        return Result(outcome.loss, params, inputs, info)

    def session(
        self,
        model: Model,
        optimizer,
        *,
        partitions: Count | None = None,
        micro_batches: Count | None = None,
        replicas: Count | None = None,
        **options,
    ) -> "RaySession":
        """A training session: each partition's weights and optimizer state stay on its worker
        between steps (:class:`~gradserve.server.ray_engine.session.RaySession`; ``optimizer`` and
        ``options`` as :class:`gradserve.server.session.Session` takes them). The counts are chosen
        (``auto``) at the first step, from its batch, and kept for the session's life."""
        from gradserve.server.ray_engine.session import RaySession  # it builds on this module

        return RaySession(self, model, optimizer, (partitions, micro_batches, replicas), **options)

    def plan(self, model: Model, feeds: Mapping[str, np.ndarray], partitions: Count | None = None) -> Plan:
        """The partition plan this engine would use for ``model`` on ``feeds`` (nothing is run)."""
        return self.choose(model, prepare(model, feeds), feeds, (partitions, None, None), None).plan

    def choose(self, model: Model, full, feeds: Mapping[str, np.ndarray], asked: tuple, split_at) -> Choice:
        """K, M and R for a job (numbers as asked, ``auto`` chosen from the job and the cluster's
        memory and free nodes, :func:`~gradserve.server.planning.auto.choose`); raises
        ResourceExhausted before anything runs when the job cannot fit. Cached per model
        structure, batch shape, request and cluster state: planning runs once, not per job.
        Used by :meth:`gradients` and :meth:`plan`, and by a training session's first step
        (:class:`~.session.RaySession`)."""
        defaults = (self.partitions, self.micro_batches, self.replicas)
        try:
            k, m, r = (parse_count(a if a is not None else d) for a, d in zip(asked, defaults))
        except ValueError as exc:
            raise GraphError(f"partitions, micro_batches and replicas: {exc}") from None
        if split_at:  # manual cuts fix the partitions; nothing is chosen (nor cached)
            return auto.choose(full, model, feeds, [], k, m, r, split_at=split_at)
        with self._lock:
            nodes = self._pool.nodes()
            busy = {w["node_id"] for a, w in zip(self._pool.actors, self._pool.where) if self._busy[id(a)]}
            others = max(0, self._inflight - 1)  # jobs running or being placed besides this one (plan(): none)
        free = [n for n in nodes if n.node_id not in busy]
        costs = self._cluster_costs(idle=others == 0)
        key = (
            full.structure,
            feed_signature(feeds),
            full.input_grads,
            k,
            m,
            r,
            tuple(nodes),
            len(free),
            others > 0,
            costs,
        )
        with self._lock:
            hit = self._choices.get(key)
        if hit is not None:  # the same choice and plan; the batch is this job's own
            return dataclasses.replace(hit, split=split_batch(model, full, feeds, hit.m * hit.r))
        choice = auto.choose(full, model, feeds, nodes, k, m, r, free=free, others=others, costs=costs)
        with self._lock:
            self._choices[key] = choice
            while len(self._choices) > 4 * self._max:
                self._choices.popitem(last=False)
        return choice

    def _cluster_costs(self, idle: bool) -> Costs:
        """What a call, a byte and a FLOP cost on this cluster (:mod:`.costs`), measured on an idle
        pool actor when there is one and the engine runs no other job (a busy actor's queue would
        be timed instead of Ray), every ``costs.REFRESH_SECONDS``; the defaults until then."""
        value, at = self._costs
        if not idle or time.monotonic() - at < costs_module.REFRESH_SECONDS:
            return value
        with self._lock:
            actor = next((a for a in self._pool.actors if not self._busy[id(a)]), None)
        if actor is None:
            return value
        try:
            value = costs_module.measure(actor)
        except ray.exceptions.RayError as exc:  # the actor died meanwhile: measure another time
            log.info("could not measure the cluster's costs: %s", exc)
            return value
        self._costs = (value, time.monotonic())
        return value

    def capacity(self) -> int:
        """How many jobs this engine usefully computes at once: two per CPU of the cluster's alive
        nodes, since a job keeps its workers busy only about half of its time (the rest is the
        driver's checking, copying feeds and fetching dL/dw, and transfers): one job computes while
        the next one's data moves. Follows nodes joining and leaving (re-read every few seconds)."""
        # Not under the engine's lock, which placing a job may hold while actors start.
        value, at = self._capacity
        if time.monotonic() - at > NODES_TTL:
            value = 2 * max(1, sum(int(n["Resources"]["CPU"]) for n in cpu_nodes()))
            self._capacity = (value, time.monotonic())
        return value

    def close(self) -> None:
        """Kill every actor, drop cached parameters; shut Ray down if this engine started it."""
        with self._lock:
            self._pool.close()
            self._plans.clear()
            self._hosts.clear()
            self._busy.clear()
            self._params.clear()
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
            self._owns_ray = False

    def __enter__(self) -> "RayEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- one job -----------------------------------------------------------------------------------
    def run(
        self,
        job_id: str,
        dep: Deployment,
        job: PreparedJob,
        chunks: list[Chunk],
        m: int,
        r: int,
        progress: Progress,
        cancelled: threading.Event | None,
        training: Training | None = None,
        max_norm: float | None = None,
    ) -> RunOutcome:
        """Submit one job's calls on ``dep`` (from :meth:`deploy`), wait for them, fetch the loss,
        dL/dw and dL/dx. A training session's step (``training``) also updates the weights where
        they are, after clipping dL/dw to ``max_norm`` when given (which waits for the norm before
        the updates go). Used by :meth:`gradients` for each run of a job, and by
        :class:`~.session.RaySession` for each step."""
        report = progress or (lambda event: None)
        t0 = time.perf_counter()
        steps = Submitted()
        try:
            # Large feeds go into the object store before taking the submission lock (other jobs
            # need not wait for these copies), those read on the same nodes as one object; small
            # ones travel inside the call, as Ray would put them there anyway (below its 100 KiB
            # inline limit), without a put's round trip.
            feeds = place_feeds(chunks, dep, m)
            threads = blas_threads(dep.where, m, r, self.threads, dep.others)
            nested = nestable(dep, job.loss, feeds[0], m, r, training, max_norm is not None)
            with self._submit:
                if nested:  # a tiny job: one call, in which each stage calls the next
                    seed = np.asarray(chunks[0].weight)
                    submit_nested(steps, job_id, dep, job.loss, seed, feeds[0], threads, training)
                for replica in range(r if not nested else 0):
                    submit_replica(steps, job_id, dep, job, chunks, feeds, replica, m, r, threads, training)
                if training is not None and max_norm is None and not nested:  # each update right after its dL/dw
                    submit_updates(steps, job_id, dep, r, threads, training, 1.0)
            if training is not None and max_norm is not None:  # one norm over all stages first
                norms = ray.get(submit_updates(steps, job_id, dep, r, threads, training, None)[: len(dep.specs)])
                scale = clip_scale(sum(n[0] for n in norms), max_norm)  # replica 0's stages: the sums are alike
                submit_updates(steps, job_id, dep, r, threads, training, scale)
            t1 = time.perf_counter()
            self._watch(steps.markers, report, cancelled)
            t2 = time.perf_counter()
            # One fetch: the chunks' losses, the roots of the dL/dw reduction trees, the dL/dx.
            inputs = list(steps.input_grads.items())
            wanted = [*steps.loss, *steps.roots, *(out for _, outs in inputs for out in outs)]
            refs = list({ref: None for ref, _ in wanted})
            got = dict(zip(refs, ray.get(refs)))
            values = [got[ref] if at is None else got[ref][at] for ref, at in wanted]
            losses, values = values[: len(steps.loss)], values[len(steps.loss) :]
            roots, values = values[: len(steps.roots)], values[len(steps.roots) :]
            loss = float(sum(float(np.asarray(v).reshape(())) * ch.weight for v, ch in zip(losses, chunks)))
            grads: dict[str, np.ndarray] = {}
            stage_seconds: dict[tuple[int, int], dict] = {}
            for (p, _), (part, seconds) in zip(steps.root_keys, roots):
                stage_seconds.update({(replica, p): sec for replica, sec in seconds.items()})
                for name, g in part.items():  # a parameter used in several partitions: summed
                    grads[name] = grads[name] + g if name in grads else g
            input_grads = {}
            for key, outs in inputs:
                input_grads[key], values = _sum(values[: len(outs)]), values[len(outs) :]
            t3 = time.perf_counter()
        except BaseException as exc:
            abort(job_id, dep, steps.refs, self._drop_actors)
            raise unwrap(exc) from None
        phases = [stage_seconds.get((i, p), {}) for i in range(r) for p in range(len(dep.specs))]
        return RunOutcome(
            loss,
            grads,
            input_grads,
            {
                "submit": t1 - t0,
                "run": t2 - t1,  # from the last submission until every step finished
                "fetch": t3 - t2,
                "stage_compute": [sum(s.values()) for s in phases],  # per (replica, partition): seconds inside ops
                "stage_phases": phases,  # the same, split into forward / backward / weights
            },
            nested,
        )

    def _watch(self, markers: dict, report, cancelled: threading.Event | None) -> None:
        """Wait for every step, reporting progress; raise the first failure or JobCancelled."""
        pending = list(markers)
        while pending:
            if cancelled is not None and cancelled.is_set():
                raise JobCancelled("job cancelled")
            # Whatever finished within 0.1 s (one call, not one per step: O(steps), not O(steps^2)).
            done, pending = ray.wait(pending, num_returns=len(pending), timeout=0.1, fetch_local=False)
            for ref in done:  # failures surface when the loss and gradients are fetched
                for event in markers[ref]:
                    report(event)


def _or_zeros(value: np.ndarray | None, like: np.ndarray) -> np.ndarray:
    """``value``, or zeros shaped like ``like`` where no gradient flowed back."""
    return value if value is not None else np.zeros_like(like)


def _sum(values: list) -> np.ndarray | None:
    present = [v for v in values if v is not None]
    return sum(present[1:], present[0]) if present else None
