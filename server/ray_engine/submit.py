"""Submitting one job's actor calls: its plan's stages as loaded on actors (:class:`PlanEntry`,
:class:`Deployment`), each replica's calls built from the schedule and sent
(:func:`submit_replica`), the references they produce (:class:`Submitted`), what a run fetched
(:class:`RunOutcome`), how the feeds go to the object store (:func:`place_feeds`) and how many
BLAS threads each step gets (:func:`blas_threads`). The engine
(:mod:`.engine`) decides what runs where; this module turns one placed job into Ray calls, typed end
to end (:mod:`gradserve.worker.protocol`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import ray

from gradserve.server.events import ProgressEvent
from gradserve.server.planning.partition import Plan
from gradserve.server.planning.schedule import (
    BACKWARD,
    FORWARD,
    WEIGHTS,
    Call,
    Links,
    calls,
    one_f_one_b,
    reduction_children,
    reduction_parent,
)
from gradserve.worker.protocol import (
    BY_REF,
    FEED_GROUP,
    Action,
    Backward,
    Forward,
    Kind,
    Norm,
    Output,
    Reduce,
    StageCall,
    Update,
    Weights,
)
from gradserve.worker.stage import StageSpec


INLINE_BYTES = 100 * 1024  # feeds up to this size travel inside the call (Ray's inline limit)


@dataclass(frozen=True)
class FeedGroup:
    """Large feeds of one chunk that are read on the same nodes, put in the object store together as
    one ``{name: array}`` object (each array still read zero-copy): one put and one object for the
    driver and the raylets instead of one per feed, and no node pulls a feed it does not read."""

    ref: Any  # ray.ObjectRef


def place_feeds(chunks, dep: "Deployment", m: int, put=ray.put) -> list[dict[str, Any]]:
    """Per chunk (replica-major, ``m`` per replica), each feed as the calls will carry it: a small
    one as is (inside the call), a large one as the :class:`FeedGroup` of the feeds read on the
    same nodes (by the chunk's replica), ``put`` in the object store. A feed no partition reads is
    not put at all."""
    names = chunks[0].feeds if chunks else {}  # every chunk has the same feeds
    readers = {name: [p for p, spec in enumerate(dep.specs) if name in spec.feeds] for name in names}
    placed = []
    for c, chunk in enumerate(chunks):
        where = dep.where[c // m]
        out: dict[str, Any] = {}
        groups: dict[frozenset[str], dict[str, np.ndarray]] = {}
        for name, value in chunk.feeds.items():
            if value.nbytes <= INLINE_BYTES:
                out[name] = value
            elif readers[name]:
                groups.setdefault(frozenset(where[p]["node_id"] for p in readers[name]), {})[name] = value
        for members in groups.values():
            group = FeedGroup(put(members))
            out.update(dict.fromkeys(members, group))
        placed.append(out)
    return placed


@dataclass
class PlanEntry:
    """A model's plan for (input_grads, K, split): its stages, loadable on any pool actor."""

    key: str  # prefix of the stage keys actors host this plan's partitions under
    plan: Plan
    specs: list[StageSpec]
    links: Links  # which partitions read which
    read: frozenset[str] = frozenset()  # values some partition reads (the rest go to the driver only)
    _programs: dict = field(default_factory=dict)

    def stage(self, partition: int) -> str:
        return f"{self.key}/{partition}"

    def program(self, m: int, deferred: bool) -> list[Call]:
        """One replica's actor calls for ``m`` micro-batches: the 1F1B schedule, steps grouped
        into calls (:mod:`gradserve.server.planning.schedule`); made once per (m, deferred)."""
        key = (m, deferred)
        if key not in self._programs:
            self._programs[key] = calls(one_f_one_b(self.links, m), self.links, m, deferred=deferred)
        return self._programs[key]


@dataclass
class Deployment:
    """One job's placement: its plan's stages loaded on the actors the scheduler chose."""

    keys: list[str]  # stage key per partition
    plan: Plan
    specs: list[StageSpec]
    entry: PlanEntry
    actors: list[list[Any]]  # [replica][partition]
    where: list[list[dict]]  # node placement per actor
    others: dict[str, int]  # node id -> other jobs' slots running there when this job was placed


@dataclass(frozen=True)
class Training:
    """What a training session's step adds to a job: after its dL/dw, the optimizer's update on
    every stage (:func:`submit_updates`). ``exchange``: dL/dw parts travel between workers
    (replicas, or a parameter several partitions hold) instead of staying where they were computed."""

    step: int
    lr: float | None
    grads: bool  # dL/dw back to the driver too
    exchange: bool
    sharing: tuple[tuple[int, ...], ...]  # per partition: the partitions whose dL/dw it sums (itself too)


@dataclass
class Submitted:
    """The references a submitted job produces."""

    markers: dict = field(default_factory=dict)  # first output of each call -> its steps' progress events
    refs: list = field(default_factory=list)  # every output of every call
    # What the driver fetches, as (ref, position in a call's packed results or None):
    loss: list = field(default_factory=list)  # loss per chunk
    roots: list = field(default_factory=list)  # results of the reduction trees' roots
    root_keys: list = field(default_factory=list)  # (partition, replica) of each root
    input_grads: dict = field(default_factory=dict)  # (chunk, input) -> dL/dx parts to sum
    weights: dict = field(default_factory=dict)  # (replica, partition) -> ref of a non-root weight result


@dataclass(frozen=True)
class RunOutcome:
    """What one run of a submitted job fetched (:meth:`~.engine.RayEngine.run`)."""

    loss: float  # summed over the chunks, each weighted by its share of the batch
    grads: dict[str, np.ndarray]  # dL/dw of the parameters that have one, summed over partitions
    input_grads: dict[tuple[int, str], np.ndarray | None]  # (chunk, input) -> its dL/dx
    seconds: dict[str, Any]  # submit, run, fetch, and per (replica, partition) stage compute
    nested: bool = False  # ran as one nested call (a tiny job, :mod:`.nested`), not the driver's calls


def defer_weights(where: list[list[dict]], m: int, r: int) -> bool:
    """Defer weight gradients (zero-bubble) unless nothing could overlap them: one micro-batch, one
    replica, every stage on one node (then computing them at once, with all cores, is cheaper)."""
    return not (m == 1 and r == 1 and len({w["node_id"] for row in where for w in row}) == 1)


def blas_threads(
    where: list[list[dict]], m: int, r: int, fixed: int | None, others: Mapping[str, int] | None = None
) -> list[list[tuple[int, int]]]:
    """BLAS threads per (replica, partition): (for forward/backward steps, for the weight step).

    Stages of one pipeline with a single micro-batch run one after another, so each may use all of
    its node's cores; with several micro-batches or replicas, stages on a node run at once and
    share its cores (more threads than cores makes OpenBLAS crawl). The deferred weight-gradient
    steps of all stages run at once at the end, so they always share. ``others``: slots of other
    jobs running on each node, which share its cores too.
    """
    others = others or {}
    per_node: dict[str, int] = {}
    for row in where:
        for w in row:
            per_node[w["node_id"]] = per_node.get(w["node_id"], 0) + 1
    out = []
    for row in where:
        cells = []
        for w in row:
            busy = others.get(w["node_id"], 0)
            shared = max(1, w["cpus"] // (per_node[w["node_id"]] + busy))
            alone = max(1, w["cpus"] // (1 + busy)) if m == 1 and r == 1 else shared
            weights = alone if not defer_weights(where, m, r) else shared
            cells.append((fixed, fixed) if fixed else (alone, weights))
        out.append(cells)
    return out


def submit_replica(
    steps: "Submitted",
    job_id: str,
    dep: Deployment,
    job,
    chunks,
    feed_refs,
    replica: int,
    m: int,
    r: int,
    threads,
    training: Training | None = None,
) -> None:
    """Submit one replica's calls (:meth:`PlanEntry.program`); record the refs in ``steps``. In a
    training step (``training``), dL/dw is kept on the actor, or, to be exchanged, a result for
    the update calls to read (:func:`submit_updates`); never reduced here."""
    specs, actors = dep.specs, dep.actors[replica]
    first = replica * m
    defer = defer_weights(dep.where, m, r)
    acts: dict[int, dict[str, ray.ObjectRef]] = {c: {} for c in range(first, first + m)}  # activations
    errs: dict[int, dict[str, list[ray.ObjectRef]]] = {c: {} for c in acts}  # errors sent back
    children = reduction_children(replica, r) if training is None else []
    root = reduction_parent(replica, r) is None and training is None
    for call in dep.entry.program(m, defer):
        p = call.partition
        spec = specs[p]
        program: list[Action] = []
        names: list[str] = []
        values: list[Any] = []
        refs: list[ray.ObjectRef] = []
        results: list[Output] = []
        events: list[ProgressEvent] = []

        def take(name: str, value: Any) -> None:  # ObjectRefs go as arguments, the rest inside
            names.append(name)
            if isinstance(value, ray.ObjectRef):
                values.append(BY_REF)
                refs.append(value)
            else:
                values.append(value)

        for step in call.steps:
            c = first + step.micro_batch
            start = len(names)
            if step.phase == FORWARD:
                sent: set[FeedGroup] = set()
                for f in spec.feeds:
                    value = feed_refs[c][f]
                    if isinstance(value, FeedGroup):  # the group's feeds, once
                        if value not in sent:
                            sent.add(value)
                            take(FEED_GROUP, value.ref)
                    else:
                        take(f, value)
                for v in spec.inputs:
                    take(v, acts[c][v])
                program.append(Forward(c, len(names) - start))
                results += [
                    Output(Kind.ACTIVATION, c, v, v == job.loss and v not in dep.entry.read) for v in spec.outputs
                ]
            elif step.phase == BACKWARD:
                for v in spec.outputs:
                    if v == job.loss:  # seed: the chunk's weight in the total loss (the stage shapes it)
                        take(v, np.asarray(chunks[c].weight))
                    for ref in errs[c].get(v, []):  # one error per consuming partition, summed there
                        take(v, ref)
                program.append(Backward(c, len(names) - start, defer))
                results += [Output(Kind.ERROR, c, v, v not in spec.inputs) for v in spec.wrt_inputs]
            elif training is not None:  # a session's dL/dw: kept for the update, or shared with it
                program.append(Weights(replica, not training.exchange))
                if training.exchange:
                    results.append(Output(Kind.WEIGHTS, -1, "", False))
            else:  # weights: this replica's dL/dw; kept on the actor if a reduce adds its children's
                program.append(Weights(replica, bool(children)))
                if not children:
                    results.append(Output(Kind.WEIGHTS, -1, "", root))
            if step.phase in (FORWARD, BACKWARD):
                events.append(
                    ProgressEvent(
                        step.phase,
                        p,
                        step.micro_batch,
                        replica,
                        node=dep.where[replica][p]["node_id"],
                        total=2 * len(specs) * m * r,
                    )
                )
        to_driver = tuple(i for i, res in enumerate(results) if res.to_driver)
        returns = (1 if to_driver else 0) + len(results) - len(to_driver)
        # .options() costs ~50 us a call (a new method wrapper): only for calls with several results.
        method = actors[p].run if returns <= 1 else actors[p].run.options(num_returns=returns)
        outs = as_list(
            method.remote(
                StageCall(
                    dep.keys[p],
                    job_id,
                    threads[replica][p],
                    tuple(program),
                    tuple(names),
                    tuple(values),
                    len(results),
                    to_driver,
                ).to_wire(),
                *refs,
            )
        )
        steps.markers[outs[0]] = events
        steps.refs += outs
        others = iter(outs[1:] if to_driver else outs)
        for i, res in enumerate(results):
            c, v = res.chunk, res.value
            if res.to_driver:  # read by the driver as (ref, position in the packed tuple)
                at = (outs[0], to_driver.index(i))
                if res.kind is Kind.ACTIVATION:
                    steps.loss.append(at)
                elif res.kind is Kind.ERROR:
                    steps.input_grads.setdefault((c, v), []).append(at)
                else:
                    weights_result(steps, replica, p, at, True)
                continue
            ref = next(others)
            if res.kind is Kind.ACTIVATION:
                acts[c][v] = ref
                if v == job.loss:
                    steps.loss.append((ref, None))
            elif res.kind is Kind.ERROR:
                errs[c].setdefault(v, []).append(ref)
            else:
                weights_result(steps, replica, p, ref, False)
        if children and any(step.phase == WEIGHTS for step in call.steps):
            # The reduction tree's sum, in a call of its own: the children's dL/dw arrive while
            # this replica computes its own, instead of holding up the call that computes it.
            kids = [steps.weights[(child, p)] for child in children]
            reduce = StageCall(
                dep.keys[p],
                job_id,
                threads[replica][p],
                (Reduce(replica, len(kids)),),
                ("",) * len(kids),
                (BY_REF,) * len(kids),
                1,
                (0,) if root else (),
            )
            out = actors[p].run.remote(reduce.to_wire(), *kids)
            steps.markers[out] = []
            steps.refs.append(out)
            weights_result(steps, replica, p, (out, 0) if root else out, root)


def submit_updates(
    steps: Submitted,
    job_id: str,
    dep: Deployment,
    r: int,
    threads,
    training: Training,
    scale: float | None,
) -> list:
    """A training step's second half: per (replica, partition) one call that sums the stage's
    dL/dw parts (every replica the same parts in the same order) and applies the optimizer
    (:class:`Update`, its results booked as the reduction roots the driver fetches), or, with
    ``scale`` None (clipping: the norm is needed first), :class:`Norm` calls whose results --
    each stage's share of the squared norm -- are returned."""
    norms = []
    for replica in range(r):
        for p, actor in enumerate(dep.actors[replica]):
            parts = [steps.weights[(i, q)] for i in range(r) for q in training.sharing[p]] if training.exchange else []
            step: Norm | Update
            if scale is None:
                step = Norm(len(parts))
            else:
                step = Update(replica, len(parts), training.step, training.lr, scale, training.grads and replica == 0)
            to_driver = (0,)
            call = StageCall(
                dep.keys[p],
                job_id,
                threads[replica][p],
                (step,),
                ("",) * len(parts),
                (BY_REF,) * len(parts),
                1,
                to_driver,
            )
            out = actor.run.remote(call.to_wire(), *parts)
            steps.markers[out] = []
            steps.refs.append(out)
            if scale is None:
                norms.append(out)
            else:
                weights_result(steps, replica, p, (out, 0), True)
    return norms


def weights_result(steps: "Submitted", replica: int, p: int, out, root: bool) -> None:
    """Record where partition ``p``'s dL/dw of ``replica`` (summed over its reduction subtree) will be."""
    if root:
        steps.roots.append(out)
        steps.root_keys.append((p, replica))
    else:
        steps.weights[(replica, p)] = out


def as_list(refs: Any) -> list:
    return refs if isinstance(refs, list) else [refs]
