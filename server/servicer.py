"""The RPC handlers of GradientService (``proto/v1/service.proto``): models, jobs and the server's
status here, training sessions in :mod:`gradserve.server.session_rpcs`. Requests are parsed, and
exceptions mapped to statuses, by :mod:`gradserve.server.rpc`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Callable, Iterable, Iterator

import grpc

from gradserve.proto import chunks
from gradserve.proto.v1 import service_pb2
from gradserve.server.engines import EngineRunner
from gradserve.server.errors import BadRequest, LimitExceeded, ServiceError, status_for
from gradserve.server.handlers import method_handler
from gradserve.server.job import Job, client_of, one_line, parse_options
from gradserve.server.job_status import status_message
from gradserve.server.jobs import JobRegistry
from gradserve.server.limits import ByteBudget, Limits
from gradserve.server.metrics import ServerMetrics
from gradserve.server.models import ModelStore
from gradserve.server.planning.partition import check_partitions
from gradserve.server.planning.prepare import prepare
from gradserve.server.result import Result
from gradserve.server.session_rpcs import SessionRPCs
from gradserve.server.sessions import SessionRegistry
from gradserve.server.rpc import checked, first, job_stream, lenient, rest, result_messages, rpc
from gradserve.server.uploads import PartialUploads
from gradserve.worker.graph import GraphError, graph_from_proto
from gradserve.worker.validate import check_structure

log = logging.getLogger("gradserve.server")

SERVICE_NAME = service_pb2.DESCRIPTOR.services_by_name["GradientService"].full_name  # gradserve.v1.GradientService
_STOP_WAIT = 60.0  # seconds a cancelled synchronous job gets to stop before its call ends anyway
_POLL = 0.5  # seconds between checks that a waiting streaming call's client is still there


# -- the servicer ----------------------------------------------------------------------------------


class GradientServicer(SessionRPCs):
    """The RPC handlers. State lives in the model store, the job registry and the session registry."""

    def __init__(
        self,
        store: ModelStore,
        registry: JobRegistry,
        runner: EngineRunner,
        limits: Limits,
        metrics: ServerMetrics | None = None,
        sessions: SessionRegistry | None = None,
    ) -> None:
        self.store, self.registry, self.runner, self.limits = store, registry, runner, limits
        self.sessions = sessions or SessionRegistry(
            runner.session, idle_ttl=limits.session_idle_ttl, max_per_client=limits.max_sessions_per_client
        )
        self.metrics = metrics or registry.metrics
        self.started = time.time()  # for the uptime GetServerStatus reports
        self.rejected = 0  # jobs refused when submitted, since start (guarded by _stats_lock)
        self.pending = ByteBudget(limits.max_pending_bytes)
        self._stats_lock = threading.Lock()
        self.stats = {
            "uploads": 0,
            "uploads_skipped": 0,
            "upload_chunks": 0,
            "has_model_calls": 0,
            "jobs": 0,
            "uploads_resumed": 0,
        }
        # Broken uploads kept for a resume; their bytes stay reserved in self.pending.
        self.partial_uploads = PartialUploads(self.pending, store)

    def _count(self, key: str, n: int = 1) -> None:
        with self._stats_lock:
            self.stats[key] += n

    def counters(self) -> dict[str, int]:
        """A consistent copy of the call counters (uploads, jobs, ...) and ``rejected``."""
        with self._stats_lock:
            return {**self.stats, "rejected": self.rejected}

    def _assembler(self, what: str, max_total_bytes: int) -> chunks.Assembler:
        return chunks.Assembler(
            what=what,
            max_total_bytes=max_total_bytes,
            max_elements=self.limits.max_tensor_elements,
            max_chunk_bytes=4 * chunks.CHUNK_BYTES,
        )

    # -- models -----------------------------------------------------------------------------------
    @rpc
    def HasModel(self, request: service_pb2.ModelRef, context: grpc.ServicerContext) -> service_pb2.ModelInfo:
        self._count("has_model_calls")
        self.partial_uploads.sweep()
        stored = self.store.info(request.model_id)
        if stored is None:
            received = self.partial_uploads.received(request.model_id)
            return service_pb2.ModelInfo(model_id=request.model_id, present=False, received_bytes=received)
        return service_pb2.ModelInfo(
            model_id=stored.model_id,
            present=True,
            parameter_bytes=stored.nbytes,
            parameter_count=len(stored.model.params),
        )

    @rpc
    def UploadModel(self, request_iterator: Iterator, context: grpc.ServicerContext) -> service_pb2.UploadReply:
        t0 = time.perf_counter()
        manifest = first(request_iterator, "manifest", "UploadModel")
        model_id = manifest.model_id
        if len(model_id) != 64 or any(c not in "0123456789abcdef" for c in model_id):
            raise BadRequest("UploadModel: model_id must be the model's SHA-256 fingerprint (64 lowercase hex digits)")
        self.partial_uploads.sweep()
        if self.store.has(model_id):
            # Content-addressed: the same id is the same model, so nothing needs to be read.
            self.partial_uploads.drop(model_id)
            self._count("uploads_skipped")
            return service_pb2.UploadReply(model_id=model_id, already_present=True)
        model = graph_from_proto(manifest.graph)
        params = [h.name for h in manifest.parameters]
        consts = [h.name for h in manifest.constants]
        partial, resumed = self.partial_uploads.begin(
            manifest, lambda: self._assembler("model", self.limits.max_model_bytes)
        )
        if resumed:
            self._count("uploads_resumed")
        asm = partial.asm
        start = asm.received_bytes
        arrays = None
        try:
            try:
                for chunk in rest(request_iterator, "data", "UploadModel"):
                    asm.add(chunk)
                    self._count("upload_chunks")
            except grpc.RpcError:  # the client went away (not an internal error worth a traceback)
                raise ServiceError(grpc.StatusCode.CANCELLED, "the client went away while uploading") from None
            arrays = asm.finish()
        finally:
            self.metrics.upload_bytes.labels("model").inc(asm.received_bytes - start)
            if arrays is None:  # the stream broke (or was bad): keep what it delivered, for a while
                self.partial_uploads.keep(model_id, partial)
            else:
                self.pending.release(partial.held)  # from here on the model store accounts for the bytes
        for name in consts:
            if name in model.constants:
                raise GraphError(f"constant '{name}' is sent both inline and in chunks")
            model.constants[name] = arrays[name]
        model.params = {name: arrays[name] for name in params}
        actual = model.fingerprint()
        if actual != model_id:
            raise BadRequest(
                f"UploadModel: the data received hashes to {actual}, not to the declared model_id {model_id} "
                "(corrupted in transit, or the client computed the id differently)"
            )
        check_structure(model)  # unknown ops, dangling inputs... rejected now, naming the node
        stored = self.store.put(model_id, model)
        self.partial_uploads.drop(model_id)  # another stream's broken upload of it is not needed any more
        self._count("uploads")
        log.info(
            "model %s uploaded: %d parameters, %d bytes in %.3fs",
            model_id[:16],
            len(model.params),
            stored.nbytes,
            time.perf_counter() - t0,
        )
        return service_pb2.UploadReply(model_id=model_id, bytes_received=asm.received_bytes - start)

    # -- jobs -------------------------------------------------------------------------------------
    def _submit(
        self,
        parse: Callable[[], tuple[service_pb2.JobOptions, Iterable[service_pb2.TensorChunk]]],
        context: grpc.ServicerContext,
        *,
        claim: bool = False,
        durable: bool = False,
    ) -> Job:
        """Parse a job request, check its options and feeds and queue it: the one path of Run,
        Compute and Submit. ``parse()`` returns the options and the TensorChunks of their feeds.
        ``claim``, ``durable``: see :meth:`JobRegistry.submit` (with ``claim`` the caller then runs
        the job, :meth:`_run`).
        A job refused here (malformed, bad feeds, a limit) gets its one outcome line and is counted
        as "rejected" (:meth:`_rejected`)."""
        model_id = ""
        try:
            opts, feed_chunks = parse()
            model_id = opts.model_id
            return self._accept(opts, feed_chunks, context, claim=claim, durable=durable)
        except Exception as exc:  # noqa: BLE001 -- mapped to a status once, here
            raise self._rejected(model_id, exc, context) from exc  # the cause keeps its retry hint (errors.py)

    def _rejected(self, model_id: str, exc: Exception, context: grpc.ServicerContext) -> ServiceError:
        """Count and log a job refused at submit: its one outcome line. Returns the error to raise,
        already mapped to its status (so an unexpected error's traceback is logged once)."""
        # The client went away while sending the job: gRPC raises RpcError from the request stream,
        # or (cancel racing the end of the stream) it ends early and the feeds come out short.
        if isinstance(exc, grpc.RpcError) or not context.is_active():
            code, message = grpc.StatusCode.CANCELLED, "the client went away while sending the job"
        else:
            code, message = status_for(exc)
        with self._stats_lock:
            self.rejected += 1
        self.metrics.job_ended("rejected", code.name, None)
        fields = {
            "job_id": "",
            "model_id": model_id[:16],
            "outcome": "rejected",
            "code": code.name,
            "error": one_line(message),
        }
        log.info(
            "job rejected: model %s: %s: %s",
            fields["model_id"] or "(none)",
            code.name,
            fields["error"],
            extra={"fields": fields},
        )
        return ServiceError(code, message)

    def _accept(
        self,
        opts: service_pb2.JobOptions,
        feed_chunks: Iterable[service_pb2.TensorChunk],
        context: grpc.ServicerContext,
        *,
        claim: bool,
        durable: bool,
    ) -> Job:
        self.partial_uploads.sweep()  # expired partial uploads free the pending budget for these feeds
        stored = self.store.entry(opts.model_id)
        model = stored.model
        requested = parse_options(opts.partitions, opts.micro_batches, opts.replicas, opts.input_grads)
        options = self.runner.effective(requested)
        if options != requested:
            log.debug("engine %s runs the whole graph: ignoring partitions/micro_batches/replicas", self.runner.name)
        asm = self._assembler("feed", self.limits.max_feed_bytes)
        asm.declare(opts.feeds, "feed")
        # The feeds stay in memory until the job ends: they count against the pending budget
        # until then, so a flood of queued jobs cannot exhaust the server's memory.
        held = self.pending.reserve(asm.total_bytes, "the feeds of this job")
        try:
            for chunk in feed_chunks:
                asm.add(chunk)
            feeds = asm.finish()
            self.metrics.upload_bytes.labels("feeds").inc(asm.received_bytes)
            # Check model against feeds now, so a bad batch fails the Submit itself (naming the
            # tensor) instead of a job later; the engine reuses the cached preparation.
            job_plan = prepare(model, feeds, options.input_grads, structure=stored.structure)
            check_partitions(job_plan, options.partitions)  # 9 asked of a graph that gives 4: refused now
            # Shapes come from the request (feeds, constants): bound what the graph would allocate.
            for name, info in job_plan.shapes.items():
                elements = math.prod(int(d) for d in info.shape)  # Python ints: no overflow
                if elements > self.limits.max_tensor_elements:
                    raise LimitExceeded(
                        f"value '{name}' would have shape {info.shape} ({elements} elements); "
                        f"the limit is {self.limits.max_tensor_elements} (--max-tensor-elements)"
                    )
            job = self.registry.submit(
                opts.model_id,
                model,
                feeds,
                options,
                on_finish=lambda: self.pending.release(held),
                client=client_of(context),
                claim=claim,
                durable=durable,
                prepared=job_plan,
            )
        except BaseException:
            self.pending.release(held)
            raise
        self._count("jobs")
        return job

    def _result_messages(
        self, job: Job, result: Result, *, header_data: bool = False
    ) -> Iterator[service_pb2.ResultChunk]:
        """The reply of Run, Compute and FetchResult (:func:`~gradserve.server.rpc.result_messages`),
        its info telling the job's server-side story."""
        snap = job.snapshot()
        server = {
            "job_id": job.id,
            "model_id": job.model_id,
            "engine": self.runner.name,
            "queued_seconds": snap.queued_seconds,
            "running_seconds": snap.running_seconds,
        }
        return result_messages(job.id, result, {"server": server}, header_data=header_data)

    def _await(self, job: Job, context: grpc.ServicerContext) -> bool:
        """Wait for ``job`` while the client is there; False if the client went away."""
        while not job.wait(_POLL):
            if not context.is_active():
                return False
        return True

    def _run(
        self, job: Job, context: grpc.ServicerContext, *, header_data: bool = False
    ) -> Iterator[service_pb2.ResultChunk]:
        """Wait for a synchronous job (Run, Compute) -- computing it in this thread when the registry
        let us claim it -- then stream its result (``header_data``: see :meth:`_result_messages`)."""
        # A synchronous job is only wanted while its caller waits: cancel it when the call ends
        # (through the registry, so a queued job releases its slot and its feeds at once).
        watched = False
        try:
            watched = context.add_callback(lambda: job.wait(0) or self.registry.cancel(job.id))
        finally:
            if not watched:  # the call has already ended
                self.registry.cancel(job.id)
            if job.claimed:  # admitted for this thread: it must run it (a cancelled one ends at once)
                self.registry.run_claimed(job)
        try:
            if not self._await(job, context):
                log.info("job %s: client went away, cancelling", job.id)
                self.registry.cancel(job.id)
                job.wait(_STOP_WAIT)  # forget it once it has stopped: until then it still counts as admitted
                return
            result = self.registry.take_result(job)
            yield from self._result_messages(job, result, header_data=header_data)
        finally:
            if job.wait(0):  # one still running is dropped by the registry's sweep once it ends
                self.registry.remove(job.id)

    @rpc
    def Run(self, request_iterator: Iterator, context: grpc.ServicerContext) -> Iterator[service_pb2.ResultChunk]:
        job = self._submit(lambda: job_stream(request_iterator, "Run"), context, claim=True)
        yield from self._run(job, context)

    @rpc(check=False)
    def Compute(
        self, request: service_pb2.JobRequest, context: grpc.ServicerContext
    ) -> Iterator[service_pb2.ResultChunk]:
        def parse():
            msg = checked(request)
            if not msg.HasField("options"):
                raise BadRequest("Compute: the request has no options")
            return msg.options, msg.feeds

        job = self._submit(parse, context, claim=True)
        yield from self._run(job, context, header_data=True)

    @rpc
    def Submit(self, request_iterator: Iterator, context: grpc.ServicerContext) -> service_pb2.JobHandle:
        # Its client may be gone when it ends: kept in the state directory, it survives a restart.
        job = self._submit(lambda: job_stream(request_iterator, "Submit"), context, durable=True)
        return service_pb2.JobHandle(job_id=job.id, model_id=job.model_id)

    @rpc
    def GetStatus(self, request: service_pb2.JobRef, context: grpc.ServicerContext) -> service_pb2.JobStatus:
        return status_message(self.registry.get(request.job_id).snapshot())

    @rpc
    def Watch(self, request: service_pb2.JobRef, context: grpc.ServicerContext) -> Iterator[service_pb2.JobStatus]:
        job = self.registry.get(request.job_id)
        for snap in job.watch(context.is_active, _POLL):
            yield status_message(snap)

    @rpc
    def Cancel(self, request: service_pb2.JobRef, context: grpc.ServicerContext) -> service_pb2.JobStatus:
        return status_message(self.registry.cancel(request.job_id).snapshot())

    @rpc
    def FetchResult(
        self, request: service_pb2.JobRef, context: grpc.ServicerContext
    ) -> Iterator[service_pb2.ResultChunk]:
        job = self.registry.get(request.job_id)
        if not self._await(job, context):
            return
        result = self.registry.peek_result(job)
        yield from self._result_messages(job, result)
        # Reached only once every chunk went out: a client whose stream broke can fetch again.
        self.registry.release_result(job)

    # -- the server -------------------------------------------------------------------------------
    @rpc
    def GetServerStatus(
        self, request: service_pb2.ServerStatusRequest, context: grpc.ServicerContext
    ) -> service_pb2.ServerStatus:
        from gradserve.server.status import server_status

        return server_status(self)


def generic_handler(servicer: GradientServicer) -> grpc.GenericRpcHandler:
    """Method handlers built from the service descriptor, with lenient request parsing."""
    service = service_pb2.DESCRIPTOR.services_by_name["GradientService"]
    handlers = {}
    for method in service.methods:
        request_cls = getattr(service_pb2, method.input_type.name)
        response_cls = getattr(service_pb2, method.output_type.name)
        handlers[method.name] = method_handler(
            getattr(servicer, method.name),
            method.client_streaming,
            method.server_streaming,
            request_deserializer=lenient(request_cls),
            response_serializer=response_cls.SerializeToString,
        )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)
