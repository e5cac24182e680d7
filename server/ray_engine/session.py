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

Not yet: checkpoints, and so surviving a lost worker (the step fails with ``WorkerLost`` and the
session is closed); sessions through the gRPC service.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

import numpy as np
import ray

from gradserve.server.errors import WorkerLost
from gradserve.server.planning.batching import split_batch
from gradserve.server.planning.prepare import prepare
from gradserve.server.ray_engine.submit import Deployment, Training
from gradserve.server.ray_engine.worker_loss import is_worker_loss
from gradserve.server.result import Result
from gradserve.server.session import Session

if TYPE_CHECKING:  # pragma: no cover
    from gradserve.server.ray_engine.engine import RayEngine


class RaySession(Session):
    """A session whose stages train on Ray workers. Open it with :meth:`RayEngine.session`."""

    def __init__(self, engine: "RayEngine", model, optimizer, counts: tuple, **options: Any) -> None:
        super().__init__(model, optimizer, **options)
        self._engine = engine
        self._counts = counts  # (K, M, R) as asked; fixed by the first step
        self._key = f"session-{uuid.uuid4().hex[:12]}"  # no other model shares its stages
        self._dep: Deployment | None = None
        self._split_model = model  # the model the chunks run with (placing may make the batch axis symbolic)
        self._mr = (1, 1)
        self._exchange = False
        self._sharing: tuple[tuple[int, ...], ...] = ()

    @property
    def placement(self) -> dict[str, Any]:
        """Counts and nodes, once the first step placed the session (else empty)."""
        if self._dep is None:
            return {}
        m, r = self._mr
        return {"partitions": len(self._dep.specs), "micro_batches": m, "replicas": r, "placement": self._dep.where}

    # -- steps ---------------------------------------------------------------------------------------
    def _step(self, feeds, number, lr, return_grads):
        dep, job, chunks = self._job(feeds)
        training = Training(number, lr, return_grads, self._exchange, self._sharing)
        loss, grads, _, seconds = self._run(dep, job, chunks, training)
        return loss, grads, {**self.placement, "seconds": seconds}

    def _gradients(self, feeds) -> Result:
        dep, job, chunks = self._job(feeds)
        loss, grads, _, seconds = self._run(dep, job, chunks, None)
        grads = {p: grads[p] if p in grads else np.zeros_like(self.model.params[p]) for p in job.params}
        return Result(loss, grads, {}, {"engine": self._engine.name, **self.placement, "seconds": seconds})

    def _run(self, dep: Deployment, job, chunks, training: Training | None):
        m, r = self._mr
        try:
            return self._engine._run(uuid.uuid4().hex[:12], dep, job, chunks, m, r, None, None, training, self.max_norm)
        except Exception as exc:
            if is_worker_loss(exc):  # its weights were on that worker: nothing to go on from
                self.close()
                raise WorkerLost(f"the session lost a Ray worker holding its weights ({type(exc).__name__}); "
                                 "the session is closed", 0) from exc
            raise

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
        choice = engine._choose(self.model, full, feeds, self._counts, None)
        with engine._lock:
            placed = engine._params[self._key] = _placed(self.model.params)
            placed.users += 1  # held until close: the session's stages are never evicted
        dep = engine._deploy(choice.split.model, self._key, placed, choice.split.job, choice, None)
        holders: dict[str, list[int]] = {}
        for p, spec in enumerate(dep.specs):
            for name in spec.params:
                holders.setdefault(name, []).append(p)
        groups = self.groups.to_dict()
        calls = [actor.train.remote(dep.keys[p], groups, [n for n in dep.specs[p].params if holders[n][0] == p])
                 for row in dep.actors for p, actor in enumerate(row)]
        try:
            ray.get(calls)
        except BaseException:
            engine._release(dep)
            raise
        self._dep, self._mr, self._split_model = dep, (choice.m, choice.r), choice.split.model
        self._sharing = tuple(tuple(sorted({q for n in spec.params for q in holders[n]})) for spec in dep.specs)
        self._exchange = choice.r > 1 or any(len(parts) > 1 for parts in holders.values())

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
        ray.get(calls)

    def _weights(self, names):
        if self._dep is None:
            return {name: self.model.params[name].copy() for name in names}
        parts = ray.get([actor.weights.remote(self._dep.keys[p], names) for p, actor in enumerate(self._dep.actors[0])])
        out: dict[str, np.ndarray] = {}
        for part in parts:
            for name, value in part.items():
                out.setdefault(name, value)
        return {name: out[name] for name in names}

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
        engine = self._engine
        if self._dep is not None:
            engine._release(self._dep)
        with engine._lock:
            placed = engine._params.get(self._key)
            if placed is not None:
                placed.users -= 1
            engine._forget(self._key)  # its stages unloaded on every actor holding them


def _placed(params):
    from gradserve.server.ray_engine.engine import _Placed  # the engine's own record of placed weights

    return _Placed.put(params)
