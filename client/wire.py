"""Models and feeds as they travel to a server: arrays in the wire's layout (:func:`wire_arrays`),
a model's upload manifest and content id (:func:`model_manifest`), a job's request stream."""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import numpy as np

from gradserve.proto import chunks, tensors
from gradserve.proto.v1 import service_pb2
from gradserve.worker.graph import GraphError, Model, graph_from_proto


def wire_array(array: Any) -> np.ndarray:
    """``array`` as it travels: native byte order, C order; an unsupported dtype raises ValueError
    naming it, before any call."""
    array = np.asarray(array)
    tensors.dtype_code(array.dtype)  # unsupported dtypes fail here, naming the dtype, before any call
    # np.asarray, not np.ascontiguousarray: the latter turns 0-d arrays into 1-d ones.
    return np.asarray(array, dtype=array.dtype.newbyteorder("="), order="C")


def wire_arrays(values: Mapping[str, Any], what: str) -> dict[str, np.ndarray]:
    """:func:`wire_array` of each value; a GraphError names the ``what`` (e.g. "feed") at fault."""
    arrays = {}
    for name, value in values.items():
        try:
            arrays[name] = wire_array(value)
        except ValueError as exc:
            raise GraphError(f"{what} '{name}': {exc}") from None
    return arrays


def model_manifest(model: Model) -> tuple[service_pb2.ModelManifest, dict[str, np.ndarray]]:
    """The manifest announcing ``model`` and the arrays whose chunks follow it.

    The model id is the fingerprint of the model *as the server will rebuild it* from the graph
    message (defaults filled in, constants decoded), so both sides hash exactly the same thing.
    """
    graph = model.graph_proto()
    canonical = graph_from_proto(graph)
    params = wire_arrays(model.params, "parameter")
    canonical.params = params
    model_id = canonical.fingerprint()
    constants = canonical.constants
    del graph.constants[:]  # constants travel chunked, like parameters, however big they are
    manifest = service_pb2.ModelManifest(
        graph=graph, parameters=chunks.headers(params), constants=chunks.headers(constants), model_id=model_id
    )
    return manifest, {**params, **constants}


def job_stream(options: service_pb2.JobOptions, arrays: Mapping[str, np.ndarray]) -> Iterator[service_pb2.JobChunk]:
    """A Run or Submit request stream: the options, then the feeds' chunks."""
    yield service_pb2.JobChunk(options=options)
    for chunk in chunks.chunks(arrays):
        yield service_pb2.JobChunk(feed=chunk)
