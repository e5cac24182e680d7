"""ONNX sequence ops, rewritten at import into plain tensor ops (for :mod:`.onnx_import`).

torch's exporter writes ``torch.split``/``chunk`` and Python lists of tensors as sequences:
``SplitToSequence`` then ``SequenceAt`` per element, ``SequenceConstruct``/``SequenceInsert`` and
``ConcatFromSequence`` for ``torch.cat`` of a list. Where the length of every sequence is known when
the model is loaded (the split axis has a static size or the split sizes are constants; positions
are constants), a sequence is a fixed list of tensors, so it is rewritten here:

- ``SplitToSequence`` -> ``Split`` (and a ``Squeeze`` per piece for ``keepdims=0``);
- ``SequenceAt`` -> ``Identity`` of the element; ``SequenceLength`` -> a constant;
- ``SequenceEmpty``/``SequenceConstruct``/``SequenceInsert``/``SequenceErase`` -> list bookkeeping, no node;
- ``ConcatFromSequence`` -> ``Concat`` (after an ``Unsqueeze`` per element for ``new_axis=1``).

The engine, the VJPs, partitioning and micro-batching then see only ops they already have (a
value-level sequence type would need all four to learn lists). A sequence whose length or an
index into it is only known when the model runs is refused, naming the node.
"""

from __future__ import annotations

import numpy as np

from gradserve.client.onnx_read import InferredShape
from gradserve.worker.graph import GraphError, Node

# the ops that read a sequence as their first input, and those that build one from tensors
_READS_SEQUENCE = frozenset({"SequenceInsert", "SequenceErase", "SequenceAt", "SequenceLength", "ConcatFromSequence"})
SEQUENCE_OPS = _READS_SEQUENCE | {"SplitToSequence", "SequenceEmpty", "SequenceConstruct"}


