"""What every RPC handler shares: lenient request parsing and one mapping of exceptions to statuses.

Requests are parsed here, not by gRPC: gRPC answers a message it cannot parse with a bare
INTERNAL, while a client that sends garbage deserves INVALID_ARGUMENT and a message saying so.
Every handler maps its exceptions to a status through :mod:`gradserve.server.errors` (:func:`rpc`).
"""

from __future__ import annotations

import functools
import inspect
import json
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from google.protobuf.message import DecodeError, Message

from gradserve.proto import chunks
from gradserve.proto.v1 import service_pb2
from gradserve.server.errors import BadRequest, abort
from gradserve.server.result import Result


@dataclass(frozen=True)
class _Malformed:
    """Stands in for a request message that did not parse (see :func:`lenient`)."""

    type_name: str
    error: str


def lenient(cls: type[Message]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        msg = cls()
        try:
            msg.ParseFromString(data)
        except (DecodeError, ValueError, RuntimeError) as exc:
            return _Malformed(cls.DESCRIPTOR.full_name, str(exc) or type(exc).__name__)
        return msg

    return parse


def checked(msg: Any) -> Any:
    if isinstance(msg, _Malformed):
        raise BadRequest(f"request is not a valid {msg.type_name} message: {msg.error}")
    return msg


def first(requests: Iterator[Any], part: str, call: str) -> Any:
    """The first message of ``call``'s request stream, which must carry ``part``."""
    msg = checked(next(requests, None))
    if msg is None:
        raise BadRequest(f"{call}: empty request stream")
    if msg.WhichOneof("part") != part:
        raise BadRequest(f"{call}: the first message must carry the {part}")
    return getattr(msg, part)


def rest(requests: Iterator[Any], part: str, call: str) -> Iterator[Any]:
    """The remaining messages of ``call``'s request stream, each of which must carry ``part``."""
    for msg in requests:
        msg = checked(msg)
        if msg.WhichOneof("part") != part:
            raise BadRequest(f"{call}: after the first message, every message must carry a {part} chunk")
        yield getattr(msg, part)


def job_stream(requests: Iterator[Any], call: str) -> tuple[Any, Iterator[Any]]:
    """The options and feed chunks of a Run, Submit or Step request stream."""
    return first(requests, "options", call), rest(requests, "feed", call)


def _request(request: Any) -> Any:
    # A unary request is checked here; a request stream message by message in _first/_rest.
    return request if hasattr(request, "__next__") else checked(request)


def rpc(method: Callable | None = None, *, check: bool = True) -> Callable:
    """Map any exception of a servicer method to its gRPC status (:mod:`gradserve.server.errors`),
    for unary and streaming responses alike. ``check=False``: the method checks a unary request
    itself (:func:`checked`), as the job RPCs do to count a malformed one as a rejected job."""
    if method is None:
        return functools.partial(rpc, check=check)
    parse = _request if check else (lambda request: request)
    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def streaming(self, request, context):
            try:
                yield from method(self, parse(request), context)
            except Exception as exc:  # noqa: BLE001 -- mapped to a status, unexpected ones logged
                abort(context, exc)

        return streaming

    @functools.wraps(method)
    def unary(self, request, context):
        try:
            return method(self, parse(request), context)
        except Exception as exc:  # noqa: BLE001
            abort(context, exc)

    return unary


def result_messages(
    job_id: str, result: Result, extra_info: dict[str, Any], *, header_data: bool = False
) -> Iterator[service_pb2.ResultChunk]:
    """A result on the wire (Run, Compute, FetchResult, Step): a ResultHeader, then the tensors'
    chunks. With ``header_data`` (Compute) the header itself carries the first chunks, up to 1 MiB
    of them. ``extra_info`` joins the engine's info in the header's JSON."""
    data = chunks.chunks({**result.grads, **result.input_grads})
    packed, size, rest_chunk = [], 0, None
    if header_data:
        for chunk in data:
            if size + len(chunk.data) > chunks.CHUNK_BYTES:
                rest_chunk = chunk
                break
            packed.append(chunk)
            size += len(chunk.data)
    header = service_pb2.ResultHeader(
        job_id=job_id,
        loss=result.loss,
        grads=chunks.headers(result.grads),
        input_grads=chunks.headers(result.input_grads),
        info_json=json.dumps({**result.info, **extra_info}, default=str),
        data=packed,
    )
    yield service_pb2.ResultChunk(header=header)
    if rest_chunk is not None:
        yield service_pb2.ResultChunk(data=rest_chunk)
    for chunk in data:
        yield service_pb2.ResultChunk(data=chunk)
