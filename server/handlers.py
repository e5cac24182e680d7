"""gRPC method handlers of any cardinality: one place that maps (request streaming, response
streaming) to grpc's four ``*_rpc_method_handler`` constructors, for the servicer, the RPC counter
and the token check, which all build handlers around a behaviour."""

from __future__ import annotations

from typing import Any, Callable

import grpc

_MAKERS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def method_handler(
    behaviour: Callable, request_streaming: bool, response_streaming: bool, **serializers: Any
) -> grpc.RpcMethodHandler:
    """A handler running ``behaviour`` for a method of that cardinality (gRPC reads the request
    stream according to it); ``serializers``: request_deserializer, response_serializer."""
    return _MAKERS[(bool(request_streaming), bool(response_streaming))](behaviour, **serializers)


def like(handler: grpc.RpcMethodHandler, behaviour: Callable) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s cardinality and serializers that runs ``behaviour`` instead."""
    return method_handler(
        behaviour,
        handler.request_streaming,
        handler.response_streaming,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
