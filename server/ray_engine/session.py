"""Training sessions on the Ray engine: each partition's weights and optimizer state live on the
worker that hosts it, so a step moves the batch, the boundary values and nothing of the model.

The first step places the session like a job (counts chosen from its batch, stages loaded on
actors the scheduler picks) under a key no other model shares, and turns those stages into
trainers (:class:`gradserve.worker.training.Trainer`). The deployment is then held for the
session's life: its actors count as busy (other jobs' ``auto`` sees the load; the pool never
retires them) and every step runs on them. A step is the job's calls followed by one update call
per stage (:func:`~gradserve.server.ray_engine.submit.submit_updates`), queued right behind the
stage's own dL/dw so it overlaps the other stages' backward; replicas each sum the same dL/dw
parts in the same order and apply the same update, so they stay equal.

A lost worker takes its stages' weights with it: the session then goes back to its last
checkpoint (:meth:`Session.checkpoint`; without one, to its first step), is placed afresh on the
workers left, and runs the step again from there; the step reports ``restored_from_step``.
"""

from __future__ import annotations

import logging
import uuid
from typing import TYPE_CHECKING, Any

import numpy as np
import ray

from gradserve.server.planning.batching import split_batch
from gradserve.server.planning.memory import ResourceExhausted, fmt_bytes
from gradserve.server.planning.prepare import prepare
from gradserve.server.ray_engine.submit import Deployment, RunOutcome, Training
from gradserve.server.ray_engine.worker_loss import is_worker_loss
from gradserve.server.result import Result
from gradserve.server.session import Checkpoint, Restored, Session

if TYPE_CHECKING:  # pragma: no cover
    from gradserve.server.ray_engine.engine import RayEngine

log = logging.getLogger("gradserve.ray_engine")


