"""A tiny job's calls nested: one call from the driver to the first stage, which calls the next
stage itself and waits for its answer inside its own call (:class:`~gradserve.worker.protocol.Relay`),
and so on down the chain; each stage's backward then runs on the errors its peer sent back.

Why: a tiny job is all latency. Through the driver, K=2 with one micro-batch is three calls one
after another (forward on the first stage, forward and backward on the second, backward on the
first), each a round trip from the driver; nested, it is one call from the driver plus one hop:
"K=1 plus one hop" (issue 20). Measured with bare Ray actors on the 2-core machine of
``benchmarks/README.md``: three chained calls 2.4 ms, the same work nested 1.9 ms.

When (:func:`nestable`): one micro-batch, one replica (a training session's step too, unless its
stages exchange dL/dw or clip by the global norm), partitions in a chain (each reads only the one
before it; the loss in the last), every feed inside the call and everything the job moves between
stages small enough to travel inside the calls too (:data:`INLINE_BYTES`: no object store at
all), and the chain's actors in the pool's order (``seq``): a call waits only for a later actor,
so no two calls can wait for each other whatever other jobs run. Other jobs take the driver's calls (:func:`.submit.submit_replica`),
which keep their stages free between steps for other jobs, report progress step by step and
never pass a large result through another stage.
"""

from __future__ import annotations

from typing import Any

import ray

from gradserve.server.events import ProgressEvent
from gradserve.server.planning.schedule import BACKWARD, FORWARD, Links
from gradserve.server.ray_engine.submit import (
    INLINE_BYTES,
    Deployment,
    FeedGroup,
    Submitted,
    Training,
    weights_result,
)
from gradserve.worker.protocol import (
    BY_REF,
    FROM_PEER,
    Backward,
    Forward,
    Kind,
    Output,
    Relay,
    StageCall,
    Update,
    Weights,
)

__all__ = ["nestable", "submit_nested"]


def nestable(
    dep: Deployment, loss: str, feeds: dict[str, Any], m: int, r: int, training: Training | None, clipped: bool
) -> bool:
    """Whether the job's calls can nest (module docs); ``feeds``: its one chunk's feeds as the
    calls would carry them (:func:`.submit.place_feeds`). A training session's step nests too
    when each stage can update its own weights right after its dL/dw: no dL/dw exchanged between
    workers, no global norm to clip by first (``clipped``)."""
    k = len(dep.specs)
    if k < 2 or m != 1 or r != 1 or (training is not None and (training.exchange or clipped)):
        return False
    if dep.entry.links != Links.chain(k) or any(loss in spec.outputs for spec in dep.specs[:-1]):
        return False
    if any(isinstance(v, (FeedGroup, ray.ObjectRef)) for v in feeds.values()):
        return False
    memory = dep.plan.memory
    # Down the chain: each boundary value, and its error back; up it: every stage's dL/dw.
    moved = sum(2 * b.nbytes for b in dep.plan.boundaries.values()) + sum(part.grads for part in memory)
    if not memory or moved > INLINE_BYTES:
        return False
    seqs = [w["seq"] for w in dep.where[0]]
    return all(a < b for a, b in zip(seqs, seqs[1:]))


def submit_nested(
    steps: Submitted,
    job_id: str,
    dep: Deployment,
    loss: str,
    seed: Any,
    feeds: dict[str, Any],
    threads,
    training: Training | None = None,
) -> None:
    """Submit the job as one nested call to its first stage; record its one reference in
    ``steps`` (every result travels back in it, in order). ``seed``: the loss's weight in the
    total (the one chunk's); ``threads``: per (replica, partition), as :func:`.submit.blas_threads`
    gives them; ``training``: a session's step, whose stages each update their weights at the end
    of their call (the update's result stands for the stage's dL/dw, as
    :func:`.submit.submit_updates` books it)."""
    wire, gives = _call(0, job_id, dep, loss, seed, feeds, threads[0], training)
    ref = dep.actors[0][0].run.remote(wire)
    k = len(dep.specs)
    steps.markers[ref] = [
        ProgressEvent(phase, p, 0, 0, node=dep.where[0][p]["node_id"], total=2 * k)
        for phase in (FORWARD, BACKWARD)
        for p in (range(k) if phase == FORWARD else reversed(range(k)))
    ]
    steps.refs.append(ref)
    for i, (res, p) in enumerate(gives):
        at = (ref, i)
        if res.kind is Kind.ACTIVATION:
            if res.value == loss:
                steps.loss.append(at)
        elif res.kind is Kind.ERROR:
            steps.input_grads.setdefault((0, res.value), []).append(at)
        else:
            weights_result(steps, 0, p, at, True)


def _call(
    p: int, job_id: str, dep: Deployment, loss: str, seed: Any, feeds: dict[str, Any], threads, training
) -> tuple[tuple, list[tuple[Output, int]]]:
    """Stage ``p``'s call, with the calls of the stages after it nested in it (wire form), and
    what it gives back to its caller, in order: (result, partition that made it)."""
    spec = dep.specs[p]
    names: list[str] = []
    values: list[Any] = []
    program: list[Any] = []
    out: list[tuple[Output, int]] = []  # every result of the call, in order
    sent: set[int] = set()

    names += spec.feeds + spec.inputs  # the boundary inputs: the caller's results, as arguments
    values += [feeds[f] for f in spec.feeds] + [BY_REF] * len(spec.inputs)
    program.append(Forward(0, len(names)))
    out += [(Output(Kind.ACTIVATION, 0, v, v == loss), p) for v in spec.outputs]
    errors: set[str] = set()  # outputs whose error the next stage sends back
    if p + 1 < len(dep.specs):
        inner, given = _call(p + 1, job_id, dep, loss, seed, feeds, threads, training)
        sends = tuple(spec.outputs.index(v) for v in dep.specs[p + 1].inputs)
        sent.update(sends)
        error_at = {
            res.value: i for i, (res, _) in enumerate(given) if res.kind is Kind.ERROR and res.value in spec.outputs
        }
        back = tuple(error_at[v] for v in spec.outputs if v in error_at)  # in the order the backward reads them
        errors = set(error_at)
        program.append(Relay(dep.where[0][p + 1]["name"], inner, sends, back, len(given)))
        out += [g for i, g in enumerate(given) if i not in back]
    start = len(names)
    for v in spec.outputs:  # as the stage's backward reads them: a seed for the loss, errors
        if v == loss:
            names.append(v)
            values.append(seed)
        if v in errors:
            names.append(v)
            values.append(FROM_PEER)
    program.append(Backward(0, len(names) - start, False))
    out += [(Output(Kind.ERROR, 0, v, v not in spec.inputs), p) for v in spec.wrt_inputs]
    if training is None:
        program.append(Weights(0, False))
    else:  # dL/dw kept for the update, which gives the result
        program += [Weights(0, True), Update(0, 0, training.step, training.lr, 1.0, training.grads)]
    out.append((Output(Kind.WEIGHTS, -1, "", True), p))
    up = [i for i in range(len(out)) if i not in sent]
    call = StageCall(dep.keys[p], job_id, threads[p], tuple(program), tuple(names), tuple(values), len(out), tuple(up))
    return call.to_wire(), [out[i] for i in up]
