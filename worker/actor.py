"""The Ray actor that hosts partitions (:class:`~gradserve.worker.stage.Stage`) for the engine.

A worker process costs about a second to start, so actors are pooled and each can host the stages
of several models, keyed by a stage key. Tensors move between actors as ObjectRefs passed as
top-level arguments, so Ray resolves them worker to worker through the object store (zero-copy and
read-only on one node); the driver passes references and never touches the tensors. Outputs are
returned as separate objects (``num_returns``) so each consumer fetches only the values it reads.

A tiny job's stages call each other instead (:class:`~gradserve.worker.protocol.Relay`): the first
stage's call makes the next stage's call and waits for it inside its own, so the job is one call
from the driver plus one hop per further stage; such a call waits only for an actor later in the
pool's order, so no two calls ever wait for each other.

Steps run one at a time in submission order. :meth:`StageHost.cancel` runs in a separate
concurrency group, so it takes effect at once: the job's queued steps then return placeholders
instead of computing (Ray's own task cancellation would break the actor's in-order queue).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import OrderedDict
from typing import Any, Iterator, Sequence

import numpy as np
import ray

from gradserve.worker import kernels
from gradserve.worker.ops import blas
from gradserve.worker.memory import keep_freed_memory
from gradserve.worker.optim import ParamGroups
from gradserve.worker.protocol import (
    BY_REF,
    FEED_GROUP,
    FROM_PEER,
    Backward,
    Forward,
    Norm,
    Reduce,
    Relay,
    StageCall,
    Update,
    Weights,
)
from gradserve.worker.stage import Stage, StageSpec
from gradserve.worker.training import Trainer, sum_parts


_ENDED_KEPT = 1024  # aborted job ids remembered per actor
_PEERS_KEPT = 256  # handles of other pool actors kept per actor (the pool replaces dead ones: names are new)


class PeerLost(RuntimeError):
    """The actor a :class:`~gradserve.worker.protocol.Relay` calls has died and its name is gone
    (a call to a dead actor already looked up fails with Ray's own ActorDiedError instead)."""


class StageHost:
    """Actor body: loads stages (parameters come from the object store) and runs their steps."""

    def __init__(self) -> None:
        self.stages: dict[str, Stage] = {}
        self.cancelled: set[str] = set()
        self.failed: dict[str, BaseException] = {}  # job id -> the error one of its steps raised here
        self.ended: OrderedDict[str, None] = OrderedDict()  # jobs aborted here lately: their late steps are no-ops
        self.kept: dict[tuple[str, str], tuple[dict, dict]] = {}  # (job, stage key) -> dL/dw awaiting a reduce
        self.trainers: dict[str, Trainer] = {}  # stage key -> its optimizer, for a training session's stages
        self.peers: OrderedDict[str, Any] = OrderedDict()  # pool actor name -> its handle, for relays
        keep_freed_memory()
        kernels.warm_up()  # compiled kernels loaded (or compiled, once per machine) before any job
        blas.backend()  # and the BLAS library chosen and loaded

    def load(
        self, key: str, spec: StageSpec, constants: dict[str, np.ndarray], names: Sequence[str], *params: np.ndarray
    ) -> None:
        """Host a partition under ``key``; ``params`` arrive as object-store refs Ray resolved."""
        self.stages[key] = Stage(spec, dict(zip(names, params)), constants)

    def unload(self, key: str) -> None:
        """Drop a partition (its model was evicted or its weights changed, or its session closed)."""
        self.stages.pop(key, None)
        self.trainers.pop(key, None)

    def train(self, key: str, groups: dict, owned: Sequence[str], states: dict | None = None) -> None:
        """Make the loaded stage ``key`` a training session's: it owns its weights from now on and
        updates them with the optimizer ``groups`` describes (:meth:`ParamGroups.to_dict`), from
        the optimizer ``states`` of a checkpoint if given."""
        self.trainers[key] = Trainer(self.stages[key], ParamGroups.from_dict(groups), owned, states)

    def checkpoint(self, key: str) -> tuple[dict, dict]:
        """A session stage's owned weights and their optimizer state."""
        return self.trainers[key].checkpoint()

    def set_weights(self, key: str, values: dict[str, np.ndarray]) -> None:
        """Overwrite some of a session stage's parameters."""
        self.trainers[key].set_weights(values)

    def weights(self, key: str, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """A session stage's current parameters (all, or those of ``names`` it holds)."""
        return self.trainers[key].weights(names)

    def run(self, call: StageCall | tuple, *refs: Any) -> Any:
        """Run consecutive steps of one job on one stage, in one actor call (see
        :func:`gradserve.server.planning.schedule.calls`): ``call`` says what
        (:class:`~gradserve.worker.protocol.StageCall`, its steps typed actions, or its wire form,
        :meth:`~gradserve.worker.protocol.StageCall.to_wire`, as the engine sends it),
        ``refs`` are the values that come as ObjectRefs (Ray resolves top-level arguments only).

        Returns the results only the driver reads as one object (a tuple, in order), then every
        other result as its own object (``num_returns``), or one ``None`` when there is nothing to
        return. A step after a failed step of the same job raises that failure again, so an error
        nobody else reads still reaches the driver through the job's weight step.
        """
        if not isinstance(call, StageCall):
            call = StageCall.from_wire(call)
        job_id = call.job_id
        if job_id in self.failed:
            raise self.failed[job_id]
        if job_id in self.ended:  # a step of an aborted job that arrived late: nothing to do
            return _placeholders(call)
        stage = self.stages[call.key]
        pending = iter(refs)
        values = [next(pending) if v is BY_REF else v for v in call.values]
        out: list[Any] = []
        at = 0
        grads: dict[str, np.ndarray]
        by_replica: dict[int, dict[str, float]]  # compute seconds by phase, per replica
        try:
            for step in call.steps:
                args, labels = values[at : at + step.reads], call.names[at : at + step.reads]
                at += step.reads
                cancelled = job_id in self.cancelled
                match step:
                    case Forward(micro_batch=mb):
                        if cancelled:
                            out += [None] * len(stage.spec.outputs)
                            continue
                        with _threads(call.threads[0]):
                            out += stage.forward(job_id, mb, _inputs(labels, args))
                    case Backward(micro_batch=mb, defer=defer):
                        if cancelled:
                            out += [None] * len(stage.spec.wrt_inputs)
                            continue
                        with _threads(call.threads[0]):
                            out += stage.backward(job_id, mb, list(zip(labels, args)), defer)
                    case Weights(replica=replica, keep=keep):
                        if cancelled:
                            grads, by_replica = {}, {}
                        else:
                            with _threads(call.threads[1]):
                                grads, seconds = stage.weight_grads(job_id)
                            by_replica = {replica: seconds}
                        if keep:
                            self.kept[job_id, call.key] = (grads, by_replica)
                        else:
                            out.append((grads, by_replica))
                    case Relay(peer=peer, call=inner, sends=sends, errors=errors, gives=gives):
                        if cancelled:
                            given: Sequence[Any] = [None] * gives
                        else:  # waits here: the peer is later in the pool's order (module docs)
                            given = ray.get(self._peer(peer).run.remote(inner, *(out[i] for i in sends)))
                        back = iter([given[i] for i in errors])
                        values = [next(back) if _from_peer(v) else v for v in values]
                        out += [g for i, g in enumerate(given) if i not in errors]
                    case Reduce():  # other replicas' results summed into the kept one
                        grads, by_replica = self.kept.pop((job_id, call.key), ({}, {}))
                        if not cancelled:
                            for other_grads, other_seconds in args:
                                for name, g in other_grads.items():
                                    grads[name] = grads[name] + g if name in grads else g
                                by_replica.update(other_seconds)
                        out.append((grads, by_replica))
                    case Norm():  # a session's dL/dw, summed and kept, and its share of the norm
                        grads = self._session_grads(job_id, call.key, args)
                        self.kept[job_id, call.key] = (grads, {})
                        out.append(0.0 if cancelled else self.trainers[call.key].sq_norm(grads))
                    case Update(replica=replica, step=number, lr=lr, scale=scale, grads=give):
                        grads = self._session_grads(job_id, call.key, args)
                        updating = 0.0
                        if not cancelled:
                            with _threads(call.threads[1]):
                                updating = self._timed_update(call.key, grads, number, lr, scale)
                        owned = self.trainers[call.key].owned if give else ()  # a shared one, once
                        out.append(({n: grads[n] for n in owned if n in grads}, {replica: {"update": updating}}))
                    case _:
                        raise TypeError(f"not a step: {step!r}")
        except BaseException as exc:
            self.failed[job_id] = exc
            raise
        return _returns(call, out)

    def _peer(self, name: str) -> Any:
        """The pool actor called ``name`` (looked up once)."""
        if name in self.peers:
            self.peers.move_to_end(name)
            return self.peers[name]
        try:
            self.peers[name] = handle = ray.get_actor(name)
        except ValueError as exc:  # Ray frees a dead actor's name: the worker was lost
            raise PeerLost(f"stage actor {name} is gone: {exc}") from None
        while len(self.peers) > _PEERS_KEPT:
            self.peers.popitem(last=False)
        return handle

    def _session_grads(self, job_id: str, key: str, parts: list) -> dict[str, np.ndarray]:
        """A session step's dL/dw for stage ``key``: the kept one, or ``parts`` (weight results)
        summed in order."""
        if not parts:
            return self.kept.pop((job_id, key), ({}, {}))[0]
        mine = self.stages[key].params
        return sum_parts([{n: g for n, g in grads.items() if n in mine} for grads, _ in parts])

    def _timed_update(self, key: str, grads: dict, step: int, lr: float | None, scale: float) -> float:
        t = time.perf_counter()
        self.trainers[key].apply(grads, step, lr, scale)
        return time.perf_counter() - t

    @ray.method(concurrency_group="control")
    def cancel(self, job_id: str) -> None:
        """From now on, skip the job's queued steps (runs at once, beside any running step)."""
        self.cancelled.add(job_id)

    def end_job(self, job_id: str) -> None:
        """Free whatever any stage holds for ``job_id``. Queued after the job's steps, so it runs
        once they are done or skipped."""
        for stage in self.stages.values():
            stage.end_job(job_id)
        for kept in [k for k in self.kept if k[0] == job_id]:
            del self.kept[kept]
        self.cancelled.discard(job_id)
        self.failed.pop(job_id, None)
        self.ended[job_id] = None
        while len(self.ended) > _ENDED_KEPT:
            self.ended.popitem(last=False)

    @ray.method(concurrency_group="control")
    def job_count(self) -> int:
        """Jobs with state on this actor (0 when idle: nothing leaks)."""
        return sum(stage.job_count() for stage in list(self.stages.values()))  # runs beside load/unload

    @ray.method(concurrency_group="control")
    def where(self) -> dict[str, Any]:
        """The cluster node and process this actor runs in."""
        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "pid": os.getpid(), "ip": ray.util.get_node_ip_address()}


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    """A step's budget of threads (set by the engine), for BLAS and the compiled kernels alike."""
    with blas.limit(n), kernels.threads(n):
        yield


def _inputs(labels: Sequence[str], args: Sequence[Any]) -> dict[str, Any]:
    """A forward step's values by name, the feeds of a :data:`FEED_GROUP` value unpacked (a group
    holds the feeds read on one set of nodes: the stage ignores those it does not read)."""
    inputs: dict[str, Any] = {}
    for label, arg in zip(labels, args):
        if label == FEED_GROUP:
            inputs.update(arg)
        else:
            inputs[label] = arg
    return inputs


def _from_peer(value: Any) -> bool:
    return isinstance(value, str) and value == FROM_PEER


def _returns(call: StageCall, out: list) -> Any:
    """The call's results as Ray returns them: the caller's in one tuple first, then the others
    (but those a relay sent on)."""
    driver = set(call.to_driver) | call.sent
    returns = ([tuple(out[i] for i in call.to_driver)] if call.to_driver else []) + [
        v for i, v in enumerate(out) if i not in driver
    ]
    if not returns:
        return None
    return returns[0] if len(returns) == 1 else tuple(returns)


def _placeholders(call: StageCall) -> Any:
    return _returns(call, [None] * call.results)


# Ray's typed overloads of ray.remote leave out concurrency_groups, which it takes at run time.
StageActor = ray.remote(concurrency_groups={"control": 1})(StageHost)  # type: ignore[call-overload]