class SequenceRewrite:
    """The sequence half of the importer: rewrites its nodes (topologically sorted) in place."""

    nodes: list[Node]
    constants: dict[str, np.ndarray]
    shapes: dict[str, InferredShape]
    outputs: list[str]

    def _value_names(self) -> set[str]:
        raise NotImplementedError

    @staticmethod
    def _fresh(stem: str, taken: set[str]) -> str:
        raise NotImplementedError

    def rewrite_sequences(self) -> bool:
        """Replace every sequence op by tensor ops; True if the graph had any (fold again then)."""
        if not any(n.op_type in SEQUENCE_OPS for n in self.nodes):
            return False
        self._seqs: dict[str, list[str]] = {}  # sequence value -> its elements, in order
        self._taken_nodes = {n.name for n in self.nodes}
        self._taken_values = self._value_names()
        rewritten: list[Node] = []
        for node in self.nodes:
            if node.op_type in SEQUENCE_OPS:
                rewritten += self._rewrite(node)
            elif node.op_type == "Identity" and node.inputs[0] in self._seqs:
                self._seqs[node.outputs[0]] = list(self._seqs[node.inputs[0]])
            else:
                self._check_no_sequence_read(node)
                rewritten.append(node)
        leaked = next((o for o in self.outputs if o in self._seqs), None)
        if leaked is not None:
            raise GraphError(f"graph output '{leaked}' is a sequence; gradserve's graphs output tensors")
        self.nodes = rewritten
        return True

    def _check_no_sequence_read(self, node: Node) -> None:
        seq = next((i for i in node.inputs if i in self._seqs), None)
        if seq is not None:
            raise GraphError(
                f"{node}: reads the sequence '{seq}', which only sequence ops "
                f"({', '.join(sorted(SEQUENCE_OPS))}) can read here"
            )

    def _rewrite(self, node: Node) -> list[Node]:
        """The plain nodes for one sequence op (none for list bookkeeping)."""
        op = node.op_type
        if op in _READS_SEQUENCE and node.inputs[0] not in self._seqs:
            raise GraphError(f"{node}: its input '{node.inputs[0]}' is not a sequence built in this graph")
        if op == "SplitToSequence":
            return self._split(node)
        if op == "ConcatFromSequence":
            return self._concat(node)
        out = node.outputs[0]
        if op == "SequenceEmpty":
            self._seqs[out] = []
        elif op == "SequenceConstruct":
            self._seqs[out] = list(node.inputs)
        elif op == "SequenceLength":
            self.constants[out] = np.asarray(len(self._seqs[node.inputs[0]]), np.int64)
        elif op == "SequenceAt":
            elements = self._seqs[node.inputs[0]]
            k = self._position(node, 1, len(elements), default=None)
            return [Node(self._node_name(f"{node.name}/at"), "Identity", [elements[k]], [out])]
        elif op == "SequenceInsert":
            elements = list(self._seqs[node.inputs[0]])
            k = self._position(node, 2, len(elements), default=len(elements), inserting=True)
            elements.insert(k, node.inputs[1])
            self._seqs[out] = elements
        else:  # SequenceErase
            elements = list(self._seqs[node.inputs[0]])
            k = self._position(node, 1, len(elements), default=len(elements) - 1)
            del elements[k]
            self._seqs[out] = elements
        return []

    def _position(self, node: Node, index: int, length: int, default: int | None, inserting: bool = False) -> int:
        """The constant position input ``index`` of ``node`` into a sequence of ``length``
        elements, in ``[-length, length)`` (to ``length`` inclusive when ``inserting``), negatives
        counting from the end as ONNX says; ``default`` when the input is absent."""
        name = node.inputs[index] if len(node.inputs) > index else ""
        if not name:
            if default is None or (length == 0 and not inserting):
                raise GraphError(f"{node}: needs a position in a sequence of {length} elements")
            return default
        if name not in self.constants:
            raise GraphError(
                f"{node}: its position '{name}' is only known when the model runs; gradserve "
                "supports sequences indexed by constants"
            )
        k = int(np.asarray(self.constants[name]).reshape(-1)[0])
        if not -length <= k < length + inserting:
            raise GraphError(f"{node}: position {k} is out of range for a sequence of {length} elements")
        return k + length if k < 0 else k

    def _split(self, node: Node) -> list[Node]:
        x, out = node.inputs[0], node.outputs[0]
        split = node.inputs[1] if len(node.inputs) > 1 else ""
        sizes = self._split_sizes(node, x, split)
        axis = int(node.attrs.get("axis", 0))
        pieces = [self._value_name(f"{out}/{k}") for k in range(len(sizes))]
        cut = self._value_name(f"{out}/sizes")
        self.constants[cut] = np.asarray(sizes, np.int64)
        nodes = [Node(self._node_name(f"{node.name}/split"), "Split", [x, cut], pieces, {"axis": axis})]
        if not split and int(node.attrs.get("keepdims", 1)) == 0:  # keepdims only applies without split
            axes = self._value_name(f"{out}/axis")
            self.constants[axes] = np.asarray([axis], np.int64)
            squeezed = [self._value_name(f"{p}/squeezed") for p in pieces]
            nodes += [
                Node(self._node_name(f"{node.name}/squeeze_{k}"), "Squeeze", [p, axes], [s])
                for k, (p, s) in enumerate(zip(pieces, squeezed))
            ]
            pieces = squeezed
        self._seqs[out] = pieces
        return nodes

    def _split_sizes(self, node: Node, x: str, split: str) -> list[int]:
        """The piece sizes along the split axis: the length of the sequence must be known now."""
        if split and split not in self.constants:
            raise GraphError(
                f"{node}: its split '{split}' is only known when the model runs, so the sequence's "
                "length is unknown; gradserve supports sequences of a length known at load"
            )
        given = np.asarray(self.constants[split]).astype(np.int64) if split else None
        if given is not None and given.ndim == 1:
            return [int(s) for s in given]
        size = self._axis_size(node, x)
        chunk = 1 if given is None else int(given.reshape(-1)[0])
        if chunk < 1:
            raise GraphError(f"{node}: split size {chunk} must be positive")
        count = -(-size // chunk)
        return [min(chunk, size - k * chunk) for k in range(count)]

    def _axis_size(self, node: Node, x: str) -> int:
        shape = self.constants[x].shape if x in self.constants else self.shapes.get(x)
        axis = int(node.attrs.get("axis", 0))
        size = shape[axis] if shape is not None and -len(shape) <= axis < len(shape) else None
        if isinstance(size, int):
            return size
        dim = "an unknown size" if shape is None or not -len(shape) <= axis < len(shape) else f"size '{shape[axis]}'"
        raise GraphError(
            f"{node}: splits axis {axis} of '{x}', of {dim} when the model is loaded, into a sequence of "
            "unknown length; gradserve supports sequences of a length known at load (split along a "
            "static axis, or give the split sizes)"
        )

    def _concat(self, node: Node) -> list[Node]:
        elements = self._seqs[node.inputs[0]]
        if not elements:
            raise GraphError(f"{node}: concatenates an empty sequence")
        axis = int(node.attrs["axis"]) if "axis" in node.attrs else None
        if axis is None:
            raise GraphError(f"{node}: the axis attribute is required")
        nodes: list[Node] = []
        if int(node.attrs.get("new_axis", 0)):
            axes = self._value_name(f"{node.outputs[0]}/axis")
            self.constants[axes] = np.asarray([axis], np.int64)  # Unsqueeze, like new_axis, counts in the output's rank
            stacked = [self._value_name(f"{e}/unsqueezed") for e in elements]
            nodes += [
                Node(self._node_name(f"{node.name}/unsqueeze_{k}"), "Unsqueeze", [e, axes], [s])
                for k, (e, s) in enumerate(zip(elements, stacked))
            ]
            elements = stacked
        nodes.append(
            Node(self._node_name(f"{node.name}/concat"), "Concat", list(elements), [node.outputs[0]], {"axis": axis})
        )
        return nodes

    def _node_name(self, stem: str) -> str:
        return self._fresh(stem, self._taken_nodes)

    def _value_name(self, stem: str) -> str:
        return self._fresh(stem, self._taken_values)