class RaySession(Session):
    """A session whose stages train on Ray workers. Open it with :meth:`RayEngine.session`."""

    def __init__(
        self, engine: "RayEngine", model, optimizer, counts: tuple, *, start: Checkpoint | None = None, **options: Any
    ) -> None:
        """``start``: a checkpoint to go on from (a server restarting its sessions)."""
        super().__init__(model, optimizer, **options)
        self._engine = engine
        self._counts = counts  # (K, M, R) as asked; fixed by the first step
        self._key = f"session-{uuid.uuid4().hex[:12]}"  # no other model shares its stages
        self._dep: Deployment | None = None
        self._split_model = model  # the model the chunks run with (placing may make the batch axis symbolic)
        self._mr = (1, 1)
        self._exchange = False
        self._sharing: tuple[tuple[int, ...], ...] = ()
        self._start_states: dict | None = None  # optimizer state the next placement starts from
        if start is not None:
            self.steps, self.last_checkpoint = start.step, start
            self._start_from(start)

    @property
    def placement(self) -> dict[str, Any]:
        """Counts and nodes, once the first step placed the session (else empty)."""
        if self._dep is None:
            return {}
        m, r = self._mr
        return {"partitions": len(self._dep.specs), "micro_batches": m, "replicas": r, "placement": self._dep.where}

    # -- steps ---------------------------------------------------------------------------------------
    def _step(self, feeds, number, lr, return_grads, progress):
        dep, job, chunks = self._job(feeds)
        training = Training(number, lr, return_grads, self._exchange, self._sharing)
        outcome = self._run(dep, job, chunks, training, progress)
        return outcome.loss, outcome.grads, {**self.placement, "nested": outcome.nested, "seconds": outcome.seconds}

    def _gradients(self, feeds) -> Result:
        dep, job, chunks = self._job(feeds)
        outcome = self._run(dep, job, chunks, None)
        got = outcome.grads
        grads = {p: got[p] if p in got else np.zeros_like(self.model.params[p]) for p in job.params}
        return Result(
            outcome.loss, grads, {}, {"engine": self._engine.name, **self.placement, "seconds": outcome.seconds}
        )

    def _run(self, dep: Deployment, job, chunks, training: Training | None, progress=None) -> RunOutcome:
        m, r = self._mr
        try:
            return self._engine.run(
                uuid.uuid4().hex[:12], dep, job, chunks, m, r, progress, None, training, self.max_norm
            )
        except Exception as exc:
            if not is_worker_loss(exc):
                raise
            # Some of the weights were on that worker: the last checkpoint is all there is to go on from.
            start = self.last_checkpoint or Checkpoint(0, self.model.params, self.groups.init_state(self.model.params))
            log.warning(
                "session %s lost a worker (%s); restarting it from step %d", self._key, type(exc).__name__, start.step
            )
            self._unplace()
            self._start_from(start)
            raise Restored(start.step) from exc

    def _job(self, feeds):
        """The deployment (made by the first step), and this batch prepared and split for it."""
        full = prepare(self.model, feeds)
        if self._dep is None:
            self._place(full, feeds)
        m, r = self._mr
        split = split_batch(self._split_model, full, feeds, m * r)
        return self._dep, split.job, split.chunks

    def _place(self, full, feeds) -> None:
        engine = self._engine
        choice = engine.choose(self.model, full, feeds, self._counts, None)
        placed = engine.pin(self._key, self.model.params)  # held until close: its stages are never evicted
        extra = self._check_memory(choice)
        dep = engine.deploy(choice.split.model, self._key, placed, choice.split.job, choice, None, extra=extra)
        holders: dict[str, list[int]] = {}
        for p, spec in enumerate(dep.specs):
            for name in spec.params:
                holders.setdefault(name, []).append(p)
        groups, states = self.groups.to_dict(), self._start_states or {}
        calls = [
            actor.train.remote(
                dep.keys[p],
                groups,
                [n for n in dep.specs[p].params if holders[n][0] == p],
                {n: states[n] for n in dep.specs[p].params if n in states} or None,
            )
            for row in dep.actors
            for p, actor in enumerate(row)
        ]
        try:
            ray.get(calls)
        except BaseException:
            engine.release(dep)
            raise
        engine.drop_store_copies(placed)  # the stages own copies now (a restore places anew)
        self._dep, self._mr, self._split_model = dep, (choice.m, choice.r), choice.split.model
        self._start_states = None
        self._sharing = tuple(tuple(sorted({q for n in spec.params for q in holders[n]})) for spec in dep.specs)
        self._exchange = choice.r > 1 or any(len(parts) > 1 for parts in holders.values())

    def _check_memory(self, choice) -> list[int]:
        """Bytes each partition's worker holds beyond a job's: its own copy of its weights and the
        optimizer's state (Adam: two more copies). RESOURCE_EXHAUSTED before anything is placed
        when a partition would not fit the largest node."""
        plan, params = choice.plan, self.model.params
        extra = []
        for part in plan.partitions:
            mine = {n: params[n] for n in part.params}
            extra.append(sum(p.nbytes for p in mine.values()) + self.groups.state_bytes(mine))
        nodes = self._engine.nodes()
        top = max((n.memory_bytes for n in nodes), default=0)
        job = [m.total for m in plan.memory] if plan.memory else [0] * len(extra)
        worst = max(range(len(extra)), key=lambda p: job[p] + extra[p])
        if top and job[worst] + extra[worst] > top:
            raise ResourceExhausted(
                f"the session's partition {worst} of {len(extra)} needs {fmt_bytes(job[worst] + extra[worst])} "
                f"({fmt_bytes(job[worst])} as a job, {fmt_bytes(extra[worst])} more for its own weights and the "
                f"optimizer's state), but the largest node has {fmt_bytes(top)}: use more partitions, an "
                "optimizer with less state (SGD without momentum keeps none), or larger nodes"
            )
        return extra

    # -- weights -------------------------------------------------------------------------------------
    def _set_weights(self, values) -> None:
        if self._dep is None:  # not placed yet: the first step places these
            for name, value in values.items():
                np.copyto(self.model.params[name], value)
            return
        calls = []
        for row in self._dep.actors:
            for p, actor in enumerate(row):
                mine = {n: v for n, v in values.items() if n in self._dep.specs[p].params}
                if mine:
                    calls.append(actor.set_weights.remote(self._dep.keys[p], mine))
        held = self._held()
        for name, value in values.items():
            if name not in held:
                np.copyto(self.model.params[name], value)
        ray.get(calls)

    def _held(self) -> set[str]:
        """The parameters some stage holds. The others, which the loss does not read, stay in the
        session's own copy of the model: no step changes them, as torch.optim skips a parameter
        whose .grad is None."""
        return {name for spec in self._dep.specs for name in spec.params} if self._dep is not None else set()

    def _weights(self, names):
        if self._dep is None:
            return {name: self.model.params[name].copy() for name in names}
        parts = ray.get([actor.weights.remote(self._dep.keys[p], names) for p, actor in enumerate(self._dep.actors[0])])
        out: dict[str, np.ndarray] = {}
        for part in parts:
            for name, value in part.items():
                out.setdefault(name, value)
        return {name: out[name] if name in out else self.model.params[name].copy() for name in names}

    def _take_checkpoint(self):
        if self._dep is None:
            start = self._start_states or self.groups.init_state(self.model.params)
            return {n: p.copy() for n, p in self.model.params.items()}, start
        held = self._held()
        weights = {n: p.copy() for n, p in self.model.params.items() if n not in held}
        states: dict[str, dict[str, np.ndarray]] = {}
        for part_weights, part_states in ray.get(
            [actor.checkpoint.remote(self._dep.keys[p]) for p, actor in enumerate(self._dep.actors[0])]
        ):
            weights.update(part_weights)
            states.update(part_states)
        return weights, states

    def _start_from(self, start: Checkpoint) -> None:
        """The next placement starts from ``start``'s weights and optimizer state."""
        for name, value in start.weights.items():
            if value is not self.model.params[name]:
                np.copyto(self.model.params[name], value)
        self._start_states = start.states

    def _unplace(self) -> None:
        """Let go of the placement: stages unloaded on the actors that hold them, actors released."""
        engine = self._engine
        if self._dep is not None:
            engine.release(self._dep)
            self._dep = None
        engine.unpin(self._key)  # its stages unloaded on every actor holding them

    def replica_weights(self) -> list[dict[str, np.ndarray]]:
        """Every replica's copy of the weights (they are equal; tests check that they stay so)."""
        if self._dep is None:
            return []
        out = []
        for row in self._dep.actors:
            merged: dict[str, np.ndarray] = {}
            for part in ray.get([actor.weights.remote(self._dep.keys[p]) for p, actor in enumerate(row)]):
                merged.update(part)
            out.append(merged)
        return out

    def _close(self) -> None:
        self._unplace()
