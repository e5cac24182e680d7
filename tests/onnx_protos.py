"""ONNX models written node by node with ``onnx.helper``, for the import tests
(tests/client/test_onnx_import*.py): ``make_onnx(nodes, inputs, outputs, initializers, opset)``."""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper


def make_onnx(
    nodes: list[onnx.NodeProto],
    inputs: Iterable[tuple],
    outputs: Iterable[tuple],
    initializers: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]] = (),
    opset: int = 17,
) -> onnx.ModelProto:
    """A model of one graph of ``nodes`` at ``opset`` of the default domain. ``inputs``/``outputs``
    are (name, elem_type, shape) triples, a shape of ints, axis names or None; ``initializers`` maps
    names to arrays."""
    graph = helper.make_graph(
        nodes,
        "test",
        [helper.make_tensor_value_info(*i) for i in inputs],
        [helper.make_tensor_value_info(*o) for o in outputs],
        [numpy_helper.from_array(v, k) for k, v in dict(initializers).items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
