"""The training-session RPCs of GradientService (OpenSession, Step, SetWeights, GetWeights,
CheckpointSession, CloseSession; ``proto/v1/service.proto``), mixed into :class:`~gradserve.server.servicer.GradientServicer`.

A step runs on the call's thread, one at a time per session (:mod:`gradserve.server.sessions`).
Steps are numbered: a step resent after its reply was lost is answered from the session's last
reply instead of updating the weights twice.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Mapping

import grpc
import numpy as np

from gradserve.proto import chunks
from gradserve.proto.v1 import service_pb2
from gradserve.server.errors import BadRequest, ServiceError
from gradserve.server.job import client_of, parse_options
from gradserve.server.result import Result
from gradserve.server.rpc import first, job_stream, rest, result_messages, rpc
from gradserve.server.sessions import OpenSession as SessionEntry  # in the class, OpenSession is the RPC
from gradserve.worker.optim import ParamGroups

if TYPE_CHECKING:
    from gradserve.server.limits import ByteBudget, Limits
    from gradserve.server.metrics import ServerMetrics
    from gradserve.server.models import ModelStore
    from gradserve.server.sessions import SessionRegistry

log = logging.getLogger("gradserve.server")


class SessionRPCs:
    """The session handlers; the servicer supplies ``store``, ``sessions``, ``limits``,
    ``pending``, ``metrics`` and ``_assembler`` (declared here for the type checker)."""

    store: ModelStore
    sessions: SessionRegistry
    limits: Limits
    pending: ByteBudget
    metrics: ServerMetrics
    _assembler: Callable[[str, int], chunks.Assembler]

    @rpc
    def OpenSession(
        self, request: service_pb2.SessionOptions, context: grpc.ServicerContext
    ) -> service_pb2.SessionInfo:
        model = self.store.get(request.model_id)
        try:
            groups = ParamGroups.from_dict(json.loads(request.optimizer_json or "null") or {})
        except (ValueError, TypeError, AttributeError) as exc:
            raise BadRequest(f"OpenSession: optimizer_json: {exc}") from None
        if request.max_norm < 0 or not np.isfinite(request.max_norm):
            raise BadRequest(f"OpenSession: max_norm must be positive (or 0: no clipping), not {request.max_norm}")
        options = parse_options(request.partitions, request.micro_batches, request.replicas, ())
        counts = (options.partitions, options.micro_batches, options.replicas)
        entry = self.sessions.open(
            request.model_id, model, groups, counts, request.max_norm or None, client_of(context)
        )
        return _info(entry, self.sessions.idle_ttl)

    @rpc
    def Step(self, request_iterator: Iterator, context: grpc.ServicerContext) -> Iterator[service_pb2.ResultChunk]:
        opts, feed_chunks = job_stream(request_iterator, "Step")
        entry = self.sessions.get(opts.session_id)
        with self._received(opts.feeds, feed_chunks, "feed", self.limits.max_feed_bytes) as feeds:
            with entry.lock:
                entry.last_used = time.monotonic()
                result = self._step(entry, opts, feeds)
                entry.last_used = time.monotonic()
        yield from result_messages("", result, {"session_id": entry.id})

    def _step(self, entry: SessionEntry, opts: service_pb2.StepOptions, feeds: Mapping[str, np.ndarray]) -> Result:
        session = entry.session
        if not opts.update:
            return session.gradients(feeds)
        if entry.last_step is not None and opts.step == entry.last_step[0]:
            return entry.last_step[1]  # sent again: its reply was lost on the way
        restored, entry.restored_from = entry.restored_from, None
        if restored is None and opts.step != session.steps + 1:
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"step {opts.step} sent, but session {entry.id} has applied {session.steps} steps "
                f"(the next one is {session.steps + 1})",
            )
        t = time.perf_counter()
        step = session.step(feeds, return_grads=opts.return_grads, lr=opts.lr if opts.HasField("lr") else None)
        info = {**step.info, "step": step.step}
        if restored is not None:  # reopened from a checkpoint (a server restart): the client's count was ahead
            info.setdefault("restored_from_step", restored)
        result = Result(step.loss, step.grads or {}, {}, info)
        entry.last_step = (step.step, result)
        self.sessions.count_step()
        log.debug(
            "session %s: step %d, loss %.6g, %.1f ms", entry.id, step.step, step.loss, (time.perf_counter() - t) * 1e3
        )
        return result

    @rpc
    def SetWeights(self, request_iterator: Iterator, context: grpc.ServicerContext) -> service_pb2.SessionInfo:
        header = first(request_iterator, "header", "SetWeights")
        entry = self.sessions.get(header.session_id)
        data = rest(request_iterator, "data", "SetWeights")
        with self._received(header.weights, data, "weight", self.limits.max_model_bytes) as values:
            with entry.lock:
                entry.last_used = time.monotonic()
                entry.session.set_weights(values)
        return _info(entry, self.sessions.idle_ttl)

    @rpc
    def GetWeights(
        self, request: service_pb2.WeightsRequest, context: grpc.ServicerContext
    ) -> Iterator[service_pb2.WeightsChunk]:
        entry = self.sessions.get(request.session_id)
        with entry.lock:
            entry.last_used = time.monotonic()
            values = entry.session.weights(list(request.names) or None)
        yield service_pb2.WeightsChunk(
            header=service_pb2.WeightsHeader(session_id=entry.id, weights=chunks.headers(values))
        )
        for chunk in chunks.chunks(values):
            yield service_pb2.WeightsChunk(data=chunk)

    @rpc
    def CheckpointSession(
        self, request: service_pb2.SessionRef, context: grpc.ServicerContext
    ) -> service_pb2.SessionInfo:
        entry = self.sessions.get(request.session_id)
        with entry.lock:
            entry.last_used = time.monotonic()
            entry.session.checkpoint()
        return _info(entry, self.sessions.idle_ttl)

    @rpc
    def CloseSession(self, request: service_pb2.SessionRef, context: grpc.ServicerContext) -> service_pb2.SessionInfo:
        return _info(self.sessions.close(request.session_id), 0.0)

    @contextlib.contextmanager
    def _received(self, declared, data: Iterable, what: str, limit: int) -> Iterator[dict[str, np.ndarray]]:
        """The tensors a request stream declares and sends, held in the pending-bytes budget while in use."""
        asm = self._assembler(what, limit)
        asm.declare(declared, what)
        held = self.pending.reserve(asm.total_bytes, f"the {what}s of this call")
        try:
            for chunk in data:
                asm.add(chunk)
            arrays = asm.finish()
            self.metrics.upload_bytes.labels(f"{what}s").inc(asm.received_bytes)
            yield arrays
        finally:
            self.pending.release(held)


def _info(entry: SessionEntry, ttl: float) -> service_pb2.SessionInfo:
    return service_pb2.SessionInfo(
        session_id=entry.id, model_id=entry.model_id, steps=entry.session.steps, idle_ttl_seconds=ttl
    )
