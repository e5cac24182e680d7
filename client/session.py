"""Training sessions on a gradserve server: :meth:`Client.session` returns a :class:`RemoteSession`.

The same methods as the local engines' sessions (:class:`gradserve.server.session.Session`), over
the session RPCs of ``proto/v1/service.proto``: the weights and optimizer state stay on the
server's workers, and a step sends only its batch.

    with client.session(model, gradserve.optim.Adam(lr=1e-3), partitions=2) as session:
        for x, y in batches:
            print(session.step({"x": x, "y": y}).loss)

The learning-rate schedule runs here (a schedule may be any callable) and each step carries its
rate. Steps are numbered, so one retried after a lost reply is not applied twice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping

import numpy as np

from gradserve.client.errors import streaming
from gradserve.client.job import read_result
from gradserve.client.wire import wire_arrays
from gradserve.proto import chunks
from gradserve.proto.v1 import service_pb2
from gradserve.server.result import Result
from gradserve.server.session import SessionClosed, StepResult
from gradserve.worker.graph import GraphError
from gradserve.worker.optim import ParamGroups, Schedule, check_schedule, lr_at

if TYPE_CHECKING:  # pragma: no cover
    from gradserve.client.remote import Client


class RemoteSession:
    """A training session held by a server (open one with :meth:`Client.session`)."""

    def __init__(
        self, client: "Client", info: service_pb2.SessionInfo, groups: ParamGroups, schedule: Schedule | None
    ) -> None:
        self.client = client
        self.id = info.session_id
        self.model_id = info.model_id
        self.groups = groups
        self.schedule = schedule if schedule is None or callable(schedule) else check_schedule(schedule)
        self.steps = int(info.steps)
        self.closed = False

    def __repr__(self) -> str:
        return f"RemoteSession({self.id!r}, model {self.model_id[:12]}, {self.steps} steps)"

    def step(self, feeds: Mapping[str, Any], return_grads: bool = False) -> StepResult:
        """Forward, backward and one optimizer update on the server's workers; the loss is the
        one before the update. dL/dw comes back only with ``return_grads``."""
        number = self.steps + 1
        lr = None if self.schedule is None else lr_at(self.schedule, number)
        options = service_pb2.StepOptions(session_id=self.id, step=number, update=True, return_grads=return_grads)
        if lr is not None:
            options.lr = lr
        result = self._send(feeds, options)
        # The server's number: lower than ours when it went back to a checkpoint (info["restored_from_step"]).
        self.steps = int(result.info.get("step", number))
        return StepResult(result.loss, self.steps, result.grads if return_grads else None, result.info)

    def checkpoint(self) -> None:
        """Ask the server to checkpoint the session now (its weights and optimizer state, kept in
        its state directory: what it restarts from after losing a worker or a restart)."""
        self._check_open()
        calls = self.client.calls
        calls.call(calls.stub.CheckpointSession, service_pb2.SessionRef(session_id=self.id))

    def gradients(self, feeds: Mapping[str, Any]) -> Result:
        """The loss and dL/dw at the session's current weights, which stay as they are."""
        return self._send(feeds, service_pb2.StepOptions(session_id=self.id, update=False))

    def set_weights(self, values: Mapping[str, Any]) -> None:
        """Replace some weights on the server (only those given travel); their optimizer state stays."""
        self._check_open()
        arrays = wire_arrays(values, "weight")
        header = service_pb2.WeightsHeader(session_id=self.id, weights=chunks.headers(arrays))

        def messages() -> Iterator[service_pb2.WeightsChunk]:
            yield service_pb2.WeightsChunk(header=header)
            for chunk in chunks.chunks(arrays):
                yield service_pb2.WeightsChunk(data=chunk)

        # Setting the same values again changes nothing: safe to retry.
        calls = self.client.calls
        calls.retrying("SetWeights", lambda left: calls.send(calls.stub.SetWeights, messages(), left))

    def weights(self, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """The current weights (all, or those named), streamed from the server."""
        self._check_open()
        request = service_pb2.WeightsRequest(session_id=self.id, names=list(names or ()))
        calls = self.client.calls

        def fetch(left: float | None) -> dict[str, np.ndarray]:
            stream = streaming(calls.send(calls.stub.GetWeights, request, left))
            head = next(stream, None)
            if head is None or head.WhichOneof("part") != "header":
                raise GraphError("the server's weights stream does not start with a header")
            asm = chunks.Assembler(what="weights")
            declared = asm.declare(head.header.weights, "weight")
            for msg in stream:
                asm.add(msg.data)
            arrays = asm.finish()
            return {name: arrays[name] for name in declared}

        return calls.retrying("GetWeights", fetch)

    def close(self) -> None:
        """Close the session: the server frees its weights and optimizer state."""
        if not self.closed:
            self.closed = True
            calls = self.client.calls
            calls.call(calls.stub.CloseSession, service_pb2.SessionRef(session_id=self.id))

    def __enter__(self) -> "RemoteSession":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, feeds: Mapping[str, Any], options: service_pb2.StepOptions) -> Result:
        self._check_open()
        arrays = wire_arrays(feeds, "feed")
        options.feeds.extend(chunks.headers(arrays))
        calls = self.client.calls

        def attempt(left: float | None) -> Result:  # a fresh request stream per attempt
            def messages() -> Iterator[service_pb2.StepChunk]:
                yield service_pb2.StepChunk(options=options)
                for chunk in chunks.chunks(arrays):
                    yield service_pb2.StepChunk(feed=chunk)

            return read_result(calls.send(calls.stub.Step, messages(), left))

        return calls.retrying("Step", attempt)

    def _check_open(self) -> None:
        if self.closed:
            raise SessionClosed("the session is closed")
